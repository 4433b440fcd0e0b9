"""The bias ``smooth="code"`` leaves where a smooth op's backward reads a code.

A smooth op's backward (GELU, SiLU, tanh, sigmoid, softmax, LayerNorm) is a
nonlinear function of its saved input or output: a code that is unbiased
for the values gives a gradient biased by a term of the order of the code's
variance (the second-order bias ActNN, GACT and DIVISION accept).  The
default ``smooth="code"`` codes these saves; ``smooth="exact"`` keeps them.

Each row: a block ``Linear(64, 256) -> op -> Linear(256, 64)`` on a batch of
32 (a fixed random input and weights), loss ``mean(out**2)``; K draws of the
whole gradient under the strategy.  With ``e_K`` the squared error of the
mean of K draws and ``v`` the variance of one draw (both summed over every
parameter), an unbiased code gives ``e_K = v / K``; the bias is estimated as
``b^2 = e_K - v / K`` at the largest K and reported relative to the exact
gradient's norm, with ``R = e_K * K / v`` (1 for an unbiased code).

Run: ``python benchmarks/smooth_bias.py`` (about a minute on one CPU thread).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import actpack

OPS = {
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "silu": nn.SiLU,
    "sigmoid": nn.Sigmoid,
    "softmax": lambda: nn.Softmax(-1),
    "layer_norm": lambda: nn.LayerNorm(256),
}


def _grads(model: nn.Module, x: torch.Tensor, engine=None) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    if engine is None:
        model(x).square().mean().backward()
    else:
        with engine:
            model(x).square().mean().backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def bias(model, x, strategy: str, smooth: str, draws: int) -> tuple[float, float]:
    """(relative bias, R) of ``draws`` gradients under ``strategy``."""
    exact = _grads(model, x)
    engine = actpack.compress(strategy, min_numel=1, smooth=smooth)
    g = torch.stack([_grads(model, x, engine) for _ in range(draws)]).double()
    mean = g.mean(0)
    v = float((g - mean).square().sum(1).sum() / (draws - 1))
    e = float((mean - exact.double()).square().sum())
    b2 = max(e - v / draws, 0.0)
    return b2**0.5 / float(exact.double().norm()), e * draws / v if v else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"K = {args.draws} draws; bias relative to the exact gradient's norm; R = 1: unbiased")
    print("| op | strategy | bias, smooth=code | R, code | bias, smooth=exact | R, exact |")
    print("|---|---|---:|---:|---:|---:|")
    for name, op in OPS.items():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 256), op(), nn.Linear(256, 64))
        x = torch.randn(32, 64)
        for strategy in ("actnn", "actnn-rows"):
            code = bias(model, x, strategy, "code", args.draws)
            exact = bias(model, x, strategy, "exact", args.draws)
            print(f"| {name} | {strategy} | {code[0]:.2%} | {code[1]:.1f} | {exact[0]:.2%} "
                  f"| {exact[1]:.1f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
