"""ActNN per-group quantization as two fused Triton kernels.

``quantize_groups``: one launch reads ``x`` in its own dtype and strides, takes
per-group min/max (non-finite aware), rounds lo/hi outwards to the meta dtype,
quantizes (stochastic: counter-based Philox keyed by a seed drawn on the device
from the caller's generator; no host synchronisation) and writes the packed
bytes plus lo/hi.  ``dequantize_groups``: one launch unpacks and writes the
requested dtype.  Both match :mod:`actpack.codecs.groupquant` exactly for
round-to-nearest (same packed bytes, lo and hi; same decoded values).

Layout.  A program owns ``M`` consecutive groups (slots of the flattened
``(rows, ngroups)`` grid), where ``M`` is the smallest count whose codes fill
whole bytes (``M * group_size * bits % 8 == 0``, so no two programs share a
byte and no atomics or zero-fill are needed; ``M == 1`` for the default
``group_size=256``).  It sweeps its ``M * group_size`` elements twice in chunks
of ``CH``: once for the statistics, once to quantize and pack (the second read
comes from cache).  Tail groups (``cols`` not a multiple of ``group_size``)
read the row's last element again through a clamped index, which is exactly
the reference's padding, without a padded copy.

Arithmetic follows the reference operation by operation in float32 with IEEE
division (``div_rn``) and no FMA contraction (launched with
``enable_fp_fusion=False``).  bfloat16 is read and written through int16 views
with explicit round-to-nearest-even (what ``Tensor.to(torch.bfloat16)`` does),
which also keeps Triton's interpreter exact.

Falls back to the reference: encode with ``bits`` 3, 5, 6, 7; ``meta_dtype``
other than float32/bfloat16/float16; input dtypes other than
float32/float16/bfloat16/float64; decode to dtypes other than
float32/float16/bfloat16; empty tensors.  Decode handles every ``bits`` 1..8.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from actpack.codecs import groupquant as ref
from actpack.codecs.groupquant import GroupCode
from actpack.codecs.pack import packed_numel

__all__ = ["dequantize_groups", "quantize_groups", "supports_decode", "supports_encode"]

# Globals read inside @triton.jit functions must be tl.constexpr: the compiler
# (unlike the interpreter) rejects plain Python globals.
_INF = tl.constexpr(float("inf"))
_BF16_MAX = tl.constexpr(3.3895313892515355e38)
_FP16_MAX = tl.constexpr(65504.0)

#: dtype -> code used by the kernels for lo/hi storage and decoded output.
_FLOAT_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_X_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_MAX_CHUNK = 2048
_DECODE_BLOCK = 1024


# --------------------------------------------------------------------------------------
# Shared device helpers (also used by actpack.codecs.kernels.division)
# --------------------------------------------------------------------------------------


@triton.jit
def _load_f32(ptr, mask, X_BF16: tl.constexpr):
    """Load as float32; bfloat16 arrives through an int16 view (exact widening)."""
    if X_BF16:
        raw = tl.load(ptr, mask=mask, other=0)
        return (raw.to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        return tl.load(ptr, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _bf16_bits(v):
    """float32 -> bfloat16 bit pattern (int32, sign-extended), round to nearest even.

    Same as c10's ``round_to_nearest_even``: NaN becomes 0x7FC0.
    """
    u = v.to(tl.int32, bitcast=True)
    r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return tl.where(v != v, 0x7FC0, r)


@triton.jit
def _bf16_value(r):
    """bfloat16 bit pattern (int32) -> float32 value."""
    return (r << 16).to(tl.float32, bitcast=True)


@triton.jit
def _round_out(v, META: tl.constexpr, DOWN: tl.constexpr):
    """Reference ``_round_out``: finite float32 ``v`` to the meta grid, outwards.

    Returns a float32 holding a value exactly representable in the meta dtype.
    """
    if META == 0:
        return v
    else:
        if META == 1:
            r = _bf16_bits(v)
            back = _bf16_value(r)
        else:
            m16 = v.to(tl.float16)
            r = m16.to(tl.int16, bitcast=True).to(tl.int32)
            back = m16.to(tl.float32)
        # One ulp outwards on the sign-magnitude pattern (r is sign-extended, so
        # r + 1 / r - 1 are pattern + 1 / pattern - 1).
        if DOWN:
            off = back > v
            moved = tl.where(r < 0, r + 1, r - 1)
            moved = tl.where((r & 0x7FFF) == 0, -32767, moved)
        else:
            off = back < v
            moved = tl.where(r > 0, r + 1, r - 1)
            moved = tl.where((r & 0x7FFF) == 0, 1, moved)
        r = tl.where(off, moved, r)
        if META == 1:
            big = _BF16_MAX
            out = _bf16_value(r)
        else:
            big = _FP16_MAX
            out = r.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        return tl.minimum(tl.maximum(out, -big), big)


@triton.jit
def _load_meta(ptr, mask, META: tl.constexpr):
    if META == 1:
        return _bf16_value(tl.load(ptr, mask=mask, other=0).to(tl.int32))
    else:
        return tl.load(ptr, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store_float(ptr, v, mask, KIND: tl.constexpr):
    """Store float32 ``v`` as float32 (0), bfloat16 via int16 (1) or float16 (2), RTNE.

    NaN is stored as the canonical quiet NaN of the dtype (bfloat16 0x7FC0, float16
    0x7E00), what ``torch.full(..., nan)`` writes on every device; a hardware cast
    could give another pattern (e.g. 0x7FFF).
    """
    if KIND == 1:
        tl.store(ptr, _bf16_bits(v).to(tl.int16), mask=mask)
    elif KIND == 2:
        h = v.to(tl.float16).to(tl.int16, bitcast=True)
        h = tl.where(v != v, 0x7E00, h.to(tl.int32)).to(tl.int16)
        tl.store(ptr, h.to(tl.float16, bitcast=True), mask=mask)
    else:
        tl.store(ptr, v, mask=mask)


@triton.jit
def _params(lo, hi, LEVELS: tl.constexpr):
    """Reference ``_scale``: pre-scale k, lo*k and step (hi*k - lo*k) / levels."""
    k = tl.where(tl.abs(hi - lo) < _INF, 1.0, 0.5)
    lok = lo * k
    step = tl.math.div_rn(hi * k - lok, tl.zeros_like(lok) + LEVELS)
    return k, lok, step


@triton.jit
def _uniform(seed, counter):
    """U[0, 1) on the 2**-24 grid (like torch.rand), from Philox at ``counter``."""
    r = tl.randint(seed, counter)
    return (r.to(tl.uint32, bitcast=True) >> 8).to(tl.int32).to(tl.float32) * (1.0 / 16777216.0)


@triton.jit
def _codes(
    xv, k, lok, step, pois, u, BITS: tl.constexpr, LEVELS: tl.constexpr, ZERO_EXACT: tl.constexpr
):
    """Codes (int32) of float32 ``xv`` against its group's grid; classes if poisoned."""
    fin = tl.abs(xv) < _INF
    g = tl.where(fin, xv, 0.0)
    live = step > 0
    t = tl.math.div_rn(g * k - lok, tl.where(live, step, 1.0))
    t = tl.where(live, t, 0.0)
    q = tl.floor(t + u)
    q = tl.minimum(tl.maximum(q, 0.0), LEVELS)
    qi = q.to(tl.int32)
    if ZERO_EXACT:
        qi = tl.where(g > 0, qi + 1, 0)
    if BITS >= 2:
        cls = tl.where(xv != xv, 1, tl.where(xv > 0, 2, 3))
    else:
        cls = tl.full(xv.shape, 1, tl.int32)
    cls = tl.where(fin, 0, cls)
    return tl.where(pois, cls, qi)


@triton.jit
def _pack_store(codes, packed_ptr, byte0, lbyte0, lbytes, nbytes, CH: tl.constexpr,
                BITS: tl.constexpr, PER: tl.constexpr):  # fmt: skip
    """Pack CH int32 codes (bits 1, 2, 4, 8) into CH // PER bytes at ``byte0``."""
    c2 = tl.reshape(codes, (CH // PER, PER))
    shifts = tl.arange(0, PER) * BITS
    byte = tl.sum(c2 << shifts[None, :], axis=1)
    lb = lbyte0 + tl.arange(0, CH // PER)
    gb = byte0 + tl.arange(0, CH // PER)
    tl.store(packed_ptr + gb, byte.to(tl.uint8), mask=(lb < lbytes) & (gb < nbytes))


@triton.jit
def _load_code(packed_ptr, e, nbytes, mask, BITS: tl.constexpr):
    """Code of flat element ``e`` (little-endian bit stream, any bits 1..8)."""
    if 8 % BITS == 0:
        PER: tl.constexpr = 8 // BITS
        b = tl.load(packed_ptr + e // PER, mask=mask, other=0).to(tl.int32)
        return (b >> ((e % PER) * BITS).to(tl.int32)) & ((1 << BITS) - 1)
    else:
        pos = e * BITS
        byte0 = pos // 8
        sh = (pos % 8).to(tl.int32)
        b0 = tl.load(packed_ptr + byte0, mask=mask, other=0).to(tl.int32)
        b1 = tl.load(packed_ptr + byte0 + 1, mask=mask & (byte0 + 1 < nbytes), other=0)
        return ((b0 | (b1.to(tl.int32) << 8)) >> sh) & ((1 << BITS) - 1)


@triton.jit
def _dequant(q, lo, hi, BITS: tl.constexpr, LEVELS: tl.constexpr, ZERO_EXACT: tl.constexpr,
             BIG: tl.constexpr, TINY: tl.constexpr):  # fmt: skip
    """Reference decode in float32, clamped to +-BIG, before the cast to the output dtype."""
    pois = lo != lo
    qf = q.to(tl.float32)
    if ZERO_EXACT:
        qf = tl.maximum(qf - 1.0, 0.0)
    k, lok, step = _params(tl.where(pois, 0.0, lo), tl.where(pois, 0.0, hi), LEVELS)
    v = tl.math.div_rn(lok + qf * step, k)
    v = tl.minimum(tl.maximum(v, -BIG), BIG)
    if ZERO_EXACT:
        v = tl.where(q > 0, tl.maximum(v, TINY), 0.0)
    nan = float("nan")
    if BITS >= 2:
        bad = tl.where(q == 2, _INF, tl.where(q == 3, -_INF, nan))
    else:
        bad = tl.full(v.shape, nan, tl.float32)
    return tl.where(pois, bad, v)


@triton.jit
def _pick(vec, sel):
    """Per-element value of a per-segment vector: vec [M], sel [M, CH] one-hot."""
    return tl.sum(tl.where(sel, vec[:, None], 0), axis=0)


@triton.jit
def _seg_min(v, sel):
    return tl.min(tl.where(sel, v[None, :], _INF), axis=1)


@triton.jit
def _seg_max(v, sel):
    return tl.max(tl.where(sel, v[None, :], -_INF), axis=1)


@triton.jit
def _seg_any(flag, sel):
    return tl.max(tl.where(sel & flag[None, :], 1, 0), axis=1)


# --------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------


@triton.jit
def _quantize_kernel(
    x_ptr, sxr, sxc, cols, ngroups, total,
    packed_ptr, nbytes, lo_ptr, hi_ptr, seed_ptr,
    GS: tl.constexpr, BITS: tl.constexpr, PER: tl.constexpr, LEVELS: tl.constexpr,
    M: tl.constexpr, CH: tl.constexpr, NCH: tl.constexpr,
    STOCHASTIC: tl.constexpr, ZERO_EXACT: tl.constexpr, META: tl.constexpr,
    X_BF16: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    seg = tl.arange(0, M)
    slot = pid * M + seg  # [M] group slots of this program
    gvalid = slot < total
    row = slot // ngroups
    g = slot - row * ngroups
    gbase = row * sxr + g * GS * sxc  # offset of the group's first element
    glast = cols - 1 - g * GS  # last in-row index within the group (tail clamp)
    e0 = pid * (M * GS)  # flat element index of the program's first code

    # Sweep 1: statistics over finite values (non-finite count as 0, as in the reference).
    gmin = tl.full((M,), _INF, tl.float32)
    gmax = tl.full((M,), -_INF, tl.float32)
    bad = tl.zeros((M,), tl.int32)
    for c in range(NCH):
        e = c * CH + tl.arange(0, CH)
        s = e // GS
        sel = (s[None, :] == seg[:, None]) & gvalid[:, None]
        ev = tl.max(sel.to(tl.int32), axis=0) > 0
        j = tl.minimum(e - s * GS, _pick(glast, sel))
        xv = _load_f32(x_ptr + _pick(gbase, sel) + j * sxc, ev, X_BF16)
        fin = tl.abs(xv) < _INF
        gv = tl.where(fin, xv, 0.0)
        if ZERO_EXACT:
            gmin = tl.minimum(gmin, _seg_min(tl.where(gv > 0, gv, _INF), sel))
        else:
            gmin = tl.minimum(gmin, _seg_min(gv, sel))
        gmax = tl.maximum(gmax, _seg_max(gv, sel))
        bad = tl.maximum(bad, _seg_any(~fin, sel))

    if ZERO_EXACT:
        gmin = tl.where(gmin < _INF, gmin, 0.0)  # no positive value
    gmin = tl.where(gvalid, gmin, 0.0)
    gmax = tl.where(gvalid, gmax, 0.0)
    lo = _round_out(gmin, META, True)
    hi = _round_out(gmax, META, False)
    pois = bad > 0
    k, lok, step = _params(lo, hi, LEVELS)
    _store_float(lo_ptr + slot, tl.where(pois, float("nan"), lo), gvalid, META)
    _store_float(hi_ptr + slot, tl.where(pois, 0.0, hi), gvalid, META)

    # Sweep 2: quantize and pack.
    if STOCHASTIC:
        seed = tl.load(seed_ptr)
    for c in range(NCH):
        e = c * CH + tl.arange(0, CH)
        s = e // GS
        sel = (s[None, :] == seg[:, None]) & gvalid[:, None]
        ev = tl.max(sel.to(tl.int32), axis=0) > 0
        j = tl.minimum(e - s * GS, _pick(glast, sel))
        xv = _load_f32(x_ptr + _pick(gbase, sel) + j * sxc, ev, X_BF16)
        if STOCHASTIC:
            u = _uniform(seed, e0 + e)
        else:
            u = 0.5
        pe = _pick(pois.to(tl.int32), sel) > 0
        q = _codes(xv, _pick(k, sel), _pick(lok, sel), _pick(step, sel), pe, u,
                   BITS, LEVELS, ZERO_EXACT)  # fmt: skip
        q = tl.where(ev, q, 0)
        _pack_store(q, packed_ptr, e0 // PER + c * (CH // PER), c * (CH // PER),
                    (M * GS) // PER, nbytes, CH, BITS, PER)  # fmt: skip


@triton.jit
def _dequantize_kernel(
    packed_ptr, nbytes, lo_ptr, hi_ptr, out_ptr, cols, ngroups, ncb,
    GS: tl.constexpr, BITS: tl.constexpr, LEVELS: tl.constexpr, ZERO_EXACT: tl.constexpr,
    META: tl.constexpr, OUT: tl.constexpr, BIG: tl.constexpr, TINY: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    r = (pid // ncb).to(tl.int64)
    cb = pid % ncb
    col = cb * BLOCK + tl.arange(0, BLOCK)
    mask = col < cols
    g = col // GS
    slot = r * ngroups + g
    e = slot * GS + (col - g * GS)
    q = _load_code(packed_ptr, e, nbytes, mask, BITS)
    lo = _load_meta(lo_ptr + slot, mask, META)
    hi = _load_meta(hi_ptr + slot, mask, META)
    v = _dequant(q, lo, hi, BITS, LEVELS, ZERO_EXACT, BIG, TINY)
    _store_float(out_ptr + r * cols + col, v, mask, OUT)


# --------------------------------------------------------------------------------------
# Host wrappers
# --------------------------------------------------------------------------------------


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _warps(block: int) -> int:
    return max(1, min(8, block // 256))


def interpreted(kernel: object) -> bool:
    """Whether ``kernel`` runs through Triton's interpreter (TRITON_INTERPRET=1 at import)."""
    return type(kernel).__name__ == "InterpretedFunction"


#: Under the interpreter, the cost is per program and per operation, not per
#: element: let a program own up to this many elements (in whole aligned
#: units) so small tensors take one or two programs.  0 = the GPU policy.
INTERPRET_PROGRAM_ELEMENTS = 2048


def units_per_program(unit: int, align: int, interpret: bool) -> int:
    """Units (groups or rows) per program: ``align`` (the byte-alignment multiple)
    on a GPU; under the interpreter, more, in multiples of ``align``."""
    if not interpret or INTERPRET_PROGRAM_ELEMENTS <= 0:
        return align
    k = max(1, INTERPRET_PROGRAM_ELEMENTS // (align * unit))
    return align * min(1 << (k.bit_length() - 1), max(1, 32 // align))


def chunking(
    group_size: int, bits: int, interpret: bool = False, max_chunk: int = _MAX_CHUNK
) -> tuple[int, int, int]:
    """(groups per program M, chunk CH, chunks per program) for byte-aligned programs.

    ``M`` is a power of two, at least the smallest group count whose codes fill
    whole bytes, so programs never share a byte.
    """
    align = 8 // math.gcd(group_size * bits, 8)
    m = units_per_program(group_size, align, interpret)
    cap = max(256, max_chunk // m, INTERPRET_PROGRAM_ELEMENTS if interpret else 0)
    ch = max(8, min(_next_pow2(m * group_size), cap))
    return m, ch, -(-(m * group_size) // ch)


def seed_tensor(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """One int64 Philox seed drawn on ``x``'s device: no host synchronisation."""
    return torch.randint(0, 2**62, (1,), generator=generator, device=x.device, dtype=torch.int64)


def as_kernel_float(t: Tensor) -> Tensor:
    """bfloat16 travels as int16 (exact conversions in the kernels and the interpreter)."""
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


def supports_encode(x: Tensor, bits: int, meta_dtype: torch.dtype) -> bool:
    return (
        isinstance(bits, int)
        and bits in (1, 2, 4, 8)
        and meta_dtype in _FLOAT_KIND
        and x.dtype in _X_DTYPES
        and x.numel() > 0
    )


def supports_decode(code: GroupCode, dtype: torch.dtype) -> bool:
    return (
        dtype in _FLOAT_KIND
        and code.lo.dtype in _FLOAT_KIND
        and code.hi.dtype == code.lo.dtype
        and code.rows * code.cols > 0
    )


def _valid_args(x: Tensor, bits: int, group_size: int, zero_exact: bool) -> bool:
    return (
        not isinstance(bits, bool)
        and isinstance(bits, int)
        and 1 <= bits <= 8
        and not isinstance(group_size, bool)
        and isinstance(group_size, int)
        and group_size >= 1
        and x.dim() == 2
        and x.is_floating_point()
        and not (zero_exact and bits < 2)
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
) -> GroupCode:
    """Fused :func:`actpack.codecs.quantize_groups` (same signature and result)."""
    if not (_valid_args(x, bits, group_size, zero_exact) and supports_encode(x, bits, meta_dtype)):
        return ref.quantize_groups(
            x,
            bits,
            group_size,
            stochastic=stochastic,
            generator=generator,
            zero_exact=zero_exact,
            meta_dtype=meta_dtype,
        )
    x = x.detach()
    rows, cols = x.shape
    ngroups = -(-cols // group_size)
    total = rows * ngroups
    nbytes = packed_numel(total * group_size, bits)
    dev = x.device
    packed = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    lo = torch.empty(rows, ngroups, dtype=meta_dtype, device=dev)
    hi = torch.empty(rows, ngroups, dtype=meta_dtype, device=dev)
    seed = seed_tensor(x, generator) if stochastic else packed  # unused when not stochastic
    m, ch, nch = chunking(group_size, bits, interpreted(_quantize_kernel))
    levels = (1 << bits) - 1 - int(zero_exact)
    grid = (-(-total // m),)
    _quantize_kernel[grid](
        as_kernel_float(x), x.stride(0), x.stride(1), cols, ngroups, total,
        packed, nbytes, as_kernel_float(lo), as_kernel_float(hi), seed,
        GS=group_size, BITS=bits, PER=8 // bits, LEVELS=levels, M=m, CH=ch, NCH=nch,
        STOCHASTIC=bool(stochastic), ZERO_EXACT=bool(zero_exact),
        META=_FLOAT_KIND[meta_dtype], X_BF16=x.dtype == torch.bfloat16,
        num_warps=_warps(ch), enable_fp_fusion=False,
    )  # fmt: skip
    return GroupCode(packed, lo, hi, rows, cols, group_size, bits, bool(zero_exact))


def dequantize_groups(code: GroupCode, dtype: torch.dtype = torch.float32) -> Tensor:
    """Fused :func:`actpack.codecs.dequantize_groups` (same signature and result)."""
    if not supports_decode(code, dtype):
        return ref.dequantize_groups(code, dtype)
    rows, cols, gs, bits = code.rows, code.cols, code.group_size, code.bits
    packed = code.packed.detach().reshape(-1)
    ncodes = rows * code.ngroups * gs
    need = packed_numel(ncodes, bits)
    if packed.numel() < need:
        raise ValueError(f"packed holds {packed.numel()} bytes, {need} needed for {ncodes} codes")
    lo, hi = code.lo.contiguous(), code.hi.contiguous()
    out = torch.empty(rows, cols, dtype=dtype, device=packed.device)
    ncb = -(-cols // _DECODE_BLOCK)
    fin = torch.finfo(dtype)
    _dequantize_kernel[(rows * ncb,)](
        packed, packed.numel(), as_kernel_float(lo), as_kernel_float(hi), as_kernel_float(out),
        cols, code.ngroups, ncb,
        GS=gs, BITS=bits, LEVELS=(1 << bits) - 1 - int(code.zero_exact),
        ZERO_EXACT=bool(code.zero_exact), META=_FLOAT_KIND[lo.dtype], OUT=_FLOAT_KIND[dtype],
        BIG=float(fin.max), TINY=float(fin.tiny), BLOCK=_DECODE_BLOCK,
        num_warps=4, enable_fp_fusion=False,
    )  # fmt: skip
    return out
