"""Correlation of two data-parallel ranks' gradient errors: one stream or rank seeds.

Under ``torch.distributed`` every rank usually runs with the same seed, so a
strategy seeded from it would draw the same rounding noise on every rank.
The codes stay unbiased, but two ranks' gradient errors then correlate, and
the all-reduced gradient's noise variance over N ranks is ``(1 + (N - 1) *
rho) / N`` of one rank's instead of ``1 / N``.  actpack seeds each rank's
generator with ``rank_seed(seed, rank)`` (``actpack.strategies.seeds``).

This script runs both ranks in one process: rank r's strategy is made with
``seed=rank_seed(seed, r)``, which is what rank r's generator is seeded with
in a distributed job; "one stream" gives both ranks the seed itself (what
every rank drew before rank seeds).  Each rank gets its own batch, related to
the other's as stated (independent, correlated: the other's plus noise of the
same size, or the same), as shards of one dataset often are (shared
backgrounds, padding, ReLU zeros).  Printed: the correlation ``rho`` of the
two ranks' gradient errors over ``--draws`` steps, and what it makes of the
noise variance of the gradient averaged over 8 ranks.

Run: ``python benchmarks/bench_rank_noise.py`` (about 3 minutes of CPU time, one thread).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import actpack
from actpack.strategies.seeds import rank_seed

STRATEGIES = {"actnn": actpack.ActNN, "actnn-rows": actpack.RowActNN, "division": actpack.Division}


def _models() -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    torch.manual_seed(0)
    mlp = nn.Sequential(
        nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 256), nn.LayerNorm(256), nn.ReLU(),
        nn.Linear(256, 64),
    )  # fmt: skip
    cnn = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.Flatten(),
        nn.Linear(32 * 14 * 14, 10),
    )  # fmt: skip
    return {"mlp": (mlp, (32, 64)), "cnn": (cnn, (32, 1, 28, 28))}


def _grads(model: nn.Module, x: torch.Tensor, strategy=None) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    if strategy is None:
        model(x).square().mean().backward()
    else:
        with actpack.compress(strategy, min_numel=1):
            model(x).square().mean().backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def correlation(model: nn.Module, xs, make, seeds, draws: int) -> float:
    """Correlation of the two ranks' gradient errors over ``draws`` steps."""
    exact = [_grads(model, x) for x in xs]
    strategies = [make(seed=s) for s in seeds]
    num = den0 = den1 = 0.0
    for _ in range(draws):
        e0, e1 = (_grads(model, x, s) - g for x, s, g in zip(xs, strategies, exact))
        num += float(e0 @ e1)
        den0 += float(e0 @ e0)
        den1 += float(e1 @ e1)
    return num / (den0 * den1) ** 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=20)
    parser.add_argument("--seed", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| model | data of the two ranks | strategy | rho, one stream | rho, rank seeds "
          "| 8-rank noise variance, one stream / rank seeds |")  # fmt: skip
    print("|---|---|---|---:|---:|---:|")
    for name, (model, shape) in _models().items():
        for data in ("independent", "correlated", "same"):
            torch.manual_seed(1)
            x0 = torch.randn(shape)
            x1 = {"independent": torch.randn(shape), "correlated": x0 + torch.randn(shape),
                  "same": x0}[data]  # fmt: skip
            for label, make in STRATEGIES.items():
                one = correlation(model, (x0, x1), make, (args.seed, args.seed), args.draws)
                own = correlation(
                    model, (x0, x1), make, (rank_seed(args.seed, 0), rank_seed(args.seed, 1)),
                    args.draws,
                )  # fmt: skip
                # Variance of the mean of 8 ranks' errors, relative to one rank's.
                var = [(1 + 7 * r) / 8 for r in (one, own)]
                print(f"| {name} | {data} | {label} | {one:.3f} | {own:.3f} "
                      f"| {var[0]:.3f} / {var[1]:.3f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
