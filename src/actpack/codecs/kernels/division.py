"""DIVISION dual precision as two fused Triton kernels.

``division_encode``: one launch per tensor.  A program owns ``M`` consecutive
(n, c) rows (``M * prod(S) * bits % 8 == 0``, so programs never share a packed
byte) and, for 1-, 2- and 3-D maps alike:

1. block means: each block's sum is accumulated in the reference's order
   (:func:`actpack.codecs.division.block_sums`: the outer spatial dims first,
   each slice after the other, uncovered positions adding +0.0) and divided
   by the number of covered elements, rounded to bf16 (RTNE) and stored;
2. HFC statistics ``x - up(LFC)`` per row, and of ``x`` itself for rows whose
   residual is not finite (the reference's fallback row);
3. zeroes the LFC of such rows, then quantizes and packs the HFC rows with the
   shared helpers of :mod:`actpack.codecs.kernels.groupquant`.

The LFC is re-read from global memory between sweeps (a CTA barrier orders
the accesses); ``x`` is read once from DRAM and again from cache.

``division_decode``: one launch, upsampled LFC + dequantized HFC, written in
the requested dtype.  Results equal :mod:`actpack.codecs.division` exactly for
round-to-nearest.  Falls back to the reference for: ``bits`` 3, 5, 6, 7 (encode
only), input dtypes other than float32/float16/bfloat16/float64, decode dtypes
other than float32/float16/bfloat16, codes whose LFC is not bfloat16, empty
tensors and invalid arguments (so that the reference raises its errors).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from actpack.codecs import division as ref
from actpack.codecs.division import DivisionCode
from actpack.codecs.groupquant import GroupCode
from actpack.codecs.kernels import groupquant as _gq
from actpack.codecs.kernels.groupquant import (
    _FLOAT_KIND,
    _INF,
    _X_DTYPES,
    _bf16_bits,
    _bf16_value,
    _codes,
    _dequant,
    _load_code,
    _load_f32,
    _pack_store,
    _params,
    _pick,
    _round_out,
    _seg_any,
    _seg_max,
    _seg_min,
    _store_float,
    _uniform,
    _warps,
    as_kernel_float,
    interpreted,
    seed_tensor,
    units_per_program,
)
from actpack.codecs.pack import packed_numel

__all__ = ["division_decode", "division_encode"]

_MAX_CHUNK = 2048
_MAX_BLOCK_CHUNK = 256
_DECODE_BLOCK = 1024


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@triton.jit
def _spatial(s, H: tl.constexpr, W: tl.constexpr):
    d = s // (H * W)
    r = s - d * (H * W)
    h = r // W
    return d, h, r - h * W


@triton.jit
def _residual_chunk(
    x_ptr, lfc_ptr, lfc0, rbase, seg, rvalid, c, s_d, s_h, s_w,
    H: tl.constexpr, W: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr,
    LH: tl.constexpr, LW: tl.constexpr, NBLK: tl.constexpr, S: tl.constexpr,
    CH: tl.constexpr, X_BF16: tl.constexpr,
):  # fmt: skip
    """Chunk ``c`` of the program's rows: element ids, row selector, validity,
    x and its residual against the stored (bf16) block means."""
    e = c * CH + tl.arange(0, CH)
    m = e // S
    sel = (m[None, :] == seg[:, None]) & rvalid[:, None]
    valid = tl.max(sel.to(tl.int32), axis=0) > 0
    d, h, w = _spatial(e - m * S, H, W)
    xv = _load_f32(x_ptr + _pick(rbase, sel) + d * s_d + h * s_h + w * s_w, valid, X_BF16)
    blk = m * NBLK + (d // BD) * (LH * LW) + (h // BH) * LW + w // BW
    lf = _bf16_value(tl.load(lfc_ptr + lfc0 + blk, mask=valid, other=0).to(tl.int32))
    return e, sel, valid, xv, xv - lf


@triton.jit
def _division_encode_kernel(
    x_ptr, s_n, s_c, s_d, s_h, s_w, C, nrows,
    lfc_ptr, packed_ptr, nbytes, lo_ptr, hi_ptr, seed_ptr,
    D: tl.constexpr, H: tl.constexpr, W: tl.constexpr,
    BD: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr,
    LH: tl.constexpr, LW: tl.constexpr, NBLK: tl.constexpr, S: tl.constexpr,
    BITS: tl.constexpr, PER: tl.constexpr, LEVELS: tl.constexpr, M: tl.constexpr,
    CH: tl.constexpr, NCH: tl.constexpr, CB: tl.constexpr, NCB: tl.constexpr,
    STOCHASTIC: tl.constexpr, X_BF16: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    seg = tl.arange(0, M)
    row = pid * M + seg  # [M] (n, c) rows of this program
    rvalid = row < nrows
    n = row // C
    rbase = n * s_n + (row - n * C) * s_c
    lfc0 = pid * (M * NBLK)
    e0 = pid * (M * S)

    # Sweep A: block means, summed in the reference's order, stored as bf16.
    for cb in range(NCB):
        idx = cb * CB + tl.arange(0, CB)
        m = idx // NBLK
        sel = (m[None, :] == seg[:, None]) & rvalid[:, None]
        valid = tl.max(sel.to(tl.int32), axis=0) > 0
        base = _pick(rbase, sel)
        blk = idx - m * NBLK
        bd = blk // (LH * LW)
        rem = blk - bd * (LH * LW)
        bh = rem // LW
        d0 = bd * BD
        h0 = bh * BH
        w0 = (rem - bh * LW) * BW
        ptr0 = x_ptr + base + d0 * s_d + h0 * s_h + w0 * s_w
        # The reference's order (block_sums): over kd first, then kh, then kw, each
        # sum starting from its first term; an uncovered position adds +0.0 (the
        # reference pads with it), which changes at most the sign of a zero sum.
        acc = tl.zeros((CB,), tl.float32)
        for kw in tl.static_range(BW):
            in_w = valid & (w0 + kw < W)
            col = tl.zeros((CB,), tl.float32)
            for kh in tl.static_range(BH):
                in_hw = in_w & (h0 + kh < H)
                ptr_hw = ptr0 + kh * s_h + kw * s_w
                dep = tl.zeros((CB,), tl.float32)
                for kd in tl.static_range(BD):
                    # _load_f32 inlined: a nested call per step is slow under the interpreter.
                    inb = in_hw & (d0 + kd < D)
                    if X_BF16:
                        raw = tl.load(ptr_hw + kd * s_d, mask=inb, other=0).to(tl.int32)
                        v = (raw << 16).to(tl.float32, bitcast=True)
                    else:
                        v = tl.load(ptr_hw + kd * s_d, mask=inb, other=0.0).to(tl.float32)
                    dep = v if kd == 0 else dep + v
                col = dep if kh == 0 else col + dep
            acc = col if kw == 0 else acc + col
        cnt = tl.minimum(D - d0, BD) * tl.minimum(H - h0, BH) * tl.minimum(W - w0, BW)
        mean = tl.math.div_rn(acc, cnt.to(tl.float32))
        tl.store(lfc_ptr + lfc0 + idx, _bf16_bits(mean).to(tl.int16), mask=valid)
    tl.debug_barrier()

    # Sweep B: statistics of the residual, and of x for rows whose residual is not finite.
    hmin = tl.full((M,), _INF, tl.float32)
    hmax = tl.full((M,), -_INF, tl.float32)
    xmin = tl.full((M,), _INF, tl.float32)
    xmax = tl.full((M,), -_INF, tl.float32)
    hbad = tl.zeros((M,), tl.int32)
    xbad = tl.zeros((M,), tl.int32)
    for c in range(NCH):
        e, sel, valid, xv, hv = _residual_chunk(
            x_ptr, lfc_ptr, lfc0, rbase, seg, rvalid, c, s_d, s_h, s_w,
            H, W, BD, BH, BW, LH, LW, NBLK, S, CH, X_BF16,
        )  # fmt: skip
        finh = tl.abs(hv) < _INF
        finx = tl.abs(xv) < _INF
        gh = tl.where(finh, hv, 0.0)
        gx = tl.where(finx, xv, 0.0)
        hmin = tl.minimum(hmin, _seg_min(gh, sel))
        hmax = tl.maximum(hmax, _seg_max(gh, sel))
        xmin = tl.minimum(xmin, _seg_min(gx, sel))
        xmax = tl.maximum(xmax, _seg_max(gx, sel))
        hbad = tl.maximum(hbad, _seg_any(~finh, sel))
        xbad = tl.maximum(xbad, _seg_any(~finx, sel))

    ok = hbad == 0
    gmin = tl.where(rvalid, tl.where(ok, hmin, xmin), 0.0)
    gmax = tl.where(rvalid, tl.where(ok, hmax, xmax), 0.0)
    lo = _round_out(gmin, 1, True)
    hi = _round_out(gmax, 1, False)
    pois = xbad > 0  # implies not ok
    k, lok, step = _params(lo, hi, LEVELS)
    _store_float(lo_ptr + row, tl.where(pois, float("nan"), lo), rvalid, 1)
    _store_float(hi_ptr + row, tl.where(pois, 0.0, hi), rvalid, 1)

    # Sweep C: rows whose residual is not finite keep LFC = 0 (the HFC is then x).
    notok = (ok == 0).to(tl.int32)
    for cb in range(NCB):
        idx = cb * CB + tl.arange(0, CB)
        m = idx // NBLK
        sel = (m[None, :] == seg[:, None]) & rvalid[:, None]
        clear = _pick(notok, sel) > 0
        tl.store(lfc_ptr + lfc0 + idx, tl.zeros((CB,), tl.int16), mask=clear)
    tl.debug_barrier()

    # Sweep D: quantize and pack the residual rows.
    if STOCHASTIC:
        seed = tl.load(seed_ptr)
    for c in range(NCH):
        e, sel, valid, xv, hv = _residual_chunk(
            x_ptr, lfc_ptr, lfc0, rbase, seg, rvalid, c, s_d, s_h, s_w,
            H, W, BD, BH, BW, LH, LW, NBLK, S, CH, X_BF16,
        )  # fmt: skip
        if STOCHASTIC:
            u = _uniform(seed, e0 + e)
        else:
            u = 0.5
        pe = _pick(pois.to(tl.int32), sel) > 0
        q = _codes(hv, _pick(k, sel), _pick(lok, sel), _pick(step, sel), pe, u,
                   BITS, LEVELS, False)  # fmt: skip
        q = tl.where(valid, q, 0)
        _pack_store(q, packed_ptr, e0 // PER + c * (CH // PER), c * (CH // PER),
                    (M * S) // PER, nbytes, CH, BITS, PER)  # fmt: skip


@triton.jit
def _division_decode_kernel(
    lfc_ptr, packed_ptr, nbytes, lo_ptr, hi_ptr, out_ptr, numel,
    H: tl.constexpr, W: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr,
    LH: tl.constexpr, LW: tl.constexpr, NBLK: tl.constexpr, S: tl.constexpr,
    BITS: tl.constexpr, LEVELS: tl.constexpr, OUT: tl.constexpr, BIG: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = e < numel
    row = e // S  # S is a compile-time constant: no runtime division
    d, h, w = _spatial(e - row * S, H, W)
    blk = (d // BD) * (LH * LW) + (h // BH) * LW + w // BW
    lf = _bf16_value(tl.load(lfc_ptr + row * NBLK + blk, mask=mask, other=0).to(tl.int32))
    q = _load_code(packed_ptr, e, nbytes, mask, BITS)
    lo = _bf16_value(tl.load(lo_ptr + row, mask=mask, other=0).to(tl.int32))
    hi = _bf16_value(tl.load(hi_ptr + row, mask=mask, other=0).to(tl.int32))
    # The HFC decodes as float32 (clamped to its range), as in the reference.
    hq = _dequant(q, lo, hi, BITS, LEVELS, False, 3.4028234663852886e38, 0.0)
    out = tl.minimum(tl.maximum(lf + hq, -BIG), BIG)
    out = tl.where(lo != lo, hq, out)
    _store_float(out_ptr + e, out, mask, OUT)


def _valid_args(x: Tensor, block: int, bits: int) -> bool:
    return (
        x.dim() in (3, 4, 5)
        and not isinstance(block, bool)
        and isinstance(block, int)
        and block >= 1
        and not isinstance(bits, bool)
        and isinstance(bits, int)
        and 1 <= bits <= 8
        and x.is_floating_point()
        and min(x.shape[2:]) >= 1
    )


def _dims(spatial: tuple[int, ...], eff: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """(D, H, W), (BD, BH, BW), (LD, LH, LW) with missing leading dims set to 1."""
    pad = 3 - len(spatial)
    dhw = (1,) * pad + tuple(spatial)
    blk = (1,) * pad + tuple(eff)
    nb = tuple(-(-s // b) for s, b in zip(dhw, blk))
    return dhw, blk, nb


def division_encode(
    x: Tensor,
    block: int = 8,
    bits: int = 2,
    *,
    stochastic: bool = True,
    generator: torch.Generator | None = None,
) -> DivisionCode:
    """Fused :func:`actpack.codecs.division_encode` (same signature and result)."""
    if not (
        _valid_args(x, block, bits)
        and bits in (1, 2, 4, 8)
        and x.dtype in _X_DTYPES
        and x.numel() > 0
    ):
        return ref.division_encode(x, block, bits, stochastic=stochastic, generator=generator)
    x = x.detach()
    shape = tuple(x.shape)
    n, c, spatial = shape[0], shape[1], shape[2:]
    eff = tuple(min(block, s) for s in spatial)
    (dd, hh, ww), (bd, bh, bw), (ld, lh, lw) = _dims(spatial, eff)
    size = math.prod(spatial)
    nblk = ld * lh * lw
    nrows = n * c
    dev = x.device
    lfc = torch.empty(n, c, *[-(-s // b) for s, b in zip(spatial, eff)], dtype=torch.bfloat16,
                      device=dev)  # fmt: skip
    nbytes = packed_numel(nrows * size, bits)
    packed = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    lo = torch.empty(nrows, 1, dtype=torch.bfloat16, device=dev)
    hi = torch.empty(nrows, 1, dtype=torch.bfloat16, device=dev)
    seed = seed_tensor(x, generator) if stochastic else packed  # unused when not stochastic

    align = 8 // math.gcd(size * bits, 8)
    interp = interpreted(_division_encode_kernel)
    m = units_per_program(size, align, interp)
    cap = max(_MAX_CHUNK // m, 256, _gq.INTERPRET_PROGRAM_ELEMENTS if interp else 0)
    ch = max(8, min(_next_pow2(m * size), cap))
    cb = min(_next_pow2(m * nblk), _MAX_BLOCK_CHUNK)
    st = list(x.stride())
    strides = [0] * (3 - len(spatial)) + st[2:]
    _division_encode_kernel[(-(-nrows // m),)](
        as_kernel_float(x), st[0], st[1], *strides, c, nrows,
        lfc.view(torch.int16), packed, nbytes, lo.view(torch.int16), hi.view(torch.int16), seed,
        D=dd, H=hh, W=ww, BD=bd, BH=bh, BW=bw, LH=lh, LW=lw, NBLK=nblk, S=size,
        BITS=bits, PER=8 // bits, LEVELS=(1 << bits) - 1, M=m,
        CH=ch, NCH=-(-(m * size) // ch), CB=cb, NCB=-(-(m * nblk) // cb),
        STOCHASTIC=bool(stochastic), X_BF16=x.dtype == torch.bfloat16,
        num_warps=_warps(ch), enable_fp_fusion=False,
    )  # fmt: skip
    code = GroupCode(packed, lo, hi, nrows, size, size, bits, False)
    return DivisionCode(lfc, code, shape, eff)


def division_decode(code: DivisionCode, dtype: torch.dtype = torch.float32) -> Tensor:
    """Fused :func:`actpack.codecs.division_decode` (same signature and result)."""
    h = code.hfc
    shape, spatial = code.shape, code.shape[2:]
    if not (
        dtype in _FLOAT_KIND
        and code.lfc.dtype == torch.bfloat16
        and h.lo.dtype == torch.bfloat16
        and h.hi.dtype == torch.bfloat16
        and not h.zero_exact
        and len(spatial) in (1, 2, 3)
        and h.group_size == h.cols == math.prod(spatial)
        and h.rows == shape[0] * shape[1]
        and h.rows * h.cols > 0
    ):
        return ref.division_decode(code, dtype)
    packed = h.packed.detach().reshape(-1)
    need = packed_numel(h.rows * h.cols, h.bits)
    if packed.numel() < need:
        raise ValueError(
            f"packed holds {packed.numel()} bytes, {need} needed for {h.rows * h.cols} codes"
        )
    (_, hh, ww), (bd, bh, bw), (_, lh, lw) = _dims(spatial, code.block)
    size = h.cols
    lfc = code.lfc.contiguous()
    out = torch.empty(shape, dtype=dtype, device=packed.device)
    numel = h.rows * size
    grid = (-(-numel // _DECODE_BLOCK),)
    _division_decode_kernel[grid](
        lfc.view(torch.int16), packed, packed.numel(), h.lo.contiguous().view(torch.int16),
        h.hi.contiguous().view(torch.int16), as_kernel_float(out), numel,
        H=hh, W=ww, BD=bd, BH=bh, BW=bw, LH=lh, LW=lw, NBLK=lfc[0, 0].numel(), S=size,
        BITS=h.bits, LEVELS=(1 << h.bits) - 1, OUT=_FLOAT_KIND[dtype],
        BIG=float(torch.finfo(dtype).max), BLOCK=_DECODE_BLOCK,
        num_warps=4, enable_fp_fusion=False,
    )  # fmt: skip
    return out
