"""Fused attention's dS cancellation: one draw's gradient error, v/out fp16 or coded.

Usage (from the repository root, actpack installed or ``PYTHONPATH=src``)::

    python benchmarks/attention_cancellation.py            # ~10 s on a 2-core CPU

Self-attention whose keys equal its queries (q = k = 2 * randn, head dim 32,
64 tokens, 2 x 4 heads, largest logit ~47): each row of P is nearly one-hot
on the query's own token.  Fused attention's backward forms
dS = P o (dO v^T - rowsum(dO o out)), whose two terms then cancel.  For each
strategy it prints the relative error (Frobenius norm) of one draw's gradient
of q's leaf (``dq``, query and key together) and of v's leaf (``dv``) against
plain autograd, for

* ``fused``: ``F.scaled_dot_product_attention`` under the policy (q, k, v and
  its output in fp16, ``Kind.HALF``);
* ``fused, v/out coded``: the same with v and the output handed to the
  strategy's code, as before they took the fp16 form (the decision is
  patched: ``Facts.values`` cleared);
* ``matmul+softmax``: the same attention written as ``softmax(q q^T / sqrt(D))
  @ v``, whose saved one-hot P decodes exactly.

One draw each, seed 0 (the errors of single draws vary by ~10-30% with the
seed; the gap between the rows does not).
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

import actpack
import actpack.engine.eager as eager


def _run(fused: bool, strategy: str | None, q0, v0, w, scale: float):
    for t in (q0, v0):
        t.grad = None
    ctx = actpack.compress(strategy) if strategy else None
    if ctx is not None:
        ctx.__enter__()
    try:
        q = q0 * scale
        if fused:
            out = F.scaled_dot_product_attention(q, q, v0 * 1)
        else:
            p = torch.softmax(q @ q.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1)
            out = p @ (v0 * 1)
        loss = (out * w).sum()
    finally:
        if ctx is not None:
            ctx.__exit__(None, None, None)
    loss.backward()
    return q0.grad.clone(), v0.grad.clone()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategies", nargs="+", default=["actnn-rows", "actnn"])
    parser.add_argument("--scale", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    b, h, n, d = 2, 4, 64, 32
    q0 = torch.randn(b, h, n, d, requires_grad=True)
    v0 = torch.randn(b, h, n, d, requires_grad=True)
    w = torch.randn(b, h, n, d)
    with torch.no_grad():
        q = q0 * args.scale
        logits = q @ q.transpose(-1, -2) / math.sqrt(d)
        sharp = (logits.softmax(-1).amax(-1) > 0.99).float().mean().item()
    print(f"largest logit {logits.max().item():.1f}; rows with max P > 0.99: {sharp:.0%}")

    decide = eager.decide

    def coded_values(facts, settings):
        # Before: v and the output were the strategy's to code.
        return decide(facts._replace(values=False), settings)

    print("| strategy | path | dq error | dv error |")
    print("|---|---|---:|---:|")
    for strategy in args.strategies:
        for label, fused, patch in (
            ("fused", True, False),
            ("fused, v/out coded", True, True),
            ("matmul+softmax", False, False),
        ):
            exact = _run(fused, None, q0, v0, w, args.scale)
            torch.manual_seed(args.seed + 1)  # the same draw in every row
            if patch:
                eager.decide = coded_values
            try:
                got = _run(fused, strategy, q0, v0, w, args.scale)
            finally:
                eager.decide = decide
            errs = [float((g - e).norm() / e.norm()) for g, e in zip(got, exact)]
            print(f"| {strategy} | {label} | {errs[0]:.3g} | {errs[1]:.3g} |")


if __name__ == "__main__":
    main()
