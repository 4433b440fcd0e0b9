"""Host-side bit allocation for ActNN mixed precision.

:func:`allocate_bits` minimises ``sum_k sum_n S[k][n] / L(b[k][n])**2`` (the
modelled gradient variance, see :mod:`actpack.strategies.mixed`) subject to ``sum b * D
<= budget * sum D`` (``D`` elements per row), bits in ``min_bits..max_bits``.
The cost of each row is convex in its bits, so the greedy choice of the
increments with the largest variance reduction per bit is optimal for the
bits it uses (a Lagrangian solution); it is then topped up with increments
that still fit.  When all rows weigh the same, this is the exact optimum;
otherwise ``method="exact"`` (chosen automatically for small problems) solves
the knapsack over layers exactly by dynamic programming.

It runs on CPU tensors, once per refresh of :class:`~actpack.ActNNMixed`,
never on the save path.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from actpack.strategies.actnn import check_bits, check_int, check_real

__all__ = ["MAX_BITS", "Allocation", "allocate_bits"]

#: Widest code an allocation may give.
MAX_BITS = 8


def _cost(bits: int, zero_exact: bool) -> float:
    levels = (1 << bits) - 1 - int(zero_exact)
    return 1.0 / (levels * levels)


@dataclass(frozen=True)
class Allocation:
    """Result of :func:`allocate_bits`.

    ``bits[k][n]`` is the width of row ``n`` of layer ``k`` (``elements[k]``
    elements per row); ``used_bits`` the code bits spent (``sum bits *
    elements``), never more than ``capacity_bits = floor(budget * sum
    elements)``; ``cost`` the modelled variance ``sum S / L(b)**2``.
    ``feasible`` is False when even the minimum widths exceed the budget
    (every row then gets its minimum).
    """

    bits: list[Tensor]
    elements: list[int]
    used_bits: int
    capacity_bits: int
    cost: float
    method: str
    feasible: bool = True

    @property
    def average_bits(self) -> float:
        total = sum(b.numel() * d for b, d in zip(self.bits, self.elements))
        return self.used_bits / total if total else 0.0


def _as_list(value: Any, n: int, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries for {n} layers")
        return list(value)
    return [value] * n


def allocate_bits(
    sensitivity: Sequence[Any],
    elements: Sequence[int],
    budget: float,
    *,
    min_bits: int | Sequence[int] = 1,
    max_bits: int = MAX_BITS,
    zero_exact: bool | Sequence[bool] = False,
    method: str = "auto",
) -> Allocation:
    """Bits per row minimising ``sum_k sum_n S[k][n] / L(b)**2`` under a budget.

    Args:
        sensitivity: per layer, the sensitivities ``S`` of its rows (>= 0).
        elements: per layer, the elements ``D`` of one row (its weight).
        budget: average code bits per element; the bits used never exceed
            ``floor(budget * sum_k rows_k * D_k)``.
        min_bits, max_bits: allowed widths (``min_bits`` may differ per layer).
        zero_exact: per layer, whether code 0 is reserved for exact zeros
            (``L = 2**b - 2``; needs at least 2 bits).
        method: ``"greedy"`` (Lagrangian greedy plus top-up, exact when all
            rows weigh the same), ``"exact"`` (dynamic programming over
            layers, exact for any weights) or ``"auto"`` (exact when cheap).

    Increments with no variance reduction (``S = 0``) are never bought, so
    the budget is only fully spent when there is something to gain.
    """
    if method not in ("auto", "greedy", "exact"):
        raise ValueError(f"method must be 'auto', 'greedy' or 'exact', got {method!r}")
    n_layers = len(sensitivity)
    if len(elements) != n_layers:
        raise ValueError("sensitivity and elements must have one entry per layer")
    # Plain ints and floats (NumPy scalars, 0-d tensors); 2.5 bits is no width.
    max_bits = check_bits(max_bits, "max_bits")
    budget = check_real("budget", budget)
    zex = [bool(z) for z in _as_list(zero_exact, n_layers, "zero_exact")]
    lows = [
        max(check_bits(b, "min_bits"), 2 if z else 1)
        for b, z in zip(_as_list(min_bits, n_layers, "min_bits"), zex)
    ]
    if any(lo > max_bits for lo in lows):
        raise ValueError(f"min_bits exceeds max_bits={max_bits} for some layer")
    sens = []
    for s in sensitivity:
        t = torch.as_tensor(s, dtype=torch.float64).reshape(-1)
        sens.append(torch.where(torch.isfinite(t), t, 0.0).clamp_min(0.0))
    weights = [check_int("elements", d, 1) for d in elements]

    total = sum(s.numel() * d for s, d in zip(sens, weights))
    capacity = math.floor(round(budget * total, 6))
    base = sum(s.numel() * d * lo for s, d, lo in zip(sens, weights, lows))
    avail = capacity - base

    # Increments b-1 -> b of every row, row-major with b ascending, so that a
    # stable sort keeps each row's increments in order.
    gains = []
    for s, lo, z in zip(sens, lows, zex):
        steps = torch.tensor(
            [_cost(b - 1, z) - _cost(b, z) for b in range(lo + 1, max_bits + 1)],
            dtype=torch.float64,
        )
        gains.append(s.unsqueeze(1) * steps.unsqueeze(0))  # (rows, max - lo)

    def result(taken_per_layer: list[Tensor], name: str, feasible: bool = True) -> Allocation:
        bits = [lo + t for lo, t in zip(lows, taken_per_layer)]
        used = sum(int(b.sum()) * d for b, d in zip(bits, weights))
        cost = 0.0
        for s, b, z, lo in zip(sens, bits, zex, lows):
            table = torch.tensor(
                [_cost(v, z) if v >= lo else math.inf for v in range(max_bits + 1)],
                dtype=torch.float64,
            )
            cost += float((s * table[b]).sum())
        return Allocation(bits, weights, used, capacity, cost, name, feasible)

    if avail < 0:
        return result([torch.zeros(s.numel(), dtype=torch.int64) for s in sens], "minimum", False)
    if sum(g.numel() for g in gains) == 0:
        return result([torch.zeros(s.numel(), dtype=torch.int64) for s in sens], "trivial")

    if method == "auto":
        unit = math.gcd(*weights) if weights else 1
        increments = sum(g.numel() for g in gains)
        work = increments * (avail // unit + 1)
        equal = len(set(weights)) <= 1
        method = "exact" if (not equal and increments <= 4000 and work <= 2e7) else "greedy"
    if method == "exact":
        return result(_exact(gains, weights, avail), "exact")
    return result(_greedy(gains, weights, avail), "greedy")


def _greedy(gains: list[Tensor], weights: list[int], avail: int) -> list[Tensor]:
    flat = torch.cat([g.reshape(-1) for g in gains])
    w = torch.cat(
        [torch.full((g.numel(),), float(d), dtype=torch.float64) for g, d in zip(gains, weights)]
    )
    row = torch.cat(
        [
            torch.arange(g.shape[0]).repeat_interleave(g.shape[1]) + off
            for g, off in zip(gains, _offsets([g.shape[0] for g in gains]))
        ]
    )
    useful = flat > 0
    order = torch.sort(-(flat / w), stable=True).indices
    order = order[useful[order]]
    cum = torch.cumsum(w[order], 0)
    prefix = int((cum <= avail).sum())
    taken = torch.zeros(flat.numel(), dtype=torch.bool)
    taken[order[:prefix]] = True
    left = avail - (int(cum[prefix - 1]) if prefix else 0)
    lightest = min(weights)
    if prefix < order.numel() and left >= lightest:
        # Top-up: later increments that still fit, keeping each row's
        # increments in order (a row is closed once one of them is skipped).
        closed: set[int] = set()
        rows, ws = row.tolist(), w.tolist()
        for i in order[prefix:].tolist():
            r = rows[i]
            if r in closed:
                continue
            if ws[i] <= left:
                taken[i] = True
                left -= int(ws[i])
                if left < lightest:
                    break
            else:
                closed.add(r)
    out, start = [], 0
    for g in gains:
        n = g.numel()
        out.append(taken[start : start + n].view(g.shape).sum(1).to(torch.int64))
        start += n
    return out


def _offsets(sizes: list[int]) -> list[int]:
    out, acc = [], 0
    for s in sizes:
        out.append(acc)
        acc += s
    return out


def _within_layer(g: Tensor, m: int) -> Tensor:
    """Increments per row when layer ``g`` (rows, steps) buys its ``m`` best ones."""
    flat = g.reshape(-1)
    order = torch.sort(-flat, stable=True).indices[:m]
    taken = torch.zeros(flat.numel(), dtype=torch.bool)
    taken[order] = True
    return taken.view(g.shape).sum(1).to(torch.int64)


def _exact(gains: list[Tensor], weights: list[int], avail: int) -> list[Tensor]:
    # Within a layer all rows weigh the same and costs are convex, so the best
    # m increments of a layer are its m largest gains; across layers, a
    # knapsack over units of gcd(weights) solved by dynamic programming.
    unit = math.gcd(*weights)
    cap = avail // unit
    best = torch.zeros(cap + 1, dtype=torch.float64)  # max gain with <= c units
    choices = []
    for g, d in zip(gains, weights):
        useful = g.reshape(-1)[g.reshape(-1) > 0]
        cum = torch.cat(
            [
                torch.zeros(1, dtype=torch.float64),
                torch.sort(useful, descending=True).values.cumsum(0),
            ]
        )
        w = d // unit
        new = best.clone()
        arg = torch.zeros(cap + 1, dtype=torch.int64)
        for m in range(1, cum.numel()):
            shift = m * w
            if shift > cap:
                break
            cand = best[: cap + 1 - shift] + cum[m]
            better = cand > new[shift:]
            new[shift:] = torch.where(better, cand, new[shift:])
            arg[shift:] = torch.where(better, m, arg[shift:])
        best = new
        choices.append(arg)
    counts = [0] * len(gains)
    c = cap
    for k in range(len(gains) - 1, -1, -1):
        counts[k] = int(choices[k][c])
        c -= counts[k] * (weights[k] // unit)
    return [_within_layer(g, m) for g, m in zip(gains, counts)]
