"""ActNN per-group quantization compiled for the CPU by TorchInductor.

Same signatures and results as :mod:`actpack.codecs.groupquant` (the
specification): round to nearest gives the same packed bytes, lo and hi;
decoding gives the same values; stochastic rounding draws its noise from a
counter-based hash (:mod:`actpack.codecs.counter_noise`) seeded from the
caller's generator, so it is the same distribution, not the same stream.

Encoding is one compiled body (two loops over ``x``: the group ranges, then
one uint8 code per element, packed in the body when a group holds whole words
of codes: :func:`~actpack.codecs.compiled.bits.pack_rows`), then the classes of
poisoned groups written eagerly
(:func:`~actpack.codecs.compiled.arith.fix_poisoned_packed_`; other group
sizes: :func:`~actpack.codecs.compiled.arith.fix_poisoned_codes_`, then the
packing of :mod:`actpack.codecs.compiled.bits`); decoding unpacks the codes and
writes the output in one loop.  No float32 array of the input's size is
allocated (the reference allocates several); the uint8 codes are the one
full-size temporary.  Compiled once per (bits >= 2, zero_exact, stochastic,
dtypes, index width, layout, group size a multiple of 16 or not, bit width
where the body packs); otherwise the bit width is a runtime value.

Every eager op of an encode counts: when a model's work has evicted
PyTorch's code from the caches, each costs 10-30 us (a few us in a tight
loop), so the constant tensors are cached and the key is converted in the body.

Falls back to the reference for invalid arguments (so that it raises its
errors), empty tensors, float64 input (the reference checks its range), meta
dtypes other than bfloat16/float16/float32,
decode dtypes other than float32/float16/bfloat16, and tensors of 2**32
elements or more.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable

import torch
from torch import Tensor

from actpack.codecs import groupquant as ref
from actpack.codecs.compiled import build
from actpack.codecs.compiled.arith import (
    LANES,
    any_set,
    avx512_vectors,
    clamp_finite,
    finish_ranges_,
    fix_poisoned_codes_,
    fix_poisoned_packed_,
    fix_poisoned_values_,
    grid_values,
    group_grid,
    group_ranges,
    group_scale,
    lane_offsets,
    value_codes,
)
from actpack.codecs.compiled.bits import pack_codes, pack_rows, packs_rows, unpack_codes
from actpack.codecs.compiled.build import MAX_NUMEL
from actpack.codecs.compiled.verify import hard_groups, same_bits, same_bounds
from actpack.codecs.counter_noise import random_key, uniform
from actpack.codecs.groupquant import GroupCode

__all__ = ["dequantize_groups", "quantize_groups"]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


@functools.cache
def levels_tensor(bits: int, zero_exact: bool) -> Tensor:
    """The grid's step count as the 0-d float32 the compiled bodies take.

    One tensor per configuration, never written: every eager op an encode
    makes costs 10-30 us when a model's work has evicted PyTorch's code from
    the caches between two encodes (3x the op's cost in a tight loop)."""
    # float32 whatever the default dtype (a float64 default made the bodies
    # fail to trace, and the configuration fall back to the reference for good);
    # never an inference tensor, whatever mode the first call runs under.
    with torch.inference_mode(False):
        return torch.tensor(float((1 << bits) - 1 - int(zero_exact)), dtype=torch.float32)


@functools.lru_cache(maxsize=64)
def lanes(size: int, index: torch.dtype, device: torch.device) -> Tensor:
    """``arange(size)`` for the index dtype (see :func:`lane_offsets`), cached
    as :func:`levels_tensor` is."""
    return lane_offsets(size, 1, index, device)


@functools.lru_cache(maxsize=8)
def zero_key(device: torch.device) -> Tensor:
    """The key of round to nearest, which draws no noise (cached, never written)."""
    with torch.inference_mode(False):
        return torch.zeros(2, dtype=torch.int64, device=device)


def index_dtype(numel: int) -> torch.dtype:
    """:func:`~actpack.codecs.counter_noise.counter`'s index dtype for ``numel``
    counters.  The key stays int64: the body converts it (two scalar casts),
    where ``counter`` would make two eager ops of it."""
    return torch.int32 if numel < 1 << 31 else torch.int64


class OtherConfiguration(AssertionError):
    """A check's probe selected another configuration than the one it checks
    (``expected``, ``got``): the check fails, so the configuration is not
    used, rather than passing on another configuration's result."""


def _encoder(
    wide, zero_exact, stochastic, meta, dtype, index, grouped: bool, split: bool, pack, fused: bool
):
    def encode_groups(x: Tensor, seed: Tensor, levels: Tensor, lane: Tensor):
        # ``lane``: arange(group_size) in the index dtype.  Its length makes the
        # group size dynamic; its values are the in-group offsets of the noise
        # counter, loaded as a vector (Inductor builds an ``arange`` of a
        # vectorised loop lane by lane: ~35 instructions per 16 elements).
        # ``grouped``: ``x`` is already the (groups, group_size) view.
        # ``split``: the group size is a multiple of LANES and the CPU's vectors
        # have that many lanes (see split_extremes, avx512_vectors).
        # ``fused``: one pass per group (grouped only; see group_scale).
        group_size = lane.shape[0]
        lane = lane.to(index)  # float32 offsets: see lane_offsets
        if grouped:
            g = x.float()
        else:
            rows, cols = x.shape
            ngroups = (cols + group_size - 1) // group_size
            padded = _padded(x, ngroups * group_size).float()  # (rows, ngroups * group_size)
            g = padded.reshape(rows * ngroups, group_size)
        lo, hi, poisoned = group_ranges(g, meta, zero_exact, split=split)
        k, lok, step = group_scale(lo, hi, poisoned, levels, per_group=fused)
        u = 0.5
        if grouped:
            if stochastic:
                first = torch.arange(g.shape[0], device=x.device, dtype=index) * group_size
                u = uniform(first[:, None] + lane, seed, below_2_32=True)
            codes = value_codes(g, k, lok, step, u, levels, zero_exact)
        else:
            # The codes of the padded rows, (rows, ngroups * group_size), each
            # group's k, lok and step spread over its elements: the loop then
            # runs along a row and stores its codes contiguously.  Over the
            # (groups, group_size) view Inductor vectorises across groups
            # instead (their k, lok, step are contiguous there) and stores the
            # uint8 codes lane by lane through a buffer; with a 16-bit input
            # (every fused loop reads it) the loop takes 32 lanes, and Inductor
            # (torch 2.13) fills that buffer with a store of 4 bytes a lane,
            # whose AVX-512 mask ``(1 << count) - 1`` is undefined past 64
            # bytes: in a tail of n = 17..31 groups only 4n - 64 codes were
            # written, the rest were uninitialised stack bytes.
            def spread(t: Tensor) -> Tensor:
                per_group = t.view(rows, ngroups, 1).expand(rows, ngroups, group_size)
                return per_group.reshape(rows, ngroups * group_size)

            if stochastic:  # the counter of the padded matrix's element, row-major
                width = ngroups * group_size
                first = torch.arange(rows, device=x.device, dtype=index) * width
                col = torch.arange(width, device=x.device, dtype=index)
                u = uniform(first[:, None] + col, seed, below_2_32=True)
            # (rows, ngroups * group_size) out, row-major (a transposed input's
            # layout would make the caller's (groups, group_size) view a copy);
            # that view in the body, with sizes Inductor cannot relate, is a copy.
            q = value_codes(padded, spread(k), spread(lok), spread(step), u, levels, zero_exact)
            codes = q.contiguous()
        if pack:  # the bit width: packed here, one compiled call instead of two
            codes = pack_rows(codes, pack)
        # (groups, 1) outputs: a view of them would be recomputed; k, lok and
        # step are returned only so that they are stored once (see group_scale).
        return codes, lo, hi, poisoned, k, lok, step

    return encode_groups


def _padded(x: Tensor, width: int) -> Tensor:
    """The reference's padding of each row to ``width``: repeat its last element."""
    cols = x.shape[1]
    if width == cols:
        return x
    return x[:, torch.arange(width, device=x.device).clamp_max(cols - 1)]


def _decoder(wide: bool, zero_exact: bool, meta: torch.dtype, dtype: torch.dtype, bits=None):
    fin = torch.finfo(dtype)

    def values(q: Tensor, lo: Tensor, hi: Tensor, levels: Tensor):
        lok, step, inv_k = group_grid(lo, hi, levels)  # lo, hi: (groups, 1)
        v = grid_values(q, lok, step, inv_k, zero_exact)
        v = clamp_finite(v, fin.max).to(dtype)  # a finite value must not round to Inf
        if zero_exact:
            # Code >= 1 means positive: keep it so even if the grid value underflows in dtype.
            v = torch.where(q.float() > 0, v.clamp_min(fin.tiny), 0.0)
        # Poisoned groups (NaN lo) decode to NaN here; their classes are
        # written afterwards (fix_poisoned_values_), where the last output,
        # whether there are any, says so.  lok, step and inv_k are returned
        # only so that they are stored once (see group_scale).
        return v, lok, step, inv_k, torch.isnan(lo).any()

    def decode_groups(q: Tensor, lo: Tensor, hi: Tensor, levels: Tensor):
        # q (groups, group_size) in and out: the caller's reshape to (rows, cols) is a view.
        return values(q, lo, hi, levels)

    def decode_words(words: Tensor, lo: Tensor, hi: Tensor, levels: Tensor, shifts: Tensor):
        # words: the packed stream's int32 words, (groups, words per group);
        # shifts: (codes per chunk,) float32, the bit offset of each code (see
        # lane_offsets, _chunk).  The codes are unpacked here as (groups,
        # chunks, codes per chunk): Inductor loads each word once, as a scalar, and
        # vectorises along its codes.  Reading one uint8 code per element
        # instead, Inductor on AVX2 loads 8 bytes through a stack buffer
        # that a 16-byte load reads back (a store-forwarding stall: half of
        # a 2-bit decode's time), after a separate unpacking call.
        # 8 bits (word_bits): 4 codes a word, half an AVX2 vector; the codes
        # go by 8, the first four from a chunk's first word, the rest from its
        # second.
        # 3, 5, 6 and 7 bits: a chunk is 32 codes in ``bits`` words, and a
        # code may straddle two of them: each code reads the word holding its
        # first bit and the next (selects over the chunk's words, no gather).
        shift = shifts.to(torch.int32)
        mask = (1 << bits) - 1
        if bits == 8:
            pair = words.view(words.shape[0], -1, 2)
            word, shift = torch.where(shift >= 32, pair[..., 1:], pair[..., :1]), shift & 31
        elif bits in STRADDLING:
            chunk = words.view(words.shape[0], -1, bits)
            first = shift >> 5
            low = high = chunk[..., bits - 1 :]  # the last word: no code straddles it
            for j in range(bits - 1):
                low = torch.where(first == j, chunk[..., j : j + 1], low)
                high = torch.where(first == j, chunk[..., j + 1 : j + 2], high)
            # In int32 (AVX2 shifts int32 lanes by vectors of counts, not
            # int64 ones): a straddling code's low part is the word's top
            # 32 - s bits (cleared above them: the shift is arithmetic), its
            # high part the next word's bottom bits.  Counts stay in 0..31.
            s = shift & 31
            straddles = s > 32 - bits
            rest = (32 - s) & 31
            part = (low >> s) & torch.where(straddles, (1 << rest) - 1, mask)
            q = (part | torch.where(straddles, high << rest, 0)) & mask
            return values(q, lo.unsqueeze(-1), hi.unsqueeze(-1), levels)
        else:
            word = words.unsqueeze(-1)
        q = (word >> shift) & mask
        return values(q, lo.unsqueeze(-1), hi.unsqueeze(-1), levels)

    return decode_groups if bits is None else decode_words


def _valid(x: Tensor, bits: int, group_size: int, zero_exact: bool, meta: torch.dtype) -> bool:
    return (
        isinstance(bits, int)
        and not isinstance(bits, bool)
        and 1 <= bits <= 8
        and isinstance(group_size, int)
        and not isinstance(group_size, bool)
        and group_size >= 1
        and x.dim() == 2
        and x.dtype in _FLOATS  # float64: the reference, which checks its range
        and not (zero_exact and bits < 2)
        and meta in _FLOATS
        and 0 < x.numel() < MAX_NUMEL
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
    """Compiled :func:`actpack.codecs.quantize_groups` (same signature and result)."""

    def reference() -> GroupCode:
        return ref.quantize_groups(
            x,
            bits,
            group_size,
            stochastic=stochastic,
            generator=generator,
            zero_exact=zero_exact,
            meta_dtype=meta_dtype,
        )

    # Traced by Dynamo (a user's compiled region): the reference, before the
    # cached constants, whose lru_cache Dynamo warns that it ignores.
    if torch.compiler.is_compiling() or not _valid(x, bits, group_size, zero_exact, meta_dtype):
        return reference()
    # A pending negation (``torch._neg_view``, ``z.conj().imag``): the body
    # would read the stored values, -x.
    x = x.resolve_neg()
    code = _quantize(x, bits, group_size, stochastic, generator, zero_exact, meta_dtype)
    return reference() if code is None else code


def _quantize(
    x: Tensor,
    bits: int,
    group_size: int,
    stochastic: bool,
    generator: torch.Generator | None,
    zero_exact: bool,
    meta_dtype: torch.dtype,
    index: torch.dtype | None = None,
    expect: tuple | None = None,
) -> GroupCode | None:
    """:func:`quantize_groups` for valid arguments; None where the compiled
    configuration cannot serve (the caller runs the reference).  ``index``
    forces the noise counter's dtype (the check of an int64 configuration);
    ``expect``: the configuration a check's probe must select, else
    :class:`OtherConfiguration` (a check must never pass for another one)."""
    x = x.detach()
    key, view, args = encoder_setup(x, bits, group_size, stochastic, generator, zero_exact,
                                    meta_dtype, index)  # fmt: skip
    if expect is not None and key != expect:
        raise OtherConfiguration(expect, key)
    rows, cols = x.shape
    with torch.no_grad():
        out = build.run(_encoder, key, args, functools.partial(_check_encoder, key))
        if out is None:
            return None

        def groups_of(mask: Tensor) -> Tensor:
            if view is not x:  # grouped: two eager ops rather than eight
                return view[mask].float()
            by_row = mask.view(rows, -1)
            hit = by_row.any(1)  # only the rows holding a poisoned group
            width = -(-cols // group_size) * group_size
            return _padded(x[hit], width).float().view(-1, group_size)[by_row[hit].view(-1)]

        return encoder_finish(out, key, rows, cols, group_size, bits, zero_exact, groups_of)


def encoder_setup(
    x: Tensor,
    bits: int,
    group_size: int,
    stochastic: bool,
    generator: torch.Generator | None,
    zero_exact: bool,
    meta_dtype: torch.dtype,
    index: torch.dtype | None = None,
) -> tuple[tuple, Tensor, tuple]:
    """``(key, view, args)`` of an encode of valid 2-D ``x``: the configuration
    of :func:`_encoder`, the matrix its body reads (the (groups, group_size)
    view of ``x`` where its rows are whole groups, else ``x``), and the body's
    arguments.  Draws the stochastic rounding's key from ``generator``."""
    zero_exact, stochastic = bool(zero_exact), bool(stochastic)
    seed = random_key(generator, x.device) if stochastic else zero_key(x.device)
    rows, cols = x.shape
    # 32-bit noise lanes where every flat index fits (see counter_noise.uniform).
    index = index or index_dtype(rows * -(-cols // group_size) * group_size)
    # Whole groups in contiguous rows: the body reads the (groups, group_size)
    # view, whose flat index needs no division by a symbolic row width.
    grouped = cols % group_size == 0 and x.stride(1) == 1 and (rows == 1 or x.stride(0) == cols)
    view = x.view(-1, group_size) if grouped else x
    split = group_size % LANES == 0 and avx512_vectors()
    # Packed in the body only where its rows are whole groups (the grouped
    # view): rows of another width (a row of the input that is not a whole
    # number of groups) would break the stream at each row's end.
    pack = bits if grouped and packs_rows(bits, group_size) else None
    # One pass per group where that measured faster (group_scale's per_group).
    fused = grouped and not avx512_vectors()
    key = (bits >= 2, zero_exact, stochastic, meta_dtype, x.dtype, index, grouped, split, pack,
           fused)  # fmt: skip
    constants = (levels_tensor(bits, zero_exact), lanes(group_size, index, x.device))
    return key, view, (view, seed, *constants)


def encoder_finish(
    out: tuple,
    key: tuple,
    rows: int,
    cols: int,
    group_size: int,
    bits: int,
    zero_exact: bool,
    groups_of: Callable[[Tensor], Tensor],
) -> GroupCode:
    """The :class:`GroupCode` of an encoder body's first four outputs (codes,
    lo, hi, poisoned flags) for configuration ``key``: the classes of
    poisoned groups written, the codes packed.  ``groups_of(mask)``: the
    float32 (n, group_size) values the body coded, of the groups ``mask``
    (one bool per group) selects; called only when a group is poisoned."""
    codes, lo, hi, poisoned = out[:4]
    grouped, pack = key[6], key[8]
    if not grouped:
        codes = codes.view(-1, group_size)  # from (rows, width), row-major
    if any_set(poisoned):
        if pack:  # codes: the packed bytes of each group, one row per group
            fix_poisoned_packed_(codes, groups_of, poisoned.view(-1), bits)
        else:
            fix_poisoned_codes_(codes, groups_of, poisoned.view(-1), bits >= 2)
        finish_ranges_(lo, hi, poisoned)
    packed = codes.view(-1) if pack else pack_codes(codes, bits)
    lo, hi = lo.view(rows, -1), hi.view(rows, -1)
    return GroupCode(packed, lo, hi, rows, cols, group_size, bits, zero_exact)


def dequantize_groups(code: GroupCode, dtype: torch.dtype = torch.float32) -> Tensor:
    """Compiled :func:`actpack.codecs.dequantize_groups` (same signature and result)."""
    return _dequantize(code, dtype)


def _dequantize(code: GroupCode, dtype: torch.dtype, expect: tuple | None = None) -> Tensor:
    """:func:`dequantize_groups`; ``expect`` as for :func:`_quantize`."""
    n = code.rows * code.ngroups * code.group_size
    ok = dtype in _FLOATS and code.lo.dtype in _FLOATS and 0 < n < MAX_NUMEL
    if torch.compiler.is_compiling() or not ok:  # see quantize_groups
        return ref.dequantize_groups(code, dtype)
    words = _words(code)
    key = (code.bits >= 2, code.zero_exact, code.lo.dtype, dtype)
    with torch.no_grad():
        # lo and hi as (groups, 1) whatever their (rows, groups per row) shape:
        # the decoder's artifact then serves codes of any row width (the
        # verification probe's included), not one per layout of lo.
        lo, hi = code.lo.reshape(-1, 1), code.hi.reshape(-1, 1)
        levels = levels_tensor(code.bits, code.zero_exact)
        if words is not None:
            key += (code.bits,)
            args = (words, lo, hi, levels, _shifts(code.bits, words.device))
        else:
            q = unpack_codes(code.packed, code.bits, n).view(-1, code.group_size)
            args = (q, lo, hi, levels)
        if expect is not None and key != expect:
            raise OtherConfiguration(expect, key)
        out = build.run(_decoder, key, args, functools.partial(_check_decoder, key))
        if out is None:
            return ref.dequantize_groups(code, dtype)
        poisoned, out = out[-1], out[0].view(-1, code.group_size)
        if poisoned:  # any poisoned group: the body's flag (see arith.any_set)

            def codes_of(mask: Tensor) -> Tensor:
                q_ = unpack_codes(code.packed, code.bits, n) if words is not None else q
                return q_.view(-1, code.group_size)[mask]

            fix_poisoned_values_(out, codes_of, code.lo.reshape(-1), code.bits >= 2)
    out = out.view(code.rows, code.ngroups * code.group_size)
    return out if out.shape[1] == code.cols else out[:, : code.cols].contiguous()


#: Bit widths whose codes straddle the packed stream's 32-bit words.
STRADDLING = (3, 5, 6, 7)


def word_bits() -> tuple[int, ...]:
    """Bit widths whose codes the decoder unpacks from the packed stream's
    int32 words in its body (one compiled call, no uint8 codes array).

    8 bits (pairs of words, 8 codes a chunk) only where the vectors are not
    AVX-512's (:func:`~actpack.codecs.compiled.arith.avx512_vectors`): on a
    2-core AMD EPYC with AVX2 an int8 decode of 16 MiB ran 7.6 -> 4.3 ms
    this way (round 6), and on another 8.55 -> 7.39 ms (round 7), on an
    AVX-512 machine 4-9x slower (BENCHMARKS.md "CPU codecs", round 6);
    there it reads the unpacked uint8 codes.  The widths whose codes
    straddle words (:data:`STRADDLING`; 3 bits is ``RowActNN``'s default
    for matmul inputs) likewise, measured on AVX2 only (round 11)."""
    return (1, 2, 4) if avx512_vectors() else (1, 2, 4, 8, *STRADDLING)


def _words(code: GroupCode) -> Tensor | None:
    """``code.packed`` as (groups, words per group) int32 where the decoder
    can read it so: a bit width of :func:`word_bits`, whole chunks of codes
    (:func:`_chunk`) per group, a stream of consecutive bytes (stride 1)
    aligned to 4 bytes, a little-endian host (the stream's code ``i`` is
    then bits ``[i*bits, (i+1)*bits)`` of its chunk: a word, or a pair of
    words for 8 bits)."""
    bits = code.bits
    if bits not in word_bits() or code.group_size % _chunk(bits) or sys.byteorder != "little":
        return None
    n = code.rows * code.ngroups * code.group_size
    stream = code.packed  # as the encoders write it: 1-D uint8 (no grad), no tail
    if stream.dtype != torch.uint8 or stream.dim() != 1 or stream.numel() * 8 != n * bits:
        stream = stream.detach().reshape(-1)[: n * bits // 8]
    if stream.numel() * 8 != n * bits or stream.stride(0) != 1 or stream.data_ptr() % 4:
        return None  # a strided stream (a hand-built code's view) is unpacked instead
    return stream.view(torch.int32).view(-1, code.group_size * bits // 32)


def _chunk(bits: int) -> int:
    """Codes the word decoder unpacks together: a word's, two words' (8 bits),
    or 32 codes in ``bits`` words (:data:`STRADDLING`)."""
    return 32 if bits in STRADDLING else max(32 // bits, 8)


@functools.lru_cache(maxsize=16)
def _shifts(bits: int, device: torch.device) -> Tensor:
    """The bit offset of each code of a chunk (:func:`_chunk`) from its first
    word's least significant bit, float32 (cached)."""
    return lane_offsets(_chunk(bits), bits, torch.int32, device)


def _probe_matrix(group_size: int, levels: int, grouped: bool, zero_exact: bool) -> Tensor:
    """The hard-case groups (:func:`~actpack.codecs.compiled.verify.hard_groups`)
    as a float32 matrix: rows of two whole groups (``grouped``), or of two
    groups and a tail of 5 columns."""
    cases = hard_groups(group_size, levels)
    if grouped:
        x = cases.view(-1, 2 * group_size)
    else:
        x = cases.view(-1, 3 * group_size)[:, : 2 * group_size + 5]
    return x.abs() if zero_exact else x


def probe_size(key: tuple) -> tuple[int, int]:
    """A group size and bit width that select the encoder configuration ``key``
    (see :func:`encoder_setup`) for a probe of it."""
    wide, grouped, split, pack = key[0], key[6], key[7], key[8]
    # 32, not 16 or 8, wherever 32 selects it: Inductor specialises a group of
    # exactly one vector (16 lanes with AVX-512, 8 with AVX2), and the probe's
    # artifact would then serve no other group size (a second compile for the
    # first real call).  8 bits: a code that is never packed in the body.
    if (split or not avx512_vectors()) and (pack or wide or not grouped):
        return 32, pack or (8 if grouped else (3 if wide else 1))
    return (8 if pack else 6), pack or (3 if wide else 1)


def _check_encoder(key: tuple) -> bool:
    """Whether the encoder configuration ``key`` codes a probe of it as the
    reference does (the noise of stochastic rounding given to the reference)."""
    wide, zero_exact, stochastic, meta, dtype, index, grouped, split, pack, _fused = key
    group_size, bits = probe_size(key)
    levels = (1 << bits) - 1 - int(zero_exact)
    x = _probe_matrix(group_size, levels, grouped, zero_exact).to(dtype)
    x = x.contiguous() if grouped else x  # the tail view: not whole groups, not contiguous
    kw = {"zero_exact": zero_exact, "meta_dtype": meta}
    got = _quantize(x, bits, group_size, stochastic, torch.Generator().manual_seed(0), **kw,
                    index=index, expect=key)  # fmt: skip
    if got is None:  # the body could not be compiled: the reference serves anyway
        return True
    noise = None
    if stochastic:  # the counter hash the compiled encoder draws, given to the reference
        width = -(-x.shape[1] // group_size) * group_size
        key_ = random_key(torch.Generator().manual_seed(0), x.device)
        noise = uniform(torch.arange(x.shape[0] * width), key_)
    want = ref.quantize_groups(x, bits, group_size, stochastic=False, noise=noise, **kw)
    return (
        same_bits(got.packed, want.packed)
        and same_bounds(got.lo, want.lo)
        and same_bounds(got.hi, want.hi)
    )


def _check_decoder(key: tuple) -> bool:
    """Whether the decoder configuration ``key`` decodes a reference code of
    the hard cases as the reference does."""
    wide, zero_exact, meta, dtype = key[:4]
    bits = key[4] if len(key) > 4 else (3 if wide else 1)
    # Whole chunks for every bit width read so; two of them where a chunk is
    # 32 codes in ``bits`` words (STRADDLING): a group of one chunk would make
    # Inductor specialise the probe's artifact on that size 1, and the first
    # real code compile another.
    group_size = (64 if bits in STRADDLING else 32) if len(key) > 4 else 16
    x = _probe_matrix(group_size, (1 << bits) - 1 - int(zero_exact), True, zero_exact)
    code = ref.quantize_groups(x, bits, group_size, stochastic=False, zero_exact=zero_exact,
                               meta_dtype=meta)  # fmt: skip
    got = _dequantize(code, dtype, expect=key)
    return same_bits(got, ref.dequantize_groups(code, dtype))
