"""The reference codecs' arithmetic, written for Inductor to vectorise.

Every function here computes what a step of :mod:`actpack.codecs.groupquant`
computes, bit for bit, and is traced inside the compiled codec bodies of
:mod:`actpack.codecs.compiled.groupquant` and :mod:`~.division`.  What
differs is only how: Inductor's CPU code generator vectorises a loop only if
every step in it does, so

* finiteness is ``|x| < inf`` and NaN is ``x != x`` (``torch.isnan`` and
  ``torch.isfinite`` on float32 are emitted element by element);
* classes and codes are compared as float32: uint8 comparison masks are
  converted to float masks element by element (measured 40x slower);
* no int16 arithmetic: Inductor does not vectorise int16, and one int16 step
  would keep a whole fused loop scalar (see :func:`round_out`);
* ``levels`` is a 0-d float32 tensor, not a constant, so one compiled body
  serves every bit width from 2 to 8.

Group ranges are returned from the compiled bodies rather than kept inside:
Inductor stores an output once, but recomputes an inner value in every
iteration of the loop that reads it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from actpack.codecs.groupquant import _round_out, _scale

__all__ = [
    "canonical_nan_",
    "dequantize_values",
    "finish_ranges_",
    "group_codes",
    "group_ranges",
    "poisoned_values",
    "round_out",
]


def round_out(v: Tensor, meta: torch.dtype, down: bool) -> Tensor:
    """The reference's ``_round_out`` (float32 ``v`` to ``meta``, outwards)
    with int32 instead of int16 patterns.

    bfloat16 values are the upper halves of float32 patterns, so one bfloat16
    ulp outwards is +-2**16 on the float32 pattern read as int32 (the sign bit
    makes a negative value's int32 smaller, and adding still grows its
    magnitude).  Zero moves to the smallest subnormal of the right sign.
    float16 keeps the reference (its patterns are not float32 halves).
    """
    if meta != torch.bfloat16:
        return _round_out(v, meta, down)
    m = v.to(torch.bfloat16).float()
    pattern = m.view(torch.int32)
    if down:
        off = m > v
        moved = torch.where(m < 0, pattern + 65536, pattern - 65536)
        moved = torch.where(m == 0, -2147418112, moved)  # 0x80010000: -smallest subnormal
    else:
        off = m < v
        moved = torch.where(m > 0, pattern + 65536, pattern - 65536)
        moved = torch.where(m == 0, 65536, moved)  # 0x00010000: +smallest subnormal
    out = torch.where(off, moved.view(torch.float32), m)
    big = torch.finfo(torch.bfloat16).max
    return out.clamp(-big, big).to(torch.bfloat16)


def group_ranges(g: Tensor, meta: torch.dtype, zero_exact: bool, dims=(-1,)):
    """(lo, hi, poisoned) of float32 ``g`` reduced over ``dims`` (kept, size 1).

    The reference's statistics: lo/hi in ``meta``, rounded outwards, not yet
    marked poisoned (:func:`finish_ranges_`).
    """
    finite = g.abs() < math.inf
    poisoned = ~finite.all(dim=dims, keepdim=True)
    g = torch.where(finite, g, 0.0)
    if zero_exact:
        gmin = torch.where(g > 0, g, math.inf).amin(dim=dims, keepdim=True)
        gmin = torch.where(gmin < math.inf, gmin, 0.0)  # no positive value
    else:
        gmin = g.amin(dim=dims, keepdim=True)
    gmax = g.amax(dim=dims, keepdim=True)
    return round_out(gmin, meta, down=True), round_out(gmax, meta, down=False), poisoned


def group_codes(g, lo, hi, poisoned, u, levels: Tensor, wide: bool, zero_exact: bool) -> Tensor:
    """uint8 codes of float32 ``g`` against its group's grid (classes if poisoned).

    ``u``: the rounding offset (0.5, or uniform noise); ``wide``: bits >= 2
    (classes NaN/+Inf/-Inf, else one non-finite class).
    """
    k, lok, step = _scale(lo.float(), hi.float(), levels)
    finite = g.abs() < math.inf
    v = torch.where(finite, g, 0.0)
    # Divide rather than multiply by 1/step: a subnormal step would make 1/step Inf.
    t = torch.where(step > 0, (v * k - lok) / step, 0.0)
    q = torch.minimum(torch.floor(t + u).clamp_min(0), levels)
    if zero_exact:
        q = torch.where(v > 0, q + 1, 0.0)
    if wide:  # 1 NaN, 2 +Inf, 3 -Inf
        cls = torch.where(g != g, 1.0, torch.where(g > 0, 2.0, 3.0))
    else:
        cls = torch.ones_like(g)
    cls = torch.where(finite, 0.0, cls)
    return torch.where(poisoned, cls, q).to(torch.uint8)


def dequantize_values(q, lo, hi, levels: Tensor, zero_exact: bool) -> Tensor:
    """float32 grid values of uint8 codes ``q`` for per-group lo/hi (meta dtype)."""
    qf = q.float()
    if zero_exact:
        qf = (qf - 1).clamp_min(0)
    k, lok, step = _scale(lo.float(), hi.float(), levels)
    # Divide by k last: lo*k + q*step stays finite even when hi - lo overflows.
    return (lok + qf * step) / k


def poisoned_values(q: Tensor, wide: bool, dtype: torch.dtype) -> Tensor:
    """Decoded values of a poisoned group's classes, in ``dtype``."""
    nan = torch.full((), math.nan, dtype=dtype, device=q.device)
    if not wide:
        return nan
    qf = q.float()
    return torch.where(qf == 2, math.inf, torch.where(qf == 3, -math.inf, nan)).to(dtype)


def finish_ranges_(lo: Tensor, hi: Tensor, poisoned: Tensor) -> None:
    """Mark poisoned groups in place, as stored: NaN lo, zero hi.

    Eager, on the small range tensors: ``masked_fill_`` writes the dtype's
    canonical NaN (see :func:`canonical_nan_`).
    """
    lo.masked_fill_(poisoned, math.nan)
    hi.masked_fill_(poisoned, 0.0)


def canonical_nan_(t: Tensor, may_hold_nan: Tensor) -> Tensor:
    """Write every NaN of ``t`` as its dtype's canonical quiet NaN, in place.

    What ``torch.full(..., nan)`` writes (bfloat16 0x7FC0, float16 0x7E00) and
    so what the reference stores; a vectorised float32 -> bfloat16 cast on the
    CPU gives 0xFFFF instead.  Eager, after the compiled body: bit patterns
    need int16 arithmetic.  ``may_hold_nan`` (the group ranges: NaN only arises
    in poisoned groups) skips the pass when nothing is poisoned.
    """
    if t.dtype in (torch.bfloat16, torch.float16) and bool(torch.isnan(may_hold_nan).any()):
        t.masked_fill_(torch.isnan(t), math.nan)
    return t
