"""Codecs written as plain tensor ops, so that AOTAutograd can trace them into graphs.

Stochastic rounding here draws its ``u`` from the counter-based hash of
:mod:`actpack.codecs.counter_noise` (a compiled graph cannot call
``torch.rand`` with a ``torch.Generator``).  With the same ``u`` the codes are
those of the reference codec (:func:`actpack.codecs.groupquant.quantize_groups`),
which decodes them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from actpack.codecs import counter_noise, groupquant
from actpack.codecs.groupquant import _NEG_INF, _POS_INF, GroupCode
from actpack.codecs.pack import pack_bits, unpack_bits

random_key = counter_noise.random_key


def hash_uniform(numel: int, key: Tensor) -> Tensor:
    """``numel`` float32 values in [0, 1): :func:`actpack.codecs.counter_noise.uniform`
    of the indices ``0 .. numel-1``.

    ``key``: an integer tensor of shape (2,) (see :func:`random_key`); the
    values lie on its device.  Raises ValueError for any other ``key``.
    """
    counter_noise.check_key(key)
    return counter_noise.uniform(torch.arange(numel, device=key.device, dtype=torch.int64), key)


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
