"""ActNN per-group quantization of a 2-D matrix, unbiased and non-finite safe.

Each row is cut into groups of ``group_size`` contiguous elements.  A group
stores its range ``[lo, hi]`` in ``meta_dtype`` (rounded outwards so the grid
covers every value) and one ``bits``-bit code per element.

A group holding any NaN/Inf is *poisoned*: its ``lo`` is NaN and its codes
hold a class per element instead of a value (bits >= 2: 0 finite, 1 NaN,
2 +Inf, 3 -Inf; bits == 1: 0 finite, 1 non-finite).  It decodes to those
non-finite values exactly and to NaN for its finite elements, so a
non-finite value is never turned finite and the damage stays in its group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from actpack.codecs.pack import _check_bits, pack_bits, unpack_bits

_NAN, _POS_INF, _NEG_INF = 1, 2, 3


@dataclass(frozen=True)
class GroupCode:
    """Packed codes plus per-group range; see :func:`quantize_groups`."""

    packed: Tensor  # 1-D uint8, codes of the (rows, ngroups * group_size) padded matrix
    lo: Tensor  # (rows, ngroups) meta dtype; NaN marks a poisoned group
    hi: Tensor  # (rows, ngroups) meta dtype
    rows: int
    cols: int
    group_size: int
    bits: int
    zero_exact: bool

    @property
    def ngroups(self) -> int:
        return -(-self.cols // self.group_size)

    @property
    def nbytes(self) -> int:
        """Storage in bytes, from shapes only."""
        return sum(t.numel() * t.element_size() for t in (self.packed, self.lo, self.hi))


def _round_out(v: Tensor, meta_dtype: torch.dtype, down: bool) -> Tensor:
    """Cast float32 ``v`` to ``meta_dtype`` rounding towards -inf (down) or +inf.

    Values beyond the meta range saturate at its finite maximum rather than
    becoming infinite; see the note in :func:`quantize_groups`.
    """
    if meta_dtype == torch.bfloat16:
        return _round_out_bf16(v, down)
    m = v.to(meta_dtype)
    if m.element_size() >= 4:
        return m  # float32/float64 hold every float32 value exactly
    # One ulp outwards via the 16-bit pattern (sign-magnitude), because
    # torch.nextafter lacks CUDA float16 support before torch 2.6.
    back = m.float()
    off = back > v if down else back < v
    bits = m.view(torch.int16)
    away = (m > 0) != down  # moving away from zero grows the magnitude field
    moved = torch.where(away, bits + 1, bits - 1).to(torch.int16)
    tiniest = -32767 if down else 1  # 0x8001 / 0x0001: smallest subnormal, signed
    moved = torch.where(m == 0, torch.full_like(bits, tiniest), moved)
    m = torch.where(off, moved.view(meta_dtype), m)
    big = torch.finfo(meta_dtype).max
    return m.clamp(-big, big)


def _round_out_bf16(v: Tensor, down: bool) -> Tensor:
    """:func:`_round_out` to bfloat16 from float32 bits, never from a rounding cast.

    A bfloat16 is the high half of a float32, so cutting the low half rounds
    towards zero; an inexact value on the far side moves one bfloat16 ulp
    outwards.  Compilers may drop a ``.to(bfloat16).float()`` round trip
    (Inductor does, unless ``emulate_precision_casts``), so the comparisons
    of the generic path would see the unrounded value there.
    """
    b = v.float().view(torch.int32)
    cut = b & -65536
    away = ((b & 0xFFFF) != 0) & ((b < 0) == down)
    m = torch.where(away, cut + 65536, cut).view(torch.float32)  # a bfloat16 value, or Inf
    big = torch.finfo(torch.bfloat16).max
    return m.clamp(-big, big).to(torch.bfloat16)


def _scale(lo: Tensor, hi: Tensor, levels: int | Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-group pre-scale ``k``, scaled lower bound ``lo*k`` and step ``(hi-lo)*k/levels``.

    ``k`` is 0.5 only where ``hi - lo`` overflows float32 (e.g. -3e38..3e38),
    so ordinary groups are computed exactly as written in the algorithm.
    ``levels``: an int, or (the compiled codecs) a 0-d float32 tensor.
    """
    k = torch.where(torch.isfinite(hi - lo), 1.0, 0.5)
    lok = lo * k
    # A tensor divisor, not the Python int: CUDA divides by a CPU scalar as a
    # multiplication by its reciprocal (ATen's div_true_kernel_cuda), which is
    # one ulp off for levels = 3 and made CUDA's reference differ from the CPU's
    # and from the kernels' IEEE division (tests/test_kernels.py on CUDA).  A
    # tensor ``levels`` is broadcast, not read into a fill value: Dynamo
    # breaks its graph at a data-dependent ``.item()``.
    if isinstance(levels, Tensor):
        divisor = levels.to(lok.dtype).expand_as(lok)
    else:
        divisor = torch.full_like(lok, levels)
    step = (hi * k - lok) / divisor
    return k, lok, step


def check_float32_range(x: Tensor) -> None:
    """Raise ValueError if float64 ``x`` holds finite values beyond float32's
    range: the codes compute in float32, where such a value would become
    infinite, and its group NaN (never silently finite, but not the input).
    Reads ``x`` on the host (float64 only: the engine keeps float64 exact)."""
    if x.dtype == torch.float64:
        big = (x.abs() > torch.finfo(torch.float32).max) & torch.isfinite(x)
        if bool(big.any()):
            raise ValueError(
                "x holds finite float64 values beyond float32's range (3.4e38), which "
                "the codes, computed in float32, would turn infinite; keep such a tensor "
                "exact (the engine keeps float64 saves exact) or scale it first"
            )


def quantize_groups(
    x: Tensor,
    bits: int,
    group_size: int,
    *,
    stochastic: bool = True,
    generator: torch.Generator | None = None,
    zero_exact: bool = False,
    meta_dtype: torch.dtype = torch.bfloat16,
    noise: Tensor | None = None,
) -> GroupCode:
    """Quantize 2-D ``x`` (rows, cols) per group to ``bits``-bit codes.

    ``q = floor((x - lo) / step + u)`` with ``u ~ U[0, 1)`` (``stochastic``)
    or ``u = 0.5`` (round to nearest), against the *stored* lo/hi, so decoding
    is unbiased and off by at most one step (half a step when rounding).

    ``zero_exact`` (bits >= 2) reserves code 0 for exact zero and spreads the
    positive values over codes 1..L; the caller guarantees ``x >= 0`` (a
    negative value would be coded as zero).  Finite values outside
    ``meta_dtype``'s range saturate at its maximum (biased, never non-finite).

    ``noise`` (float32, ``rows * ngroups * group_size`` values in [0, 1), the
    padded matrix in row-major order) supplies ``u`` instead of ``generator``:
    :mod:`actpack.codecs.traceable` passes a counter-based hash so that the
    whole function traces into compiled graphs.
    """
    bits = _check_bits(bits)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be an integer >= 1, got {group_size!r}")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (rows, cols), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got {x.dtype}")
    if zero_exact and bits < 2:
        raise ValueError("zero_exact needs bits >= 2 (code 0 is reserved for exact zero)")
    if not meta_dtype.is_floating_point:
        raise ValueError(f"meta_dtype must be a floating-point dtype, got {meta_dtype}")
    check_float32_range(x)

    with torch.no_grad():
        rows, cols = x.shape
        ngroups = -(-cols // group_size)
        pad = ngroups * group_size - cols
        xf = x.detach().float()
        if pad:
            # Repeat the row's last element: it already belongs to the tail group,
            # so that group's min, max and poisoning are unchanged.
            xf = torch.cat([xf, xf[:, -1:].expand(rows, pad)], dim=1)
        g = xf.reshape(rows, ngroups, group_size)
        finite = torch.isfinite(g)
        poisoned = ~finite.all(dim=-1)
        g = torch.where(finite, g, 0.0)  # keeps the arithmetic below finite

        levels = (1 << bits) - 1
        if zero_exact:
            positive = g > 0
            gmin = torch.where(positive, g, math.inf).amin(dim=-1)
            gmin = torch.where(torch.isfinite(gmin), gmin, 0.0)  # no positive value
            gmax = g.amax(dim=-1)
            levels -= 1  # codes 1..L hold L - 1 steps
        else:
            gmin, gmax = g.amin(dim=-1), g.amax(dim=-1)
        lo = _round_out(gmin, meta_dtype, down=True)
        hi = _round_out(gmax, meta_dtype, down=False)

        k, lok, step = _scale(lo.float(), hi.float(), levels)
        k, lok, step = k.unsqueeze(-1), lok.unsqueeze(-1), step.unsqueeze(-1)
        # Divide rather than multiply by 1/step: a subnormal step would make 1/step Inf.
        t = torch.where(step > 0, (g * k - lok) / step, 0.0)  # constant group: code 0
        if noise is not None:
            u = noise.reshape(g.shape)
        elif stochastic:
            u = torch.rand(g.shape, generator=generator, device=g.device, dtype=torch.float32)
        else:
            u = torch.full_like(t, 0.5)
        # uint8 at once: a compiler that stores the codes stores 1 byte each.
        q = torch.floor(t + u).clamp_(0, levels).to(torch.uint8)
        if zero_exact:
            q = torch.where(positive, q + 1, 0).to(torch.uint8)

        gx = xf.reshape(rows, ngroups, group_size)
        if bits >= 2:
            cls = torch.where(torch.isnan(gx), _NAN, torch.where(gx > 0, _POS_INF, _NEG_INF))
        else:
            cls = torch.ones_like(gx, dtype=torch.int64)
        cls = torch.where(finite, 0, cls)
        codes = torch.where(poisoned.unsqueeze(-1), cls.to(torch.uint8), q)

        lo = torch.where(poisoned, torch.full_like(lo, math.nan), lo)
        hi = torch.where(poisoned, torch.zeros_like(hi), hi)
        return GroupCode(pack_bits(codes, bits), lo, hi, rows, cols, group_size, bits, zero_exact)


def dequantize_groups(code: GroupCode, dtype: torch.dtype = torch.float32) -> Tensor:
    """Decode a :class:`GroupCode` to a (rows, cols) tensor of ``dtype``."""
    with torch.no_grad():
        rows, ngroups, gs = code.rows, code.ngroups, code.group_size
        q = unpack_bits(code.packed, code.bits, rows * ngroups * gs).view(rows, ngroups, gs)
        lo, hi = code.lo.float(), code.hi.float()
        poisoned = torch.isnan(lo).unsqueeze(-1)
        levels = (1 << code.bits) - 1
        qf = q.float()
        if code.zero_exact:
            levels -= 1
            qf = (qf - 1).clamp_min_(0)
        k, lok, step = _scale(lo, hi, levels)
        k, lok, step = k.unsqueeze(-1), lok.unsqueeze(-1), step.unsqueeze(-1)
        # Divide by k last: lo*k + q*step stays finite even when hi - lo overflows.
        v = (lok + qf * step) / k
        big = torch.finfo(dtype).max
        if big < torch.finfo(torch.float32).max:  # float64: nothing to clamp (and no float for it)
            v = v.clamp(-big, big)  # a finite value must not round to Inf in dtype
        v = v.to(dtype)
        if code.zero_exact:
            # Code >= 1 means positive: keep it so even if the grid value underflows in dtype.
            v = torch.where(q > 0, v.clamp_min(torch.finfo(dtype).tiny), torch.zeros_like(v))
        bad = torch.full_like(v, math.nan)
        if code.bits >= 2:
            bad = torch.where(q == _POS_INF, math.inf, torch.where(q == _NEG_INF, -math.inf, bad))
        v = torch.where(poisoned, bad, v)
        return v.reshape(rows, ngroups * gs)[:, : code.cols].contiguous()
