"""The randomized Hadamard codec's encode with its row selection compiled.

Same signature and result as :func:`actpack.codecs.hadamard.hadamard_encode`
(the specification).  The reference spends a dozen eager ops around its
rotation on every Linear input of ``RowActNN`` (the rows' maxima, the
adaptive test's group ranges of ``x`` and of the rotated ``y``, the
selection of each row), each 10-30 us on a small layer, more than the
quantization itself.  Here the rotation stays the reference's ATen matmul
(:func:`~actpack.codecs.hadamard.rotate`, so ``y`` is the reference's bit for
bit), and one compiled body reads ``x`` and ``y``, decides each row (non-finite
or beyond :func:`~actpack.codecs.hadamard.plain_limit`; with ``adaptive``,
rotated only where that shrinks its range), and quantizes the selected rows
with the group encoder's body (:mod:`actpack.codecs.compiled.groupquant`).

Served where each row is one group (``group_size`` None or the row's width,
as ``RowActNN`` codes rows of up to 256 features): the adaptive test then
compares one squared range per row, which the body computes as the
reference does.  With several groups a row, the reference sums their
squared ranges, and a float32 sum's rounding depends on its order, which
Inductor's reduction need not share: such encodes, non-contiguous inputs,
float64 and the cases :func:`~actpack.codecs.compiled.groupquant.quantize_groups`
leaves to the reference run the reference (whose quantization is compiled
anyway).  Each configuration is checked against the reference once per
process on a probe (``build.run``'s check), as the group encoder is.

Decoding dequantizes with the compiled group decoder and rotates back with
the reference's matmul; for codes of up to :data:`DECODE_MAX_NUMEL` elements
one compiled body then unpacks the sign and row bits, applies the signs,
selects the unrotated rows and converts to the output dtype (the
reference's seven eager ops after the matmul, whose fixed costs dominate a
small layer's decode).  Larger codes keep the reference's in-place tail:
the body's output is one more full-size buffer, and a fresh buffer of a
few MiB costs its page faults under glibc's default allocator: on a 2-core
AVX2 EPYC a 4096 x 256 decode ran slower with the body than without it,
and faster once glibc's trimming was turned off.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from actpack.codecs import hadamard as ref
from actpack.codecs import pack as ref_pack
from actpack.codecs.compiled import build
from actpack.codecs.compiled.groupquant import (
    _FLOATS,
    _check_encoder,
    _encoder,
    _valid,
    dequantize_groups,
    encoder_finish,
    encoder_setup,
    probe_size,
)
from actpack.codecs.compiled.verify import hard_groups, same_bits, same_bounds, same_values
from actpack.codecs.counter_noise import random_key, uniform
from actpack.codecs.groupquant import quantize_groups as ref_quantize_groups
from actpack.codecs.hadamard import (
    RotatedCode,
    apply_blocks,
    plain_limit,
    random_signs,
    rotate,
    rotated_rows,
)

__all__ = ["DECODE_MAX_NUMEL", "hadamard_decode", "hadamard_encode"]

#: Codes of more elements decode with the reference's eager tail (see above).
DECODE_MAX_NUMEL = 1 << 18


def _rotated_encoder(adaptive: bool, dtype: torch.dtype, *group_key):
    encode = _encoder(*group_key)

    def encode_rotated(
        x: Tensor, y: Tensor, limit: Tensor, seed: Tensor, levels: Tensor, lane: Tensor
    ):
        # x: the input (rows, cols), its dtype; y: its rotation, float32; one
        # group per row; limit: plain_limit(block) as a 0-d float32 (an argument,
        # so that one compile serves every block).  The reference's ops, in its
        # order (rotated_rows).
        xf = x.float()
        plain = ~(x.abs().amax(dim=1).float() <= limit)  # NaN: True
        if adaptive:  # one group a row: its sum of squared ranges is one square
            rotated = (y.amax(dim=1) - y.amin(dim=1)).square()
            unrotated = (xf.amax(dim=1) - xf.amin(dim=1)).square()
            plain = plain | ~(rotated < unrotated)
        values = torch.where(plain.unsqueeze(1), xf, y)
        return (*encode(values, seed, levels, lane), plain)

    return encode_rotated


@functools.lru_cache(maxsize=16)
def _limit(block: int) -> Tensor:
    """:func:`~actpack.codecs.hadamard.plain_limit` as the 0-d float32 the
    body compares in (the reference compares float32 maxima with the Python
    float: rounded to float32 the same way); cached, never written."""
    with torch.inference_mode(False):
        return torch.tensor(plain_limit(block), dtype=torch.float32)


def _served(x: Tensor, bits: int, block: int, group_size: int | None, meta: torch.dtype) -> bool:
    """Whether the compiled encode serves these (valid) arguments."""
    if x.dim() != 2 or isinstance(block, bool) or not isinstance(block, int):
        return False
    rows, cols = x.shape
    return (
        block >= 1
        and not block & (block - 1)
        and group_size in (None, cols)
        and (rows == 1 or x.stride(0) == cols)
        and (cols == 1 or x.stride(1) == 1)
        and _valid(x, bits, max(cols, 1), False, meta)
    )


def hadamard_encode(
    x: Tensor,
    bits: int,
    block: int = 64,
    group_size: int | None = None,
    *,
    adaptive: bool = False,
    stochastic: bool = True,
    generator: torch.Generator | None = None,
    meta_dtype: torch.dtype = torch.bfloat16,
) -> RotatedCode:
    """Compiled :func:`actpack.codecs.hadamard.hadamard_encode` (same signature
    and result; stochastic rounding's noise as the compiled group encoder's)."""

    def reference() -> RotatedCode:
        return ref.hadamard_encode(x, bits, block, group_size, adaptive=adaptive,
                                   stochastic=stochastic, generator=generator,
                                   meta_dtype=meta_dtype)  # fmt: skip

    if torch.compiler.is_compiling() or not _served(x, bits, block, group_size, meta_dtype):
        return reference()
    x = x.detach().resolve_neg()  # a pending negation: the body would read -x
    return _encode(x, bits, block, bool(adaptive), stochastic, generator, meta_dtype)


def _encode(
    x: Tensor,
    bits: int,
    block: int,
    adaptive: bool,
    stochastic: bool,
    generator: torch.Generator | None,
    meta: torch.dtype,
    expect: tuple | None = None,
    index: torch.dtype | None = None,
) -> RotatedCode | None:
    """The compiled encode of served arguments; where the body cannot serve
    (it does not compile, or failed its check), the reference's with the
    signs already drawn (so that round to nearest gives the reference's code
    for the same generator), or None for a check's probe (``expect``, the
    configuration it must select; ``index``: its noise counter's dtype)."""
    rows, cols = x.shape
    with torch.no_grad():
        neg = random_signs(cols, generator, x.device)  # drawn first, as the reference does
        y = rotate(x, 1.0 - 2.0 * neg.to(torch.float32), block)
        group_key, _, args = encoder_setup(y, bits, cols, stochastic, generator, False, meta, index)
        key = (adaptive, x.dtype, *group_key)
        if expect is not None and key != expect:
            raise AssertionError(f"the probe selected {key}, not {expect}")
        check = functools.partial(_check_rotated, key)
        out = build.run(_rotated_encoder, key, (x, y, _limit(block), *args[1:]), check)
        if out is None:
            if expect is not None:
                return None
            return ref.encode_with_signs(x, neg, bits, block, cols, adaptive=adaptive,
                                         stochastic=stochastic, generator=generator,
                                         meta_dtype=meta)  # fmt: skip
        plain = out[-1]

        def groups_of(mask: Tensor) -> Tensor:  # the rows the body coded, poisoned ones
            return torch.where(plain.unsqueeze(1), x.float(), y)[mask]

        inner = encoder_finish(out, group_key, rows, cols, cols, bits, False, groups_of)
        return RotatedCode(inner, ref_pack.pack_mask(neg.bool()), ref_pack.pack_mask(plain), block)


def _probe(group_size: int, levels: int, dtype: torch.dtype) -> Tensor:
    """Rows of ``group_size`` values: the group encoder's hard cases (ties,
    non-finite, huge, subnormal, signed zeros), and rows the adaptive test
    rotates (an outlier among small values) and keeps (one-sided values)."""
    gen = torch.Generator().manual_seed(1)
    outlier = torch.randn(2, group_size, generator=gen) * 0.1
    outlier[:, 1] = torch.tensor([40.0, -25.0])
    one_sided = torch.rand(2, group_size, generator=gen) + torch.tensor([[0.0], [3.0]])
    x = torch.cat([hard_groups(group_size, levels), outlier, one_sided])
    return x.to(dtype)


def _check_rotated(key: tuple) -> bool:
    """Whether the configuration ``key`` codes a probe of it as the reference
    does, the noise of stochastic rounding given to the reference; the group
    encoder's own configuration is checked first (its check)."""
    adaptive, dtype, *group_key = key
    block = 16  # the probe's rows beyond the limit (3.3e38, Inf) are beyond every block's
    if not _check_encoder(tuple(group_key)):
        return False
    stochastic, meta = group_key[2], group_key[3]
    cols, bits = probe_size(tuple(group_key))
    x = _probe(cols, (1 << bits) - 1, dtype)
    got = _encode(x, bits, block, adaptive, stochastic, torch.Generator().manual_seed(0), meta,
                  expect=key, index=group_key[5])  # fmt: skip
    if got is None:  # the body could not be compiled: the reference serves anyway
        return True
    gen = torch.Generator().manual_seed(0)
    values, plain = rotated_rows(x, random_signs(cols, gen, x.device), block, cols, adaptive)
    noise = uniform(torch.arange(x.numel()), random_key(gen, x.device)) if stochastic else None
    want = ref_quantize_groups(values, bits, cols, stochastic=False, noise=noise, meta_dtype=meta)
    return (
        same_bits(got.plain, ref_pack.pack_mask(plain))
        and same_bits(got.inner.packed, want.packed)
        and same_bounds(got.inner.lo, want.lo)
        and same_bounds(got.inner.hi, want.hi)
    )


def _unrotated_decoder(dtype: torch.dtype):
    big = torch.finfo(dtype).max
    clamp = big < torch.finfo(torch.float32).max

    def decode_rotated(y: Tensor, z: Tensor, signs: Tensor, plain: Tensor):
        # y: the dequantized (rows, cols) float32; z: y rotated back by H; signs,
        # plain: the code's packed bits.  The reference's ops (unrotate,
        # hadamard_decode) after its matmul, in its order.
        rows, cols = y.shape
        shifts = torch.arange(8, dtype=torch.uint8, device=y.device)
        neg = ((signs.unsqueeze(1) >> shifts) & 1).view(-1)[:cols]
        keep = ((plain.unsqueeze(1) >> shifts) & 1).view(-1)[:rows].bool()
        x = torch.where(keep.unsqueeze(1), y, z * (1.0 - 2.0 * neg.to(torch.float32)))
        if clamp:  # a finite value must not round to Inf
            x = torch.where(torch.isfinite(x), x.clamp(-big, big), x)
        return (x.to(dtype),)

    return decode_rotated


def _mask_ok(packed: Tensor, bits: int) -> bool:
    return packed.dtype == torch.uint8 and packed.dim() == 1 and packed.numel() * 8 >= bits


def hadamard_decode(code: RotatedCode, dtype: torch.dtype = torch.float32) -> Tensor:
    """Compiled :func:`actpack.codecs.hadamard.hadamard_decode` (same signature
    and result, bit for bit but for the payload of a NaN)."""
    numel = code.rows * code.cols
    block = code.block
    ok = dtype in _FLOATS and 0 < numel <= DECODE_MAX_NUMEL and isinstance(block, int)
    ok = ok and block >= 1
    ok = ok and not block & (block - 1)
    ok = ok and _mask_ok(code.signs, code.cols) and _mask_ok(code.plain, code.rows)
    if torch.compiler.is_compiling() or not ok:
        return ref.hadamard_decode(code, dtype)
    with torch.no_grad():
        y = dequantize_groups(code.inner, torch.float32)
        z = apply_blocks(y, code.block)
        args = (y, z, code.signs.detach(), code.plain.detach())
        out = build.run(
            _unrotated_decoder, (dtype,), args, functools.partial(_check_decoder, dtype)
        )
    return ref.hadamard_decode(code, dtype) if out is None else out[0]


def _check_decoder(dtype: torch.dtype) -> bool:
    """Whether the decoder for ``dtype`` decodes a reference code of the
    probe's rows (rotated and unrotated, non-finite and huge) as the
    reference, NaN payloads aside (:func:`~actpack.codecs.compiled.verify.same_values`)."""
    # 64 columns: the group decoder's 3-bit words then come in two chunks a
    # group, as in its own check (one chunk would compile another artifact).
    x = _probe(64, 7, torch.float32)
    x[-1, 3] = 1e6  # beyond float16's range once decoded
    code = ref.hadamard_encode(x, 3, 16, adaptive=True, stochastic=False)
    got = hadamard_decode(code, dtype)
    return same_values(got, ref.hadamard_decode(code, dtype))
