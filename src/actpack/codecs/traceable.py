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
    big = min(torch.finfo(dtype).max, torch.finfo(torch.float32).max)  # (float64: a no-op)
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


#: fp16's largest finite value is 65504 (< 2^16): scaled values stay at most
#: 2^15, a factor of two below it, so that an error of one unit in the
#: computed ``log2`` of the largest magnitude cannot overflow.
_HALF_TOP = 14


def half_scaled(x: Tensor) -> tuple[Tensor, Tensor]:
    """``x`` (fp32) as fp16 values and one power-of-two fp32 scale: ``x ~ data * scale``.

    ``scale`` is ``2 ** e`` (a 0-d fp32 tensor, built from its exponent bits:
    exactly a power of two) with ``e = ceil(log2(amax)) - 14`` clamped to
    [-126, 127], ``amax`` the largest finite ``|x|``; so the finite
    ``x / scale`` (exact: a division by a power of two) lie in
    [-2^15, 2^15] (even if ``log2`` is off by one unit) and never overflow
    fp16, and the largest are in fp16's normal range.  Rounding to nearest
    fp16 then errs by at most ``2^-11 |x|`` for ``|x| >= 2^-14 scale`` and by
    ``2^-25 scale <= 2^-37 amax`` below (subnormals): per element
    ``|decoded - x| <= 2^-11 |x| + 2^-25 scale``.  Infinities and NaNs are
    kept as they are (a finite value never becomes non-finite, except within
    ``2^-11`` of fp32's largest value).  ``amax = 0`` gives ``scale = 2^-126``.

    Plain tensor ops, no host read: traceable into compiled graphs, and no
    synchronisation on CUDA.  Raises nothing; ``x`` of another dtype is
    coded the same way (the bounds above are for fp32).
    """
    finite = torch.where(
        torch.isfinite(x), x.abs(), torch.zeros((), dtype=x.dtype, device=x.device)
    )
    amax = finite.amax() if x.numel() else x.new_zeros(())
    exponent = (torch.ceil(torch.log2(amax.float())) - _HALF_TOP).clamp(-126, 127)
    # Biased exponent bits of an fp32 number with a zero mantissa: 2**e exactly.
    scale = ((exponent.to(torch.int32) + 127) << 23).view(torch.float32)
    return (x / scale).to(torch.float16), scale


def half_scaled_on_host(x: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`half_scaled` for a CPU fp32 ``x`` outside a traced graph: the
    same ``data`` and ``scale``, bit for bit, from one reduction and a few 0-d
    ops instead of 15 ops, five of them over all of ``x``.

    On the CPU reading a value on the host synchronises nothing: the largest
    ``|x|`` (from ``aminmax``: one vectorised pass and no full-size
    temporary; NaN if any element is) is read, and where it is finite, so is
    every element, which makes it the largest finite ``|x|`` that
    :func:`half_scaled` finds with ``isfinite`` (not vectorised on the CPU),
    ``abs`` and ``where``.  Its exponent comes from the same float32
    ``log2`` and ``ceil``; the division by ``2 ** e`` becomes the product
    with ``2 ** -e`` (both exact powers of two in fp32's normal range,
    since ``-126 <= e <= 114`` for fp32: the same rounded quotient).
    Non-finite ``x``, other dtypes and devices, and empty tensors take
    :func:`half_scaled` itself.  Its effect on a step: ``actpack bench
    --model gpt --size tiny`` (BENCHMARKS.md, "CPU step time", round 6).
    """
    if (
        x.device.type != "cpu"
        or x.dtype is not torch.float32
        or not x.numel()
        or torch.compiler.is_compiling()
    ):
        return half_scaled(x)
    low, high = torch.aminmax(x)  # NaN if any element is NaN
    amax = torch.maximum(high, low.neg())
    if not math.isfinite(amax.item()):
        return half_scaled(x)
    exponent = torch.log2(amax).ceil_().item()
    e = int(min(max(exponent - _HALF_TOP, -126.0), 127.0))  # exponent -inf: amax = 0
    scale = torch.tensor(2.0**e, dtype=torch.float32)
    return x.mul(2.0**-e).to(torch.float16), scale


def half_unscaled(data: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """Inverse of :func:`half_scaled`: ``data * scale`` in ``dtype`` (exact in fp32:
    a product with a power of two)."""
    return (data.to(torch.float32) * scale).to(dtype)
