"""Probes and bitwise comparisons for the per-configuration check of
:func:`actpack.codecs.compiled.build.run` (``check=``).

Each compiled configuration is verified once per process against the
reference codecs on a small probe before its first result is used: the
probe is built to take the same configuration (dtypes, flags, layout class)
and holds the cases where a compiler's numerics could part from the
reference's: values exactly between two grid points (ties, so a reciprocal
or a contracted multiply-add shows), ranges that bfloat16/float16 do not
represent (the outward rounding), subnormals, ranges beyond float32 (the
``k = 0.5`` path) and beyond float16 (saturation), constant groups, signed
zeros, NaN and infinities (poisoned groups), and a tail group.  It costs
one reference and one compiled call on a few hundred elements, beside the
compile the configuration needs anyway: each codec's probe keeps the shape
facts Inductor specialises on (groups of more than one vector, whole blocks,
whole words of codes), so the standalone artifact compiled for the probe is
the one that serves the real saves, not a second compile (see
:func:`~actpack.codecs.compiled.build._verify`).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["hard_groups", "same_bits", "same_bounds"]

_INT_OF = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}


def same_bits(a: Tensor, b: Tensor) -> bool:
    """Bit-identical tensors (NaN payloads and signed zeros included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    ia = a.contiguous().view(_INT_OF[a.element_size()])
    return bool(torch.equal(ia, b.contiguous().view(_INT_OF[b.element_size()])))


def same_values(a: Tensor, b: Tensor) -> bool:
    """Bit-identical floating-point tensors but for the bits of a NaN (a NaN
    must meet a NaN): how a NaN converts to a 16-bit dtype differs between
    vectorized and scalar code, in ATen (``0xffff``) as in Inductor's tails
    (``0x7fc0``), so no two implementations agree on it."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    nan = torch.isnan(a)
    if not torch.equal(nan, torch.isnan(b)):
        return False
    return same_bits(a.masked_fill(nan, 0), b.masked_fill(nan, 0))


def same_bounds(a: Tensor, b: Tensor) -> bool:
    """Bit-identical group bounds but for the sign of a zero (either decodes
    alike; Inductor compiles with ``-fno-signed-zeros``)."""
    return a.dtype == b.dtype and same_bits(a + 0.0, b + 0.0)


def hard_groups(group_size: int, levels: int, seed: int = 0) -> Tensor:
    """(12, group_size) float32, one hard case per group (see the module notes)."""
    gen = torch.Generator().manual_seed(seed)
    n = group_size

    def randn(scale: float = 1.0, shift: float = 0.0) -> Tensor:
        return torch.randn(n, generator=gen) * scale + shift

    # Ties: lo, hi exact in every meta dtype, values at the midpoints of the
    # grid (and their float32 neighbours, which must round apart).
    lo, hi = -1.25, 2.5
    mids = lo + (torch.arange(n) % levels + 0.5) * ((hi - lo) / levels)
    mids[1::3] = torch.nextafter(mids[1::3], torch.tensor(hi))
    mids[2::3] = torch.nextafter(mids[2::3], torch.tensor(lo))
    ties = mids.float()
    ties[0], ties[-1] = lo, hi
    huge = randn(1e37)
    huge[0], huge[-1] = -3.3e38, 3.3e38  # hi - lo overflows float32: k = 0.5
    zeros = torch.zeros(n)
    zeros[::2] = -0.0
    zeros[-1] = 2e-45
    nan, pos, neg = randn(), randn(), randn()
    nan[n // 2] = float("nan")
    pos[0] = float("inf")
    neg[-1] = -float("inf")
    groups = [
        randn(3.0, 1.0),
        randn(0.1, 0.3),  # bounds between bfloat16/float16 values
        ties,
        randn(1e-40),  # subnormal
        huge,
        randn(1e5),  # beyond float16: saturates at 65504
        torch.full((n,), 1.5),  # constant: step 0
        zeros,
        nan,
        pos,
        neg,
        randn(1.0, -7.0),
    ]
    return torch.stack(groups)
