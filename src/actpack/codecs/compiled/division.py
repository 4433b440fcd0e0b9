"""DIVISION dual precision compiled for the CPU by TorchInductor.

Same signatures and results as :mod:`actpack.codecs.division` (the
specification): round to nearest gives the same LFC, packed bytes, lo and
hi; decoding gives the same values; stochastic rounding uses the hashed
noise of :mod:`actpack.codecs.counter_noise`.

The block means are the reference's own :func:`~actpack.codecs.division.block_means`
compiled (a body of their own, :func:`_pooler`: elementwise float32 additions
in the order the reference fixes, so the same bfloat16 means; the sums along
the outer spatial dims read ``x`` as vectors along its innermost dimension).
The compiled body keeps the (N, C, *S) layout
and ``x``'s strides, reads ``x`` twice (one loop for the row extremes of the
residual and of ``x`` itself, which rows whose residual is not finite
quantize; then the codes) and never materialises the upsampled LFC except
along the innermost dimension (:func:`spread`).  Poisoned rows get their
classes afterwards, as in :mod:`~actpack.codecs.compiled.groupquant`.

Falls back to the reference for invalid arguments, empty tensors, input
dtypes other than float32/float16/bfloat16 (float64 goes to the reference, which
checks its range), decode dtypes other than
float32/float16/bfloat16, codes whose LFC is not bfloat16, and tensors of
2**32 elements or more.
"""

from __future__ import annotations

import functools
import math
import threading

import torch
from torch import Tensor

from actpack.codecs import division as ref
from actpack.codecs.compiled import build
from actpack.codecs.compiled.arith import (
    all_finite,
    any_set,
    clamp_finite,
    extremes_ranges,
    finish_ranges_,
    fix_poisoned_codes_,
    fix_poisoned_values_,
    grid_values,
    group_grid,
    group_scale,
    lane_offsets,
    value_codes,
)
from actpack.codecs.compiled.bits import pack_codes, unpack_codes
from actpack.codecs.compiled.build import MAX_NUMEL
from actpack.codecs.compiled.groupquant import (
    _FLOATS,
    OtherConfiguration,
    index_dtype,
    levels_tensor,
    zero_key,
)
from actpack.codecs.compiled.verify import same_bits, same_bounds
from actpack.codecs.counter_noise import random_key, uniform
from actpack.codecs.division import DivisionCode, _upsample
from actpack.codecs.groupquant import GroupCode

__all__ = ["division_decode", "division_encode"]


def spread(lfc: Tensor, block: tuple[int, ...], shape: tuple[int, ...], inner: int):
    """``lfc`` upsampled along dimension ``inner`` only and laid out with it
    innermost; the blocks left to upsample (``inner``'s becomes 1).

    Inductor vectorises along the innermost dimension; an upsampling index
    there (``w // 8``) would make it load the LFC one element at a time, or
    not vectorise at all.  Along any other dimension the index is a loop
    constant.  The price: a bfloat16 array of ``numel / prod(other blocks)``
    elements (1/8 of a 2-D map's for 8x8 blocks; a 1-D map's full size).
    """
    if inner < 2 or block[inner - 2] == 1:
        return lfc, block
    out = lfc.repeat_interleave(block[inner - 2], dim=inner).narrow(inner, 0, shape[inner])
    order = [d for d in range(out.dim()) if d != inner] + [inner]
    out = out.permute(order).contiguous().permute([order.index(d) for d in range(out.dim())])
    return out, tuple(1 if d == inner - 2 else b for d, b in enumerate(block))


def flat_rows(x: Tensor, eff: tuple[int, ...]) -> Tensor | None:
    """``x`` viewed as (N, C, prod(S)) when each (n, c) row is one block (maps no
    larger than the block: one LFC value per row, broadcast) and the view is
    free; None otherwise.  One long inner loop vectorises; a 7x7 or 4x4 map's
    rows of 7 or 4 elements would leave most vector lanes idle."""
    if any(b != s for b, s in zip(eff, x.shape[2:])):
        return None
    try:
        return x.view(x.shape[0], x.shape[1], -1)
    except RuntimeError:  # spatial dims not contiguous together
        return None


def _upsampled(spread_lfc: Tensor, block: tuple[int, ...] | None, spatial) -> Tensor:
    """float32 LFC per element: broadcast (``block`` None: one value per row)."""
    if block is None:
        return spread_lfc.float()
    return _upsample(spread_lfc.float(), block, spatial)


def _flat_index(x: Tensor, lane: Tensor, inner: int, index: torch.dtype) -> Tensor:
    """The row-major flat index of every element of ``x`` (the noise counter),
    from ``lane`` (the offsets along dimension ``inner``, given as a tensor)
    and an ``arange`` along every other dimension (a loop constant there)."""
    flat = lane.to(index).view([-1 if d == inner else 1 for d in range(x.dim())])
    for d in range(x.dim()):
        if d != inner:
            stride = math.prod(x.shape[d + 1 :])  # row-major stride of dimension d
            along = torch.arange(x.shape[d], device=x.device, dtype=index) * stride
            flat = flat + along.view([-1 if e == d else 1 for e in range(x.dim())])
    return flat


def _encoder(wide: bool, stochastic: bool, block, dtype: torch.dtype, index, inner: int):
    def encode_division(x: Tensor, lfc: Tensor, spread_lfc: Tensor, seed: Tensor, levels, lane):
        # ``lane``: the flat (row-major) index offsets along ``inner``, x's
        # innermost dimension in memory, as a tensor: Inductor would build an
        # ``arange`` along the vectorised dimension lane by lane.
        dims = tuple(range(2, x.dim()))
        xf = x.float()
        up = _upsampled(spread_lfc, block, x.shape[2:])
        resid = xf - up
        rmin, rmax = resid.amin(dim=dims, keepdim=True), resid.amax(dim=dims, keepdim=True)
        # A row whose residual is not finite (a non-finite x, or |x - block
        # mean| beyond float32) stores LFC = 0 and codes x itself, as the
        # reference does.  x's own extremes come from the same loop as the
        # residual's; selecting here rather than recomputing those rows
        # eagerly afterwards saves ~50 eager ops an encode.
        ok = all_finite(rmin, rmax)
        # ``up < -inf`` never holds: it gives x's reductions the residual's
        # indexing, so that Inductor computes all four in one loop over x.
        xs = torch.where(up < -math.inf, up, xf)
        xmin, xmax = xs.amin(dim=dims, keepdim=True), xs.amax(dim=dims, keepdim=True)
        gmin, gmax = torch.where(ok, rmin, xmin), torch.where(ok, rmax, xmax)
        lo, hi, poisoned = extremes_ranges(gmin, gmax, torch.bfloat16)
        k, lok, step = group_scale(lo, hi, poisoned, levels)
        u = 0.5
        if stochastic:
            u = uniform(_flat_index(x, lane, inner, index), seed, below_2_32=True)
        codes = value_codes(torch.where(ok, resid, xf), k, lok, step, u, levels, False)
        lfc = torch.where(ok.view(ok.shape[:2] + (1,) * (lfc.dim() - 2)), lfc, 0.0)
        # k, lok, step: returned so that they are stored once (see group_scale).
        return codes, lo, hi, poisoned, lfc, k, lok, step

    return encode_division


def _pooler(block: tuple[int, ...], spatial: tuple[int, ...], dtype: torch.dtype):
    def block_means(x: Tensor):
        # The spatial sizes as constants (a CNN's maps have a few sizes):
        # symbolic, they left Inductor unable to tell a block count of 1,
        # and it gathered the sums element by element (7x7 maps: 1.2 ms
        # against ATen's pool's 0.26 ms; BENCHMARKS.md, round 8).
        x = x.view(x.shape[0], x.shape[1], *spatial)
        return ref.block_means(x.float(), block)

    return block_means


class SizeBudget:
    """The spatial sizes whose block means get a compiled body of their own:
    at most ``limit`` per (map rank, dtype), whatever the block (a map smaller
    than the block in some dimension has a block of its own, ``min(block,
    size)``: keyed by block, maps of under 8 pixels a side escaped the
    bound), the first ones seen in the process
    (each costs a compile of 2-12 s and stays in memory).  Beyond them, maps
    of varying size (1-D sequences of every length) take the reference's
    eager block means: the same values, without a compile per size.
    Process-wide, like Inductor's own caches, and thread-safe."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._sizes: dict[tuple, set[tuple[int, ...]]] = {}

    def admits(self, kind: tuple, spatial: tuple[int, ...]) -> bool:
        with self._lock:
            seen = self._sizes.setdefault(kind, set())
            if spatial not in seen and len(seen) < self.limit:
                seen.add(spatial)
            return spatial in seen


_SIZES = SizeBudget(8)


def _block_means(x: Tensor, eff: tuple[int, ...]) -> Tensor | None:
    """The reference's bfloat16 block means of ``x`` (N, C, *S), compiled
    once per block and spatial size within :class:`SizeBudget`, else computed
    eagerly by the reference; None where a compiled body cannot serve (the
    caller runs the reference)."""
    spatial = tuple(x.shape[2:])
    if not _SIZES.admits((len(spatial), x.dtype), spatial):
        return ref.block_means(x.float(), eff)
    check = functools.partial(_check_pooler, x, eff)
    return build.run(_pooler, (eff, spatial, x.dtype), (x,), check)


def _check_pooler(x: Tensor, eff: tuple[int, ...]) -> bool:
    """Whether the compiled block means of a probe like ``x`` (its spatial
    sizes and memory order, so the same configuration; NaN, infinities,
    overflowing sums, subnormals, sums whose order shows) are the
    reference's, but for the sign of a zero."""
    probe = _probe_like(x, max(eff), x.dtype, spatial=True)
    if probe.shape[2:] != x.shape[2:]:  # another configuration: not this one's check
        raise OtherConfiguration(tuple(x.shape[2:]), tuple(probe.shape[2:]))
    got = _block_means(probe, eff)
    return got is None or same_bounds(got, ref.block_means(probe.float(), eff))


def _decoder(wide: bool, block: tuple[int, ...] | None, dtype: torch.dtype):
    big = torch.finfo(dtype).max
    big32 = torch.finfo(torch.float32).max

    def decode_division(spread_lfc: Tensor, q: Tensor, lo: Tensor, hi: Tensor, levels):
        n, c, spatial = q.shape[0], q.shape[1], q.shape[2:]
        lo, hi = lo.view(n, c, *([1] * len(spatial))), hi.view(n, c, *([1] * len(spatial)))
        lok, step, inv_k = group_grid(lo, hi, levels)
        hq = clamp_finite(grid_values(q, lok, step, inv_k, False), big32)
        out = clamp_finite(_upsampled(spread_lfc, block, spatial) + hq, big).to(dtype)
        # Poisoned rows (NaN lo) decode to NaN here; their classes are written
        # afterwards, from the classes alone: their LFC must not leak in.
        # lok, step and inv_k: returned so that they are stored once; last,
        # whether any row is poisoned.
        return out, lok, step, inv_k, torch.isnan(lo).any()

    return decode_division


def _valid(x: Tensor, block: int, bits: int) -> bool:
    return (
        x.dim() in (3, 4, 5)
        and isinstance(block, int)
        and not isinstance(block, bool)
        and block >= 1
        and isinstance(bits, int)
        and not isinstance(bits, bool)
        and 1 <= bits <= 8
        and x.dtype in _FLOATS  # float64: the reference, which checks its range
        and 0 < x.numel() < MAX_NUMEL
    )


_lane = functools.lru_cache(maxsize=64)(lane_offsets)  # cached (see levels_tensor)


def _innermost(x: Tensor) -> int:
    """The dimension Inductor will vectorise along: x's smallest stride (not of size 1)."""
    return min(range(x.dim()), key=lambda d: (x.stride(d) if x.shape[d] > 1 else math.inf, -d))


def division_encode(
    x: Tensor,
    block: int = 8,
    bits: int = 2,
    *,
    stochastic: bool = True,
    generator: torch.Generator | None = None,
) -> DivisionCode:
    """Compiled :func:`actpack.codecs.division_encode` (same signature and result)."""

    def reference() -> DivisionCode:
        return ref.division_encode(x, block, bits, stochastic=stochastic, generator=generator)

    if torch.compiler.is_compiling() or not _valid(x, block, bits):  # see groupquant's
        return reference()
    x = x.resolve_neg()  # a pending negation: the body would read -x (see groupquant's)
    code = _encode(x, block, bits, stochastic, generator)
    return reference() if code is None else code


class _OtherKey(Exception):
    """A check's probe selected another configuration than the one checked."""


def _encode(
    x: Tensor,
    block: int,
    bits: int,
    stochastic: bool,
    generator: torch.Generator | None,
    index: torch.dtype | None = None,
    expect: tuple | None = None,
) -> DivisionCode | None:
    """:func:`division_encode` for valid arguments; None where the compiled
    configuration cannot serve.  ``index`` forces the noise counter's dtype;
    ``expect``: the configuration a check's probe must select (else
    :class:`_OtherKey`)."""
    x = x.detach()
    shape = tuple(x.shape)
    eff = tuple(min(block, s) for s in shape[2:])
    seed = random_key(generator, x.device) if stochastic else zero_key(x.device)
    with torch.no_grad():
        # A check of the body (``expect``) takes the reference's block means:
        # the compiled ones are checked on their own, per spatial size, and
        # the probe's size would compile a configuration of them for nothing.
        lfc = ref.block_means(x.float(), eff) if expect is not None else _block_means(x, eff)
        if lfc is None:
            return None
        rows = flat_rows(x, eff)
        if rows is not None:
            view, rest = rows, None
            spread_lfc = lfc = lfc.view(rows.shape[0], rows.shape[1], 1)
        else:
            view = x
            spread_lfc, rest = spread(lfc, eff, shape, _innermost(x))
        # 32-bit noise lanes where every flat index fits (see counter_noise.uniform).
        index = index or index_dtype(x.numel())
        inner = _innermost(view)
        # The row-major stride of ``inner`` times arange: the noise counter's offsets.
        lane = _lane(view.shape[inner], math.prod(view.shape[inner + 1 :]), index, x.device)
        key = (bits >= 2, bool(stochastic), rest, x.dtype, index, inner)
        levels = levels_tensor(bits, False)
        args = (view, lfc, spread_lfc, seed, levels, lane)
        if expect is not None and key != expect:
            raise _OtherKey(key)
        check = functools.partial(_check_encoder, key, x, block, bits)
        out = build.run(_encoder, key, args, check)
        if out is None:
            return None
        codes, lo, hi, poisoned, lfc = out[:5]
        if any_set(poisoned):
            # A poisoned row's residual is not finite, so its codes classify x itself.
            mask = poisoned.view(shape[0], shape[1])
            fix_poisoned_codes_(codes, lambda m: view[m].float(), mask, bits >= 2)
            finish_ranges_(lo, hi, poisoned)
        if rows is not None:
            lfc = lfc.view(shape[0], shape[1], *[1] * len(eff))
        packed = pack_codes(codes, bits)
    size, rows = math.prod(shape[2:]), shape[0] * shape[1]
    hfc = GroupCode(packed, lo.view(rows, 1), hi.view(rows, 1), rows, size, size, bits, False)
    return DivisionCode(lfc, hfc, shape, eff)


def division_decode(code: DivisionCode, dtype: torch.dtype = torch.float32) -> Tensor:
    """Compiled :func:`actpack.codecs.division_decode` (same signature and result)."""
    hfc = code.hfc
    n = hfc.rows * hfc.cols
    if torch.compiler.is_compiling() or not (  # see groupquant.quantize_groups
        dtype in _FLOATS
        and code.lfc.dtype == torch.bfloat16
        and hfc.lo.dtype in _FLOATS
        and not hfc.zero_exact
        and 0 < n < MAX_NUMEL
    ):
        return ref.division_decode(code, dtype)
    out = _decode(code, dtype)
    return ref.division_decode(code, dtype) if out is None else out


def _decode(code: DivisionCode, dtype: torch.dtype, expect: tuple | None = None) -> Tensor | None:
    """:func:`division_decode` for codes it serves; None where the compiled
    configuration cannot serve (``expect``: see :func:`_encode`)."""
    hfc = code.hfc
    n = hfc.rows * hfc.cols
    shape = tuple(code.shape)
    with torch.no_grad():
        q = unpack_codes(hfc.packed, hfc.bits, n)
        if all(b == s for b, s in zip(code.block, shape[2:])):  # one block per row
            q, spread_lfc, rest = q.view(*shape[:2], -1), code.lfc.reshape(*shape[:2], 1), None
        else:
            # The output is contiguous: its innermost dimension is the last.
            spread_lfc, rest = spread(code.lfc, tuple(code.block), shape, len(shape) - 1)
            q = q.view(shape)
        args = (spread_lfc, q, hfc.lo, hfc.hi, levels_tensor(hfc.bits, False))
        key = (hfc.bits >= 2, rest, dtype)
        if expect is not None and key != expect:
            raise _OtherKey(key)
        check = functools.partial(_check_decoder, key, code, dtype)
        out = build.run(_decoder, key, args, check)
        if out is None:
            return None
        poisoned, out = out[-1], out[0]
        if poisoned:  # any poisoned row: the body's flag (see arith.any_set)
            rows = shape[0] * shape[1]
            wide = hfc.bits >= 2
            fix_poisoned_values_(out.view(rows, -1), q.reshape(rows, -1), hfc.lo.reshape(-1), wide)
    return out.view(shape)


def _probe_like(x: Tensor, block: int, dtype: torch.dtype, spatial: bool = False) -> Tensor:
    """A small input that takes ``x``'s configuration: (2, 4, ...) with each
    spatial size (``spatial``: every size, as the block means' bodies are
    compiled per size) kept up to ``block`` and beyond it two whole blocks, or one
    and ``x``'s partial one (the same blocks, the same remainder: the guards
    of the artifact compiled for the probe then also hold for ``x`` as far as
    its spatial sizes go, so that the verified artifact is the one that serves
    ``x``, not a second compile), in ``x``'s memory order, holding the hard
    cases: a NaN, +-Inf, a row whose residual overflows float32 (x itself is
    coded), a constant row, a subnormal one, and one whose block means depend
    on the summation order (+-2**20 cancelling within each block: a compiler
    that reassociated the sums of ``block_sums`` would show)."""
    size = (lambda s: s) if spatial else (lambda s: block + (s % block or block))
    shape = [2, 4, *(s if s <= block else size(s) for s in x.shape[2:])]
    # Outermost first, by stride (ties: the later dimension inner, as contiguous).
    order = sorted(range(x.dim()), key=lambda d: (-x.stride(d), d))
    gen = torch.Generator().manual_seed(0)
    base = torch.randn([shape[d] for d in order], generator=gen) * 2 + 0.5
    probe = base.permute([order.index(d) for d in range(x.dim())])
    first = (0,) * (x.dim() - 2)
    probe[0, 0] *= 1e-40
    probe[0, 1][first] = float("nan")
    probe[0, 2] = 1.5
    probe[1, 0][first] = float("inf")
    probe[1, 1][first] = -float("inf")
    probe[1, 2] = 3.3e38
    probe[1, 2][first] = -3.3e38
    width = shape[-1]
    starts = torch.arange(0, width, min(block, width))
    big = 2.0**20  # float32 ulp 0.125 there: the order decides what the small terms add
    if dtype == torch.float16:  # below float16's maximum, and small terms to match
        big = 2.0**15  # (ulp 2**-8: with terms of ~1 their bf16 mean would hide it)
        probe[0, 3] *= 2.0**-6
    probe[0, 3][..., starts] += big
    probe[0, 3][..., (starts + min(block, width)).clamp(max=width) - 1] -= big
    return base.to(dtype).permute([order.index(d) for d in range(x.dim())])


def _check_encoder(key: tuple, x: Tensor, block: int, bits: int) -> bool:
    """Whether encoder configuration ``key`` codes a probe like ``x`` as the
    reference does (given its noise).  Where no probe selects ``key`` (a
    layout the probe does not reproduce), ``x`` itself is checked."""
    stochastic, index = key[1], key[4]

    def compare(inp: Tensor) -> bool:
        got = _encode(inp, block, bits, stochastic, torch.Generator().manual_seed(0), index, key)
        if got is None:  # the body could not be compiled: the reference serves anyway
            return True
        noise = None
        if stochastic:
            seed = random_key(torch.Generator().manual_seed(0), inp.device)
            noise = uniform(torch.arange(inp.numel()), seed)
        want = ref.division_encode(inp, block, bits, stochastic=False, noise=noise)
        return (
            # Block means of values summing to zero may be -0.0 in the
            # reference and +0.0 compiled (-fno-signed-zeros): they decode alike.
            same_bounds(got.lfc, want.lfc)
            and same_bits(got.hfc.packed, want.hfc.packed)
            and same_bounds(got.hfc.lo, want.hfc.lo)
            and same_bounds(got.hfc.hi, want.hfc.hi)
        )

    try:
        return compare(_probe_like(x, block, x.dtype))
    except _OtherKey:
        return compare(x)


def _check_decoder(key: tuple, code: DivisionCode, dtype: torch.dtype) -> bool:
    """Whether decoder configuration ``key`` decodes a reference code of a
    probe like ``code``'s input as the reference does (else ``code`` itself)."""

    def compare(c: DivisionCode) -> bool:
        got = _decode(c, dtype, key)
        return got is None or same_bits(got, ref.division_decode(c, dtype))

    like = torch.empty(code.shape, dtype=torch.float32)
    probe = _probe_like(like, max(code.block), torch.float32)
    try:
        return compare(ref.division_encode(probe, max(code.block), code.hfc.bits, stochastic=False))
    except _OtherKey:
        return compare(code)
