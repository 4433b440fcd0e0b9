"""Codecs written as plain tensor ops, so that AOTAutograd can trace them into graphs.

Compiled graphs cannot call ``torch.rand`` with a ``torch.Generator`` (Inductor
refuses to lower a random op it did not place itself unless
``torch._inductor.config.fallback_random`` is set, which changes the random
stream of the whole program).  Stochastic rounding here draws its ``u`` from a
counter-based hash of the element index and a random key instead: a few
integer ops that trace, fuse into the quantization kernel and need no RNG
state.  With the same ``u`` the codes are those of the reference codec
(:func:`actpack.codecs.groupquant.quantize_groups`), which decodes them.

The hash is a keyed multiply-xorshift permutation of 32-bit words (the
structure of MurmurHash3's finalizer, with the key mixed into the first two
rounds).  Multipliers stay below 2**31 so that no product of a 32-bit word
leaves int64 (signed overflow is undefined in the C++ Inductor emits), and the
whole hash stays under Inductor's CPU threshold for inlining (50 ops), so it is
computed inside the quantization kernel rather than stored.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from actpack.codecs import groupquant
from actpack.codecs.groupquant import _NEG_INF, _POS_INF, GroupCode
from actpack.codecs.pack import pack_bits, unpack_bits

_MASK32 = 0xFFFFFFFF
# Odd multipliers below 2**31 with mixed bit patterns (any odd one is a bijection).
_C1, _C2, _C3 = 0x7FEB352D, 0x297A2D39, 0x2C1B3C6D


def random_key(generator: torch.Generator | None = None, device: torch.device | str = "cpu"):
    """A key for :func:`hash_uniform`: int64 tensor of shape (2,), two random 32-bit words."""
    return torch.randint(0, 1 << 32, (2,), generator=generator, dtype=torch.int64, device=device)


def hash_uniform(numel: int, key: Tensor) -> Tensor:
    """``numel`` float32 values in [0, 1), a function of (element index, ``key``).

    ``key``: an integer tensor of two elements, each a uniformly random 32-bit
    word (see :func:`random_key`; only their low 32 bits are read).  The values
    lie on ``key``'s device, 24 random bits each (every value exactly
    representable in float32).  Raises ValueError for any other ``key``.
    """
    if key.shape != (2,) or key.is_floating_point() or key.is_complex():
        raise ValueError(
            f"key must be an integer tensor of shape (2,), got {key.dtype} of shape "
            f"{tuple(key.shape)}; make one with actpack.codecs.traceable.random_key()"
        )
    k = key.to(torch.int64) & _MASK32
    i = torch.arange(numel, device=key.device, dtype=torch.int64)
    h = ((i & _MASK32) ^ k[0]) * _C1 & _MASK32
    h = h ^ (h >> 15)
    h = (h ^ k[1] ^ (i >> 32)) * _C2 & _MASK32
    h = h ^ (h >> 13)
    h = h * _C3 & _MASK32
    h = h ^ (h >> 16)
    return (h >> 8).to(torch.float32) * (1.0 / (1 << 24))


def quantize_groups(
    x: Tensor,
    bits: int,
    group_size: int,
    key: Tensor | None,
    *,
    zero_exact: bool = False,
    meta_dtype: torch.dtype = torch.bfloat16,
) -> GroupCode:
    """:func:`actpack.codecs.groupquant.quantize_groups` with ``u`` from :func:`hash_uniform`.

    ``x``: 2-D (rows, cols) floating point.  ``key=None`` rounds to nearest
    (then the code is the reference's, bit for bit); otherwise rounding is
    stochastic and unbiased over random keys (:func:`random_key`).  Same errors as the reference.
    """
    noise = None
    if key is not None:
        ngroups = -(-x.shape[-1] // group_size) if x.dim() == 2 else 0
        noise = hash_uniform(x.shape[0] * ngroups * group_size, key)
    return groupquant.quantize_groups(
        x,
        bits,
        group_size,
        stochastic=key is not None,
        zero_exact=zero_exact,
        meta_dtype=meta_dtype,
        noise=noise,
    )


def dequantize_groups(code: GroupCode, dtype: torch.dtype = torch.float32) -> Tensor:
    """:func:`actpack.codecs.groupquant.dequantize_groups`, bit for bit, in ops Inductor
    vectorises on the CPU.

    Its generated C++ runs a loop element by element when one step in it
    cannot be vectorised: ``isnan``/``isfinite`` (here ``x != x`` and
    ``|x| < inf``), comparisons of uint8 codes (here of their float values)
    and a division by the per-group pre-scale ``k`` (here a product with
    ``1/k``, exact since ``k`` is 1 or 1/2).  That halves the decode time of
    the reference's formulation on this CPU.
    """
    rows, ngroups, gs = code.rows, code.ngroups, code.group_size
    q = unpack_bits(code.packed, code.bits, rows * ngroups * gs).view(rows, ngroups, gs)
    qf = q.float()
    lo, hi = code.lo.float().unsqueeze(-1), code.hi.float().unsqueeze(-1)
    levels = (1 << code.bits) - 1
    values = qf
    if code.zero_exact:
        levels -= 1
        values = (qf - 1).clamp_min(0)
    k = torch.where((hi - lo).abs() < math.inf, 1.0, 0.5)  # as groupquant._scale
    lok = lo * k
    step = (hi * k - lok) / levels
    v = (lok + values * step) * (1 / k)
    big = torch.finfo(dtype).max
    v = v.clamp(-big, big).to(dtype)
    if code.zero_exact:
        v = torch.where(qf > 0, v.clamp_min(torch.finfo(dtype).tiny), torch.zeros_like(v))
    bad = torch.full_like(v, math.nan)
    if code.bits >= 2:
        bad = torch.where(qf == _POS_INF, math.inf, torch.where(qf == _NEG_INF, -math.inf, bad))
    v = torch.where(lo != lo, bad, v)  # NaN lo: a poisoned group
    return v.reshape(rows, ngroups * gs)[:, : code.cols].contiguous()


def pack_mask(mask: Tensor) -> Tensor:
    """A bool tensor as 1 bit per element (1-D uint8), traceable."""
    return pack_bits(mask.reshape(-1).to(torch.uint8), 1)


def unpack_mask(packed: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Inverse of :func:`pack_mask`."""
    numel = 1
    for n in shape:
        numel = numel * n
    return unpack_bits(packed, 1, numel).view(shape).bool()
