"""Bias of a shared code where one gradient term multiplies two reads of it.

actpack codes a saved tensor once for every op that saves it, unless the
saving op's other operand was computed from it (``actpack.engine.rereads``):
a cube written as products (``h * h * h``: ``d/dh = 3 h^2``) would otherwise
be a product of one code with itself, E[code * code] = h^2 + variance, a
bias that averaging draws does not remove.  ``h.pow(3)`` keeps ``h`` exact
(pow's backward is not linear).

Compiled graphs save ``h`` once for their whole backward, which reads it in
both operands of a product: there ``h`` is kept exact
(``graphreads.backward_reads``; before, one code served both reads).

For each form, eagerly and under ``torch.compile`` (Inductor), the relative
error of the mean of K draws of the first Linear's weight gradient under
``"actnn"`` (one thread, CPU, fixed seeds): an unbiased code falls like
1/sqrt(K), a biased one levels off (eager, before the second save got a
code of its own: 0.25 at K=256).

    python benchmarks/self_product_bias.py
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

import actpack


class Cube(nn.Module):
    def __init__(self, by_products: bool) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.a, self.b = nn.Linear(64, 256), nn.Linear(256, 64)
        self.by_products = by_products

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        return self.b(h * h * h if self.by_products else h.pow(3))


def main() -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    x, w = torch.randn(64, 64), torch.randn(64, 64)
    for mode in ("eager", "compiled"):
        for by_products in (True, False):
            model = Cube(by_products)
            run = torch.compile(model) if mode == "compiled" else model

            def grad(ctx, model: Cube = model, run: nn.Module = run) -> torch.Tensor:
                model.zero_grad()
                with ctx:
                    out = run(x)
                (out * w).sum().backward()
                return model.a.weight.grad.clone()

            exact = grad(torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t))
            total, k, row = torch.zeros_like(exact), 0, []
            for target in (1, 4, 16, 64, 256):
                while k < target:
                    total += grad(actpack.compress("actnn"))
                    k += 1
                err = ((total / k - exact).norm() / exact.norm()).item()
                row.append(f"K={target}: {err:.3f}")
            form = "h * h * h" if by_products else "h.pow(3)"
            print(f"{mode:8s} {form:10s} relative error of the mean of K draws: " + ", ".join(row))


if __name__ == "__main__":
    main()
