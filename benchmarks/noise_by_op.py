"""Which saved tensors make 2-bit ActNN's gradient noise, on a built-in model.

Trains the model briefly on Fashion-MNIST (so attention and activations are
not at their initial state), then measures with :func:`actpack.gradient_noise`
the relative gradient bias and variance of ``"actnn"`` and of ``"actnn"`` with
the tensors saved by one op kind kept exact, for each op kind in turn.  The
drop in variance when an op kind is kept exact is its share of the noise.

Run from the repository root::

    PYTHONPATH=src python benchmarks/noise_by_op.py --model vit --size tiny
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

import actpack
from actpack.codecs.encoded import Copy
from actpack.tools.data import load_fashion_mnist
from actpack.tools.models import build_model


class KeepExact(actpack.ActNN):
    """2-bit ActNN, except tensors saved by the ops in ``ops`` are kept exact."""

    def __init__(self, ops: set[str], seed: int = 0) -> None:
        super().__init__(seed=seed)
        self.ops = ops

    def encode(self, x, info):
        if info.op in self.ops:
            return Copy(x.clone())
        return super().encode(x, info)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit", choices=("vit", "resnet"))
    p.add_argument("--size", default="tiny")
    p.add_argument("--steps", type=int, default=30, help="training steps before measuring")
    p.add_argument("--draws", type=int, default=8)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model, _ = build_model(args.model, args.size)
    tx, ty, _, _ = load_fashion_mnist(subset=2000)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    for _ in range(args.steps):
        idx = torch.randint(0, len(tx), (128,))
        loss = F.cross_entropy(model(tx[idx]), ty[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, y = tx[:128].clone(), ty[:128].clone()

    def loss_fn(out):
        return F.cross_entropy(out, y)

    report = actpack.measure(model, x, strategy="actnn", loss_fn=loss_fn)
    base = actpack.gradient_noise(model, x, strategy="actnn", draws=args.draws, loss_fn=loss_fn)
    print(f"{args.model}-{args.size}, batch 128 after {args.steps} AdamW steps, "
          f"{args.draws} draws; bias and variance relative to |exact gradient|^2")  # fmt: skip
    print()
    print("| kept exact | saved by it (KiB, exact -> actnn) | gradient bias | gradient variance |")
    print("|---|---:|---:|---:|")
    print(f"| nothing (actnn) | | {base.bias:.4f} | {base.variance:.4f} |")
    for op, (before, after) in report.ops.items():
        rep = actpack.gradient_noise(
            model, x, strategy=KeepExact({op}), draws=args.draws, loss_fn=loss_fn
        )
        print(
            f"| {op} | {before / 1024:.0f} -> {after / 1024:.0f} | {rep.bias:.4f} | "
            f"{rep.variance:.4f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
