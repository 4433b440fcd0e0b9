"""The TorchInductor-compiled CPU codecs against the pure-PyTorch reference.

Same checks as the Triton kernels (``fused_checks.py``): round to nearest is
bit-identical (packed bytes, lo, hi, LFC; every encode x decode pairing),
stochastic rounding is unbiased, within one step, and the same distribution
as the reference's.  Plus what is particular to compiling: every bit width
1..8 and float dtype, awkward sizes (tails, tiny, empty), signed zeros and
subnormals in the outward rounding, the absence of full-size float32
temporaries, the dispatch, and the fallback with one warning when compiling
fails.

A fallback to the reference would make the equality checks pass vacuously,
so :class:`CompileFallbackWarning` is an error in this module.  The first
run compiles several dozen small graphs (one per bit width where the
encoder packs in its body; minutes on a loaded 2-core machine); Inductor's
on-disk cache makes later runs fast.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn.functional as F
from fused_checks import (
    DTYPES,
    assert_division_matches_reference,
    assert_division_unbiased,
    assert_generator_semantics,
    assert_groups_match_reference,
    assert_groups_unbiased,
    assert_order_matters,
    check_division,
    check_groups,
    compiled_codecs_only,
    order_sensitive_map,
    perturbed,
    same,
    same_bound,
    same_code,
    same_division,
)

import actpack
from actpack.codecs import backend
from actpack.codecs import division as rdiv
from actpack.codecs import groupquant as rgq
from actpack.codecs import pack as rpack
from actpack.codecs.compiled import bits as cbits
from actpack.codecs.compiled import build
from actpack.codecs.compiled import division as cdiv
from actpack.codecs.compiled import groupquant as cgq
from actpack.codecs.counter_noise import random_key, uniform
from actpack.strategies import ActNN, Division, SaveInfo

pytestmark = compiled_codecs_only()


@pytest.fixture(autouse=True)
def _fresh_size_budget(monkeypatch):
    """Every test's maps get compiled block means, however many sizes the
    tests before it used in this process (see cdiv.SizeBudget)."""
    monkeypatch.setattr(cdiv, "_SIZES", cdiv.SizeBudget(8))


# --------------------------------------------------------------------------------------
# ActNN groups: round to nearest is bit-identical
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", range(1, 9))
def test_groups_every_bit_width(bits):
    """(3, 257): a tail group and a code count that is no multiple of a word."""
    check_groups(cgq, torch.randn(3, 257) * 3 + 1, bits, 256)
    check_groups(cgq, torch.randn(2, 4096), bits, 256)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (1, 3), (3, 255), (1, 1000), (64, 1024)])
def test_groups_dtypes_and_sizes(shape, dtype):
    x = (torch.randn(shape) * 3 + 1).to(dtype)
    check_groups(cgq, x, 2, 256, out_dtypes=[dtype, torch.float32])


@pytest.mark.parametrize(("bits", "dtype"), [(2, torch.float32), (4, torch.float32),
                                             (8, torch.float32), (2, torch.bfloat16)])  # fmt: skip
def test_groups_zero_exact(bits, dtype):
    x = torch.relu(torch.randn(3, 600)).to(dtype)
    x[1, :256] = 0  # a group without positive values
    x[2, 5] = 1e-45  # a positive subnormal: code >= 1 keeps it positive
    _, got = check_groups(cgq, x, bits, 256, zero_exact=True, out_dtypes=[dtype, torch.float32])
    y = cgq.dequantize_groups(got, dtype)
    assert torch.equal(y == 0, x == 0)


@pytest.mark.parametrize(
    ("shape", "gs", "bits"),
    [((3, 20), 7, 2), ((2, 100), 49, 2), ((3, 10), 3, 1), ((1, 40), 5, 4), ((2, 5), 1, 2),
     ((1, 5000), 4500, 3)],
)  # fmt: skip
def test_groups_awkward_group_sizes(shape, gs, bits):
    check_groups(cgq, torch.randn(shape), bits, gs, out_dtypes=[torch.float32, torch.bfloat16])


# Every bit width 1-7 once, each input dtype with an odd and an even one
# (each bit width is its own compiled configuration: seconds of Inductor
# time apiece, so not the full product).
@pytest.mark.parametrize(("bits", "shape", "gs", "dtype"), [
    (1, (3, 65), 8, torch.float32), (4, (3, 65), 8, torch.float32),
    (7, (3, 65), 8, torch.float32), (2, (5, 72), 24, torch.float16),
    (5, (5, 72), 24, torch.float16), (3, (2, 80), 40, torch.bfloat16),
    (6, (2, 80), 40, torch.bfloat16)])  # fmt: skip
def test_groups_packed_in_the_body(bits, shape, gs, dtype):
    """Group sizes of whole words (``bits.packs_rows``) pack inside the encoder
    body, and poisoned groups get their classes written into the packed bytes:
    both, with or without a tail group, against the reference; groups of 4
    codes (odd bits need 8) fall back to the separate packer."""
    x = (torch.randn(shape) * 2).to(dtype)
    x[0, 1], x[-1, -1] = float("nan"), -float("inf")  # the last: a tail group when ragged
    x[1, gs] = float("inf")
    for width in (gs, 4):
        assert cbits.packs_rows(bits, width) == (width % (4 if bits % 2 == 0 else 8) == 0)
    check_groups(cgq, x, bits, gs, out_dtypes=[dtype, torch.float32])
    if bits >= 2:
        check_groups(cgq, x.abs(), bits, gs, zero_exact=True, out_dtypes=[torch.float32])
    # A strided input of whole groups (its codes keep its strides in the body),
    # on both paths: grad mode on makes the standalone artifacts step aside.
    x = torch.randn(2 * gs, 3).to(dtype).t()
    check_groups(cgq, x, bits, gs)
    with torch.enable_grad():
        check_groups(cgq, x, bits, gs)


@pytest.mark.parametrize("split", [True, False])
def test_groups_both_range_reductions(monkeypatch, split):
    """Both forms of the group encoders (on AVX-512: ranges by
    ``arith.split_extremes``, two passes over the input; on other CPUs: plain
    ``amin``/``amax``, one fused pass per group) code as the reference does,
    whichever this machine picks: round to nearest with non-finite values and
    signed zeros, and stochastic codes given the hashed noise."""
    monkeypatch.setattr(cgq, "avx512_vectors", lambda: split)
    keys = []
    run = build.run
    monkeypatch.setattr(build, "run", lambda f, key, *a: keys.append(key) or run(f, key, *a))
    x = torch.randn(4, 512) * 3
    x[0, 3], x[1, 300], x[2, 5], x[3, :256] = float("nan"), -float("inf"), -0.0, -0.0
    check_groups(cgq, x, 2, 256)
    got = cgq.quantize_groups(x, 2, 256, generator=torch.Generator().manual_seed(3))
    noise = uniform(torch.arange(x.numel()), random_key(torch.Generator().manual_seed(3)))
    same_code(got, rgq.quantize_groups(x, 2, 256, noise=noise))
    encoders = [key for key in keys if len(key) == 10]
    assert {key[7] for key in encoders} == {split}  # the encoders' ``split``
    assert {key[9] for key in encoders} == {not split}  # one pass per group without AVX-512


def test_pack_rows_is_the_stream():
    """pack_rows of a (rows, width) block is the stream of its codes."""
    for bits in range(1, 8):
        width = 8 * 5
        codes = torch.randint(0, 1 << bits, (3, width), dtype=torch.uint8)
        want = rpack.pack_bits(codes, bits)
        assert torch.equal(cbits.pack_rows(codes, bits).reshape(-1), want)


@pytest.mark.parametrize(("bits", "gs", "dtype"), [
    (1, 64, torch.float32), (2, 256, torch.float32), (2, 16, torch.bfloat16),
    (4, 24, torch.float16), (8, 40, torch.float32), (8, 12, torch.float32),
    (3, 64, torch.float32), (3, 48, torch.float32)])  # fmt: skip
def test_decoder_reads_the_streams_words(monkeypatch, bits, gs, dtype):
    """Bit widths dividing 32 with whole words per group (8 bits: pairs of
    words; 3, 5, 6, 7 bits: chunks of 32 codes, some straddling two words;
    both on CPUs without AVX-512, forced here) decode straight from the
    packed stream's int32 words (no uint8 codes array); a stream whose
    bytes are not 4-aligned (a view at an odd offset) takes the unpacking
    path; both decode as the reference, poisoned groups' classes included."""
    unpacked = []
    real = cgq.unpack_codes
    monkeypatch.setattr(cgq, "unpack_codes", lambda *a: unpacked.append(a) or real(*a))
    x = (torch.randn(6, 4 * gs) * 3).to(dtype)
    ref = rgq.quantize_groups(x, bits, gs, stochastic=False)
    monkeypatch.setattr(cgq, "avx512_vectors", lambda: False)
    words = gs % (32 if bits in (3, 5, 6, 7) else max(32 // bits, 8)) == 0
    assert (cgq._words(ref) is not None) == words
    same(cgq.dequantize_groups(ref, dtype), rgq.dequantize_groups(ref, dtype))
    unpacked.clear()  # the first call's verification probe holds poisoned groups
    cgq.dequantize_groups(ref, dtype)
    assert len(unpacked) == (0 if words else 1)
    x[1, 3], x[4, -1], x[5, 0] = float("nan"), float("inf"), -float("inf")
    ref = rgq.quantize_groups(x, bits, gs, stochastic=False)
    same(cgq.dequantize_groups(ref, dtype), rgq.dequantize_groups(ref, dtype))
    shifted = torch.empty(ref.packed.numel() + 1, dtype=torch.uint8)[1:]
    shifted.copy_(ref.packed)
    odd = dataclasses.replace(ref, packed=shifted)
    assert cgq._words(odd) is None
    same(cgq.dequantize_groups(odd, torch.float32), rgq.dequantize_groups(ref, torch.float32))
    unpacked.clear()  # (as above: this configuration's probe ran on the first call)
    cgq.dequantize_groups(odd, torch.float32)
    assert len(unpacked) == 1


def _spaced(t: torch.Tensor) -> torch.Tensor:
    """``t``'s values in a view with a gap after every element (every stride doubled)."""
    buf = torch.zeros(*t.shape, 2, dtype=t.dtype)
    buf[..., 0] = t
    return buf[..., 0]


@pytest.mark.parametrize("avx512", [True, False])
def test_eight_bit_words_only_without_avx512(monkeypatch, avx512):
    """8-bit codes are read as word pairs, and codes straddling words (3, 5, 6,
    7 bits) as chunks of words, only where vectors are not AVX-512's (8 bits
    slower there, BENCHMARKS.md round 6; the others not measured there);
    2-bit codes as words on both."""
    monkeypatch.setattr(cgq, "avx512_vectors", lambda: avx512)
    x = torch.randn(4, 256)
    for bits in (3, 5, 6, 7, 8):
        code = rgq.quantize_groups(x, bits, 64, stochastic=False)
        assert (cgq._words(code) is None) == avx512
    assert cgq._words(rgq.quantize_groups(x, 2, 64, stochastic=False)) is not None


@pytest.mark.parametrize("field", ["packed", "lo", "hi", "lo-transposed", "hi-transposed"])
@pytest.mark.parametrize("bits", [2, 3])
def test_hand_built_group_codes_with_strided_fields(field, bits):
    """A code built by hand may hold views with gaps (a packed stream of
    stride 2, strided ranges): the compiled decoder reads them as the
    reference does (the word paths of 2 and 3 bits included), never the gaps."""
    x = torch.randn(130, 300)
    x[3, 5] = float("nan")  # a poisoned group: its classes are read from the codes
    ref = rgq.quantize_groups(x, bits, 64, stochastic=False)
    name, _, how = field.partition("-")
    value = getattr(ref, name)
    value = value.t().contiguous().t() if how else _spaced(value)  # column-major, or gaps
    code = dataclasses.replace(ref, **{name: value})
    # a strided stream is unpacked; 3 bits reads words where 8-bit pairs do (word_bits)
    assert (cgq._words(code) is None) == (name == "packed" or bits not in cgq.word_bits())
    same(backend.dequantize_groups(code, backend="compiled"), rgq.dequantize_groups(ref))


@pytest.mark.parametrize("field", ["lfc", "packed", "lo", "hi"])
def test_hand_built_division_codes_with_strided_fields(field):
    """As above, for DIVISION's block means and its residual's code."""
    x = torch.randn(4, 8, 16, 16)
    x[1, 2, 3, 4] = float("inf")
    ref = rdiv.division_encode(x, 8, 2, stochastic=False)
    if field == "lfc":
        code = dataclasses.replace(ref, lfc=_spaced(ref.lfc))
    else:
        code = dataclasses.replace(
            ref, hfc=dataclasses.replace(ref.hfc, **{field: _spaced(getattr(ref.hfc, field))})
        )
    same(
        backend.division_decode(code, torch.float32, backend="compiled"),
        rdiv.division_decode(ref, torch.float32),
    )


@pytest.mark.parametrize("meta", [torch.float16, torch.float32])
def test_groups_meta_dtypes(meta):
    x = torch.randn(3, 257) * 100
    x[0, :3] = torch.tensor([7e4, -9e4, 3.0])  # beyond float16: saturates at its maximum
    _, got = check_groups(cgq, x, 2, 256, meta=meta)
    assert torch.isfinite(got.lo).all() and torch.isfinite(got.hi).all()


def test_groups_strided_input():
    x = torch.randn(300, 3).t()  # (3, 300), column stride 3
    assert not x.is_contiguous()
    check_groups(cgq, x, 2, 256)


def test_groups_signed_zeros_and_subnormals():
    """The int32 outward rounding of bfloat16 ranges (arith.round_out) at its edges:
    groups of zeros of either sign, values below bfloat16's subnormals, exact
    bfloat16 values, and values next to its maximum."""
    rows = [
        [0.0] * 16,
        [-0.0] * 16,
        [0.0, -0.0] * 8,
        [1e-42, 2e-45, 1e-9, 3e-8, 0.0] * 3 + [1e-42],
        [-1e-42, -2e-45, -1e-9, -3e-8, -0.0] * 3 + [-1e-42],
        [1.0, 2.0, -0.5, 0.25] * 4,
        [3.38e38, -3.38e38, 1.0, 3.3e38] * 4,
        [9.2e-41, -9.2e-41, 5.9e-39, -1.2e-38] * 4,
    ]
    x = torch.tensor(rows, dtype=torch.float32)
    for zero_exact in (False, True):
        check_groups(cgq, x.abs() if zero_exact else x, 2, 16, zero_exact=zero_exact,
                     out_dtypes=[torch.float32, torch.bfloat16])  # fmt: skip


@pytest.mark.parametrize(("bits", "dtype"), [(1, torch.float32), (2, torch.float32),
                                             (4, torch.float32), (2, torch.float16),
                                             (2, torch.bfloat16)])  # fmt: skip
def test_groups_nonfinite_classes(bits, dtype):
    x = torch.randn(3, 300)
    x[0, 3], x[0, 9], x[0, 200] = float("nan"), float("inf"), -float("inf")
    x[1, 260] = float("inf")  # in the tail group
    x[2, :256] = 1.0  # constant group
    x = x.to(dtype)
    _, got = check_groups(cgq, x, bits, 256, out_dtypes=[dtype, torch.float32])
    y = cgq.dequantize_groups(got, torch.float32)
    assert torch.isnan(got.lo[0, 0]) and torch.isnan(got.lo[1, 1])
    assert not torch.isnan(got.lo[2]).any()
    if bits >= 2:
        assert y[0, 9] == float("inf") and y[0, 200] == -float("inf") and y[1, 260] == float("inf")
    assert torch.isnan(y[0, :256]).sum() == 256 - (2 if bits >= 2 else 0)
    assert torch.isfinite(y[2]).all()


def test_groups_extreme_finite_ranges():
    """Ranges overflowing float32 (the k = 0.5 path) and values at the meta limit."""
    x = torch.randn(2, 512)
    x[0, 0], x[0, 1] = -3.3e38, 3.3e38
    x[1, 5] = 3.4e38  # beyond bf16's finite range: saturates
    x[1, 300] = 1e-40  # subnormal
    check_groups(cgq, x, 2, 256, out_dtypes=[torch.float32, torch.float16, torch.bfloat16])


def test_groups_float64_input():
    check_groups(cgq, torch.randn(3, 300, dtype=torch.float64), 2, 256, out_dtypes=[torch.float32])


def test_decode_of_stochastic_codes_identical():
    x = torch.randn(3, 600) * 2
    for code in (rgq.quantize_groups(x, 2, 256), cgq.quantize_groups(x, 2, 256)):
        for out in (torch.bfloat16, torch.float32):
            same(cgq.dequantize_groups(code, out), rgq.dequantize_groups(code, out))


def test_groups_empty_and_invalid_follow_the_reference():
    empty = cgq.quantize_groups(torch.zeros(0, 5), 2, 4)
    same_code(empty, rgq.quantize_groups(torch.zeros(0, 5), 2, 4))
    assert cgq.dequantize_groups(empty).shape == (0, 5)
    with pytest.raises(ValueError, match="bits"):
        cgq.quantize_groups(torch.randn(2, 8), 9, 4)
    with pytest.raises(ValueError, match="2-D"):
        cgq.quantize_groups(torch.randn(8), 2, 4)
    code = cgq.quantize_groups(torch.randn(2, 8), 2, 4)
    short = rgq.GroupCode(code.packed[:1], code.lo, code.hi, 2, 8, 4, 2, False)
    with pytest.raises(ValueError, match="bytes"):
        cgq.dequantize_groups(short)


# --------------------------------------------------------------------------------------
# ActNN groups: stochastic rounding
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("bits", "zero_exact", "dtype"), [(2, False, torch.float32),
                                                          (2, True, torch.float32),
                                                          (4, False, torch.bfloat16)])  # fmt: skip
def test_groups_stochastic_unbiased(bits, zero_exact, dtype):
    assert_groups_unbiased(cgq, bits, zero_exact, dtype, "cpu")


@pytest.mark.parametrize(("bits", "dtype"), [(2, torch.float32), (4, torch.bfloat16)])
def test_groups_stochastic_matches_reference(bits, dtype):
    assert_groups_match_reference(cgq, bits, dtype, "cpu")


@pytest.mark.parametrize(("bits", "zero_exact", "meta"), [
    (1, False, torch.bfloat16), (2, False, torch.float16), (2, True, torch.bfloat16),
    (8, False, torch.float16)])  # fmt: skip
def test_groups_stochastic_codes_are_the_references_for_the_same_noise(bits, zero_exact, meta):
    """Given the hashed noise it draws, the compiled encoder's stochastic codes
    are the reference's bit for bit: constant groups, ranges saturated at the
    meta dtype's maximum (float16: t far beyond 2**31), overflowing ranges,
    subnormals and a tail group included."""
    x = torch.randn(6, 300) * 3
    x[0] = 1.5  # constant groups: step 0 in the reference
    x[1, :256] *= 1e30  # float16 bounds saturate at 65504
    x[2, 0], x[2, 1] = -3.3e38, 3.3e38  # hi - lo overflows: k = 0.5
    x[3] *= 1e-40  # subnormal
    x[4, 7] = 3.4e38  # beyond bfloat16's finite range
    if zero_exact:
        x = x.abs() * (torch.rand(x.shape) > 0.3)
    got = cgq.quantize_groups(
        x, bits, 256, generator=torch.Generator().manual_seed(5), zero_exact=zero_exact,
        meta_dtype=meta,
    )  # fmt: skip
    key = random_key(torch.Generator().manual_seed(5))  # the compiled encoder's first draw
    noise = uniform(torch.arange(6 * 2 * 256), key)
    want = rgq.quantize_groups(x, bits, 256, zero_exact=zero_exact, meta_dtype=meta, noise=noise)
    same_code(got, want)


def test_groups_stochastic_generator_semantics():
    assert_generator_semantics(cgq, "cpu")


def _same_draws(encode, x, layouts):
    """Stochastic codes (a GroupCode) of ``x`` in several memory layouts, one key
    each time: the noise of an element is a function of its logical index, so
    the codes must be identical whatever the layout and whichever compiled
    body ran."""
    assert all(lay.shape == x.shape and torch.equal(lay, x) for lay in layouts)
    assert len({lay.stride() for lay in layouts}) == len(layouts)
    codes = [encode(lay, torch.Generator().manual_seed(7)) for lay in layouts]
    for other in codes[1:]:
        same(other.packed, codes[0].packed)
    return codes[0]


@pytest.mark.parametrize(("shape", "gs"), [((6, 512), 256), ((3, 300), 256), ((2, 1024), 128)])
def test_groups_stochastic_codes_independent_of_layout(shape, gs):
    """(rows, whole groups) contiguous runs the grouped body, other layouts and
    tail groups the padded body: the same counter, so the same codes."""
    x = torch.randn(shape)
    layouts = [x, x.t().contiguous().t(), torch.cat([x, x], 1)[:, : shape[1]]]

    def encode(lay, gen):
        return cgq.quantize_groups(lay, 2, gs, generator=gen)

    got = _same_draws(encode, x, layouts)
    same(got.lo, cgq.quantize_groups(x, 2, gs, stochastic=False).lo)


@pytest.mark.parametrize("bits", [1, 2, 4])
@pytest.mark.parametrize("shape", [(4, 512), (3, 300)])
def test_groups_stochastic_nonfinite_classes(bits, shape):
    """Under stochastic rounding too (the classes are written after the compiled
    body): poisoned groups decode to the reference's values exactly, the
    others stay within one step of x."""
    x = torch.randn(shape) * 3
    x[0, 3], x[0, 9], x[0, 200] = float("nan"), float("inf"), -float("inf")
    x[2, -1] = float("inf")  # the last group (a tail group for 300 columns)
    gen = torch.Generator().manual_seed(3)
    got = cgq.quantize_groups(x, bits, 256, generator=gen)
    want = rgq.quantize_groups(x, bits, 256, stochastic=False)
    y, y_ref = cgq.dequantize_groups(got), rgq.dequantize_groups(want)
    poisoned = torch.isnan(want.lo).repeat_interleave(256, 1)[:, : shape[1]]
    assert torch.equal(torch.isnan(got.lo), torch.isnan(want.lo))
    same(y[poisoned], y_ref[poisoned])
    step = ((want.hi.float() - want.lo.float()) / ((1 << bits) - 1)).repeat_interleave(256, 1)
    err = (y - x).abs()[~poisoned]
    assert (err <= step[:, : shape[1]][~poisoned] * (1 + 1e-6)).all()


# --------------------------------------------------------------------------------------
# DIVISION
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", [7, 14, 28])
@pytest.mark.parametrize("spatial", [1, 2, 3])
def test_division_rtn_identical(size, dtype, spatial):
    shape = (2, 3) + (4,) * (spatial - 1) + (size,) if spatial != 2 else (2, 3, size, size)
    x = (torch.randn(shape) * 2 + 0.5).to(dtype)
    check_division(cdiv, x, out_dtypes=[dtype, torch.float32])


@pytest.mark.parametrize(
    ("shape", "block", "bits"),
    [((2, 3, 7, 7), 8, 1), ((2, 3, 14, 14), 8, 4), ((2, 3, 50), 8, 2), ((1, 2, 5, 6, 7), 4, 2),
     ((2, 3, 9, 10), 4, 8), ((2, 3, 9, 10), 4, 3), ((1, 1, 1), 8, 2), ((3, 2, 1, 1), 8, 2)],
)  # fmt: skip
def test_division_shapes_and_bits(shape, block, bits):
    check_division(cdiv, torch.randn(shape), block, bits)


@pytest.mark.parametrize(
    ("shape", "block"),
    [((2, 3, 14, 14), 8), ((2, 3, 7, 7), 8), ((1, 2, 5, 6, 7), 4), ((2, 3, 32, 32), 8)],
)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_division_sums_blocks_in_the_reference_order(shape, block, layout):
    """The compiled block means (a body of their own) sum in the reference's
    order, on inputs whose means show the order, in both memory orders."""
    x = order_sensitive_map(shape, block)
    assert_order_matters(x, block)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last_3d if x.dim() == 5 else torch.channels_last)
    check_division(cdiv, x, block, 2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_division_nonfinite_and_overflowing_rows(dtype):
    """Poisoned rows decode to their classes (NaN bit patterns included), only them."""
    x = torch.randn(2, 3, 7, 7)
    x[0, 0, 1, 2] = float("nan")
    x[0, 1, 6, 6] = float("inf")
    x[0, 2, 0, 0] = -float("inf")
    big = 3.3e38 if dtype == torch.float32 else torch.finfo(dtype).max
    x[1, 0, :4] = big  # the block means stay finite, the residual overflows (float32)
    x[1, 0, 4:] = -big
    x = x.to(dtype)
    got = check_division(cdiv, x, out_dtypes=[torch.float32, torch.bfloat16, torch.float16])
    assert (got.lfc[0, :3] == 0).all()
    if dtype == torch.float32:
        assert (got.lfc[1, 0] == 0).all()
    y = cdiv.division_decode(got)
    assert y[0, 1, 6, 6] == float("inf") and y[0, 2, 0, 0] == -float("inf")
    assert torch.isnan(y[0, 0]).all() and torch.isnan(y[0, 1]).sum() == 48
    assert torch.isfinite(y[1]).all()


@pytest.mark.parametrize("layout", ["tokens", "channels_last"])
def test_division_strided_input(layout):
    """Dual's (N, D, L) view of (N, L, D) tokens, and a channels-last map: the
    LFC is spread along the innermost dimension of each."""
    if layout == "tokens":
        x = torch.randn(2, 12, 5).permute(0, 2, 1)
    else:
        x = torch.randn(2, 5, 9, 6).permute(0, 3, 1, 2)
    assert not x.is_contiguous()
    check_division(cdiv, x)


def test_division_stochastic_unbiased():
    assert_division_unbiased(cdiv, "cpu")


def test_division_stochastic_matches_reference():
    assert_division_matches_reference(cdiv, "cpu")


@pytest.mark.parametrize("shape", [(3, 4, 16, 16), (2, 5, 9, 6), (2, 3, 40), (1, 2, 4, 6, 5)])
def test_division_stochastic_codes_independent_of_layout(shape):
    """The noise index is the element's row-major index whatever dimension is
    innermost in memory (channels-last, permuted tokens): identical codes."""
    x = torch.randn(shape)
    perm = [0, *range(2, len(shape)), 1]  # channels innermost in memory
    inv = [perm.index(d) for d in range(len(shape))]
    layouts = [x, x.permute(perm).contiguous().permute(inv)]

    def encode(lay, gen):
        return cdiv.division_encode(lay, 4, 2, generator=gen).hfc

    _same_draws(encode, x, layouts)


def test_division_stochastic_nonfinite_rows():
    """Stochastic DIVISION keeps poisoned rows' classes, and codes a row whose
    residual overflows from x itself (both recomputed after the compiled
    body): LFC 0, every value within one step of its grid."""
    x = torch.randn(2, 3, 8, 8)
    x[0, 1, 2, 3], x[1, 2, 0, 0] = float("nan"), -float("inf")
    x[1, 0, :4], x[1, 0, 4:] = 3.3e38, -3.3e38  # block means finite, residual not
    got = cdiv.division_encode(x, 4, 2, generator=torch.Generator().manual_seed(1))
    y = cdiv.division_decode(got)
    assert torch.isnan(y[0, 1]).all() and y[1, 2, 0, 0] == -float("inf")
    assert torch.isnan(y[1, 2]).sum() == 63
    keep = torch.ones(2, 3, dtype=torch.bool)
    keep[0, 1] = keep[1, 2] = False
    assert torch.isfinite(y[keep]).all()
    assert (got.lfc[1, 0] == 0).all() and (got.lfc[0, 0] != 0).any()
    lo, hi = got.hfc.lo.double().view(2, 3), got.hfc.hi.double().view(2, 3)
    step = (hi[1, 0] - lo[1, 0]) / 3  # float64: the range exceeds float32's
    assert ((y[1, 0].double() - x[1, 0].double()).abs() <= step * (1 + 1e-6)).all()
    want = rdiv.division_encode(x, 4, 2, stochastic=False)
    same_bound(got.hfc.lo, want.hfc.lo)
    same_bound(got.hfc.hi, want.hfc.hi)


# --------------------------------------------------------------------------------------
# Bit packing
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_unpack_bits(bits):
    for numel in (1, 7, 9, 1001):
        codes = torch.randint(0, 2**bits, (numel,), dtype=torch.uint8)
        packed = rpack.pack_bits(codes, bits)
        same(cbits.pack_bits(codes, bits), packed)
        same(cbits.unpack_bits(packed, bits, numel), codes)
        same(cbits.unpack_bits(packed, bits, min(numel, 5)), codes[:5])
    with pytest.raises(ValueError, match="bytes"):
        cbits.unpack_bits(packed[:3], bits, 1001)


def test_masks():
    mask = torch.rand(6, 501).t() > 0.3  # strided
    packed = cbits.pack_mask(mask)
    same(packed, rpack.pack_bits(mask.reshape(-1).to(torch.uint8), 1))
    back = cbits.unpack_mask(packed, mask.shape)
    assert back.dtype == torch.bool and torch.equal(back, mask)


# --------------------------------------------------------------------------------------
# Memory: no full-size float32 temporaries
# --------------------------------------------------------------------------------------

_PEAK_SCRIPT = textwrap.dedent(
    """
    import re, sys, torch
    from actpack.codecs import backend

    def status(key):
        text = open("/proc/self/status").read()
        return int(re.search(key + r":\\s+(\\d+) kB", text).group(1)) * 1024

    name, codec = sys.argv[1], sys.argv[2]
    gen = torch.Generator().manual_seed(0)
    if codec == "groups":
        encode = lambda x: backend.quantize_groups(x, 2, 256, generator=gen, backend=name)
        x = torch.randn(1024, 4096)
    else:
        encode = lambda x: backend.division_encode(x, 8, 2, generator=gen, backend=name)
        x = torch.randn(64, 16, 32, 32)
    encode(x[:4])  # compile (or load) first: its memory is not the codec's
    base = status("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")  # reset the RSS high-water mark
    code = encode(x)
    print((status("VmHWM") - base) / (x.numel() * 4))
    """
)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
@pytest.mark.parametrize("codec", ["groups", "division"])
def test_encode_allocates_no_full_size_float_temporaries(codec):
    """Peak RSS above the input while encoding a 16 MiB float32 tensor, in a fresh
    process whose large blocks are mmapped (so RSS follows live tensors), as a
    fraction of the input's bytes.  The reference allocates several float32
    copies (> 2x); compiled, the uint8 codes (0.25x), the packed codes, a
    bfloat16 LFC spread (DIVISION, 1/16x) and page rounding (< 0.45x)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    env.pop("ACTPACK_BACKEND", None)

    def extra(name: str) -> float:
        out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, name, codec], env=env,
                             capture_output=True, text=True, check=True)  # fmt: skip
        return float(out.stdout.split()[-1])

    assert extra("reference") > 2.0  # the measurement sees temporaries
    assert extra("compiled") < 0.45


# --------------------------------------------------------------------------------------
# Dispatch and fallback
# --------------------------------------------------------------------------------------


_STRICT_SCRIPT = textwrap.dedent("""
    import warnings
    import torch
    from actpack.codecs import groupquant
    from actpack.codecs.compiled import build, groupquant as cgq
    warnings.simplefilter("error")  # as `python -W error`: any warning raises
    x = torch.randn(64, 512)
    code = cgq.quantize_groups(x, 2, 256, stochastic=False)
    ref = groupquant.quantize_groups(x, 2, 256, stochastic=False)
    assert build.available(), "compiled codecs disabled"
    assert torch.equal(code.packed, ref.packed)
    print("ok")
""")


def test_compiles_under_warnings_as_errors():
    """torch's own deprecation notices while Inductor imports and compiles
    (torch.jit.script_method) must not disable the compiled codecs, or raise
    from a pack hook, when the user runs with warnings as errors (fresh
    process: the probe runs once per process)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("ACTPACK_BACKEND", None)
    out = subprocess.run([sys.executable, "-c", _STRICT_SCRIPT], env=env,
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_resolve_backend(monkeypatch):
    monkeypatch.delenv(backend.ENV_VAR, raising=False)
    big = torch.zeros(backend.COMPILED_MIN_NUMEL)
    assert backend.resolve_backend(big) == "compiled"  # auto: CPU tensors large enough
    assert backend.resolve_backend(big[:-1]) == "reference"
    assert backend.resolve_backend(big[:8], numel=big.numel()) == "compiled"
    assert backend.resolve_backend(big[:8], "compiled") == "compiled"  # forcible at any size
    assert backend.resolve_backend(big, "reference") == "reference"
    monkeypatch.setenv(backend.ENV_VAR, "compiled")
    assert backend.resolve_backend(big[:8]) == "compiled"
    with pytest.raises(RuntimeError, match="CPU"):
        backend.resolve_backend(torch.zeros(3, device="meta"), "compiled")


def test_dispatch_functions_match():
    x = torch.randn(2, 300)
    for name in ("reference", "compiled"):
        code = backend.quantize_groups(x, 2, 256, stochastic=False, backend=name)
        same(backend.dequantize_groups(code, backend=name), rgq.dequantize_groups(code))
        m = x > 0
        packed = backend.pack_mask(m, backend=name)
        same(packed, rpack.pack_bits(m.reshape(-1).to(torch.uint8), 1))
        assert torch.equal(backend.unpack_mask(packed, m.shape, backend=name), m)


@pytest.mark.parametrize("strategy", ["actnn", "division"])
def test_strategies_route_through_compiled(monkeypatch, strategy):
    x = torch.randn(2, 4, 14, 14)
    make = (lambda: ActNN(stochastic=False)) if strategy == "actnn" else (
        lambda: Division(stochastic=False))  # fmt: skip
    monkeypatch.setenv(backend.ENV_VAR, "reference")
    want = make().encode(x, SaveInfo(op="conv2d"))
    monkeypatch.setenv(backend.ENV_VAR, "compiled")
    got = make().encode(x, SaveInfo(op="conv2d"))
    same_code(want.code if strategy == "actnn" else want.code.hfc,
              got.code if strategy == "actnn" else got.code.hfc)  # fmt: skip
    same(got.decode(), want.decode())


@pytest.mark.parametrize("op", ["linear", "layer_norm", "scaled_dot_product_attention"])
def test_row_codes_route_through_compiled(monkeypatch, op):
    # actnn-rows (the default): token-row groups, rotated Linear inputs; the
    # rotation is a matmul, its quantization the compiled group codec, so
    # round to nearest gives the reference's codes bit for bit.
    x = torch.randn(4, 40, 130)  # 20,800 elements: over COMPILED_MIN_NUMEL
    x[..., 7] *= 30
    info = SaveInfo(op=op)
    monkeypatch.setenv(backend.ENV_VAR, "reference")
    want = actpack.RowActNN(stochastic=False, seed=0).encode(x, info)
    monkeypatch.setenv(backend.ENV_VAR, "auto")
    assert backend.resolve_backend(x) == "compiled"
    got = actpack.RowActNN(stochastic=False, seed=0).encode(x, info)
    if op == "linear":
        same(got.code.signs, want.code.signs)
        same(got.code.plain, want.code.plain)
        same_code(want.code.inner, got.code.inner)
    else:
        same_code(want.code, got.code)
    same(got.decode(), want.decode())


@pytest.mark.parametrize("strategy", ["actnn", "division"])
def test_end_to_end_gradients_match(monkeypatch, strategy):
    """A conv-BN-ReLU-linear step: round-to-nearest gradients bit for bit."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(8 * 14 * 14, 10),
    )  # fmt: skip
    x = torch.randn(16, 3, 14, 14)
    make = (lambda: ActNN(bits=4, stochastic=False)) if strategy == "actnn" else (
        lambda: Division(bits=4, stochastic=False))  # fmt: skip

    def grads(name):
        monkeypatch.setenv(backend.ENV_VAR, name)
        model.zero_grad()
        with actpack.compress(make(), model=model, min_numel=1024):
            loss = model(x).square().mean()
        loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    for a, b in zip(grads("reference"), grads("compiled")):
        same(a, b)


def _failing_factory():
    def body(x):
        raise RuntimeError("simulated: no C++ compiler")

    return body


def test_compile_failure_falls_back_with_one_warning(monkeypatch):
    """A body that cannot be compiled warns once, then runs the reference."""
    monkeypatch.setattr(cgq, "_encoder", lambda *key: _failing_factory())
    x = torch.randn(2, 300)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = cgq.quantize_groups(x, 2, 256, stochastic=False)
        second = cgq.quantize_groups(x, 2, 256, stochastic=False)
    assert [w.category for w in caught] == [build.CompileFallbackWarning]
    want = rgq.quantize_groups(x, 2, 256, stochastic=False)
    same_code(first, want)
    same_code(second, want)


def test_probe_failure_means_reference(monkeypatch):
    """Where Inductor cannot compile at all, "auto" picks the reference and
    "compiled" runs it too, after one warning."""
    monkeypatch.setattr(build, "_OPTIONS", {"not_an_inductor_option": True})
    build.available.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert not build.available()
            assert not build.available()  # checked once
            big = torch.zeros(backend.COMPILED_MIN_NUMEL)
            assert backend.resolve_backend(big) == "reference"
            assert backend.resolve_backend(big, "compiled") == "reference"
        assert [w.category for w in caught] == [build.CompileFallbackWarning]
    finally:
        build.available.cache_clear()


def test_called_while_dynamo_traces_runs_the_reference_and_stays_enabled():
    """A pack hook running inside a region Dynamo traces (a block compiled
    inside a wrapped model) must not try a nested compile: it runs the
    reference there, with no fallback warning, and the compiled codec keeps
    serving eager calls (a failed nested compile used to disable it)."""
    from actpack.codecs.compiled.build import CompileFallbackWarning

    x = torch.randn(64, 512)

    def lo_of(x):
        return cgq.quantize_groups(x, 2, 256, stochastic=False).lo

    with warnings.catch_warnings():
        warnings.simplefilter("error", CompileFallbackWarning)
        traced = torch.compile(lo_of, backend="aot_eager")(x)
        eager = cgq.quantize_groups(x, 2, 256, stochastic=False)
    ref = rgq.quantize_groups(x, 2, 256, stochastic=False)
    assert torch.equal(traced, ref.lo)
    assert torch.equal(eager.packed, ref.packed)


# --------------------------------------------------------------------------------------
# Inputs and global state the fused code must not misread
# --------------------------------------------------------------------------------------


def _neg_views():
    gen = torch.Generator().manual_seed(5)
    z = torch.randn(5, 700, dtype=torch.cfloat, generator=gen)
    yield z.conj().imag  # the neg bit: memory holds -x
    yield torch._neg_view(torch.randn(3, 512, generator=gen))
    yield torch._neg_view(torch.randn(2, 3, 9, 9, generator=gen))


@pytest.mark.parametrize("backend", ["compiled", "triton"])
def test_pending_negation_is_read_as_its_values(backend):
    # TorchInductor (and Triton) read a tensor's memory: with the neg bit set
    # it holds -x, and the fused codes came out for -x (every sign flipped).
    from actpack.codecs import backend as dispatch

    if backend == "triton" and not dispatch.triton_available():
        pytest.skip("Triton is not importable here")
    for x in _neg_views():
        assert x.is_neg()
        if x.dim() == 2:
            want = dispatch.quantize_groups(x, 3, 256, stochastic=False, backend="reference")
            got = dispatch.quantize_groups(x, 3, 256, stochastic=False, backend=backend)
            same_code(got, want)
        else:
            want = dispatch.division_encode(x, 4, 2, stochastic=False, backend="reference")
            got = dispatch.division_encode(x, 4, 2, stochastic=False, backend=backend)
            torch.testing.assert_close(
                dispatch.division_decode(got, backend="reference"),
                dispatch.division_decode(want, backend="reference"),
                rtol=0,
                atol=0,
            )


def test_float64_default_dtype_takes_the_reference():
    # The bodies' constants follow the default dtype: under float64 they failed
    # to trace, warned, and left the configuration on the reference for good.
    from actpack.codecs import backend as dispatch

    x = torch.randn(5, 700)
    want = dispatch.quantize_groups(x, 3, 256, stochastic=False, backend="reference")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = dispatch.quantize_groups(x, 3, 256, stochastic=False, backend="compiled")
    finally:
        torch.set_default_dtype(previous)
    same_code(got, want)
    again = dispatch.quantize_groups(x, 3, 256, stochastic=False, backend="compiled")
    same_code(again, want)


# Found by a fuzz of the compiled encoder against the reference (2026-11-30):
# codes packed in the body row by row broke the stream where an input row is
# not a whole number of groups.  Rows that are not whole groups also gave
# other codes for two more reasons: a standalone artifact came from
# Inductor's FX graph cache without the guards Inductor had added for the
# sizes it was compiled for (a padded row width of 16 served a width of 256;
# see actpack.codecs.compiled.standalone), and with a float16/bfloat16 input
# the codes of the last groups of a tail of 17 to 31 groups were never
# written (Inductor's 32-lane uint8 store; see _encoder).  Each test runs its
# shapes in order through fresh configurations, so that later shapes get
# artifacts compiled after earlier ones; 85, 18 and 30 groups leave such
# tails.  Round to nearest must be the reference's, bit for bit.
_NOT_WHOLE_GROUPS = [
    # (rows, cols), group size, layout
    ((7, 6), 16, "contiguous"),  # padded row width 16: one LANES vector
    ((33, 16), 256, "contiguous"),  # 16 columns padded to 256
    ((3, 4096), 24, "contiguous"),  # 4096 = 170 groups + 16
    ((17, 137), 33, "contiguous"),
    ((9, 45), 40, "transposed"),
    ((4, 100), 32, "sliced"),
    ((17, 165), 40, "sliced"),
    ((2, 100), 7, "contiguous"),
    ((1, 300), 256, "contiguous"),
    ((16, 46), 16, "transposed"),
]


def _laid_out(shape: tuple[int, int], layout: str, dtype: torch.dtype) -> torch.Tensor:
    rows, cols = shape
    if layout == "transposed":
        return torch.randn(cols, rows).to(dtype).t()
    if layout == "sliced":
        return torch.randn(rows, cols + 5).to(dtype)[:, 2 : 2 + cols]
    return torch.randn(rows, cols).to(dtype)


# Each input dtype once, each with another bit width and meta dtype (every
# case compiles its configurations afresh: ~1 min of Inductor time each on a
# 2-core CPU, so not the full product).
@pytest.mark.parametrize(
    "dtype,bits,zero_exact,meta",
    [
        (torch.float32, 1, False, torch.bfloat16),
        (torch.float16, 3, True, torch.float32),
        (torch.bfloat16, 8, False, torch.float16),
    ],
)
def test_rows_that_are_not_whole_groups_code_as_the_reference(dtype, bits, zero_exact, meta):
    build._compiled.cache_clear()  # fresh configurations: artifacts compiled one after another
    try:
        torch.manual_seed(1)
        for shape, group_size, layout in _NOT_WHOLE_GROUPS:
            x = _laid_out(shape, layout, dtype)
            if zero_exact:
                x = x.abs()
            kw = dict(stochastic=False, zero_exact=zero_exact, meta_dtype=meta)
            ref = rgq.quantize_groups(x, bits, group_size, **kw)
            got = cgq.quantize_groups(x, bits, group_size, **kw)
            where = (shape, group_size, layout)
            assert torch.equal(got.packed, ref.packed), where
            assert torch.equal(got.lo.view(torch.uint8), ref.lo.view(torch.uint8)), where
            assert torch.equal(got.hi.view(torch.uint8), ref.hi.view(torch.uint8)), where
            assert torch.equal(cgq.dequantize_groups(got), rgq.dequantize_groups(ref)), where
    finally:
        build._compiled.cache_clear()


# --------------------------------------------------------------------------------------
# Verification against the reference (another torch's Inductor numerics)
# --------------------------------------------------------------------------------------


def test_a_check_never_passes_for_another_configuration(monkeypatch):
    """A configuration's check must run that configuration on its probe: where
    the probe would select another one (keys no input reaches here), the check
    raises, and build._verify then keeps the reference, with a warning."""
    monkeypatch.setattr(cgq, "avx512_vectors", lambda: True)
    # Split ranges without packing: 1 bit, whole groups of 16 k always pack.
    key = (False, False, False, torch.bfloat16, torch.float32, torch.int32, True, True, None, False)
    with pytest.raises(cgq.OtherConfiguration):
        cgq._check_encoder(key)
    # 3-bit codes are never read as words: the probe decodes them from bytes.
    with pytest.raises(cgq.OtherConfiguration):
        cgq._check_decoder((True, False, torch.bfloat16, torch.float32, 3))


def _pooled_sizes(monkeypatch, budget) -> list:
    """Install ``budget``; the spatial sizes whose block means get compiled
    bodies are appended to the list returned."""
    monkeypatch.setattr(cdiv, "_SIZES", budget)
    compiled = []
    run = build.run

    def spy(factory, key, args, check=None):
        if factory is cdiv._pooler:
            compiled.append(key[1])
        return run(factory, key, args, check)

    monkeypatch.setattr(cdiv.build, "run", spy)
    return compiled


def test_block_means_of_sizes_beyond_the_budget_take_the_reference(monkeypatch):
    """Maps of more spatial sizes than the budget compile no block means body
    for the others: the reference's eager means serve them, the same values."""
    compiled = _pooled_sizes(monkeypatch, cdiv.SizeBudget(1))
    for length in (40, 41, 42):
        x = order_sensitive_map((2, 3, length), 8)
        check_division(cdiv, x, 8, 2)
        check_division(cdiv, x.to(torch.bfloat16), 8, 2)  # a budget of its own
    assert set(compiled) == {(40,)}


def test_the_budget_bounds_maps_smaller_than_the_block(monkeypatch):
    """Maps under the block size in some dimension (whose effective block,
    min(block, size), differs per size) share one budget per rank and
    dtype: the third size of a budget of two takes the reference."""
    compiled = _pooled_sizes(monkeypatch, cdiv.SizeBudget(2))
    for spatial in ((3, 5), (5, 3), (7, 6)):
        check_division(cdiv, order_sensitive_map((2, 3, *spatial), 8), 8, 2)
    assert set(compiled) == {(3, 5), (5, 3)}


def _avg_pool_order(block, spatial, dtype):
    """A block means body that sums in ATen's ``avg_pool`` order, not the
    reference's (a compiler that reassociated the sums)."""

    def block_means(x):
        return F.avg_pool2d(x.float(), block, block, 0, True, False).to(torch.bfloat16)

    return block_means


@pytest.mark.parametrize(
    "codec", ["encode", "decode", "division", "block means", "block means float16"]
)
def test_codes_unlike_the_reference_fall_back_with_one_warning(monkeypatch, codec):
    """A compiled configuration whose codes differ from the reference's on its
    probe is never used: the reference serves it (and every later call of it),
    after one NumericsFallbackWarning for the process."""
    monkeypatch.setattr(build, "_numerics_warned", False)
    build._compiled.cache_clear()
    x = torch.randn(4, 512)
    if codec == "encode":
        monkeypatch.setattr(cgq, "_encoder", perturbed(cgq._encoder))
        tail = torch.randn(3, 300)  # another configuration: no second warning
        calls = [lambda: cgq.quantize_groups(x, 2, 256, stochastic=False),
                 lambda: cgq.quantize_groups(tail, 2, 256, stochastic=False)]  # fmt: skip
        want = [rgq.quantize_groups(v, 2, 256, stochastic=False) for v in (x, tail)]
    elif codec == "decode":
        monkeypatch.setattr(cgq, "_decoder", perturbed(cgq._decoder))
        code = rgq.quantize_groups(x, 2, 256, stochastic=False)
        calls = [lambda: cgq.dequantize_groups(code), lambda: cgq.dequantize_groups(code)]
        want = [rgq.dequantize_groups(code), rgq.dequantize_groups(code)]
    else:
        if codec == "division":
            monkeypatch.setattr(cdiv, "_encoder", perturbed(cdiv._encoder))
            xd = torch.randn(2, 3, 9, 9)
        else:
            monkeypatch.setattr(cdiv, "_pooler", _avg_pool_order)
            xd = order_sensitive_map((2, 3, 16, 16), 8)
            if codec == "block means float16":  # the probe's large terms: below 65504
                xd = (xd * 2.0**-5).to(torch.float16)
        calls = [lambda: cdiv.division_encode(xd, 8, 2, stochastic=False)] * 2
        want = [rdiv.division_encode(xd, 8, 2, stochastic=False)] * 2
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = [call() for call in calls]
        assert [w.category for w in caught] == [build.NumericsFallbackWarning]
        assert torch.__version__ in str(caught[0].message)
        for g, w in zip(got, want):  # the perturbed codes would differ
            if codec != "encode" and codec != "decode":
                same(g.lfc, w.lfc)
                same_code(g.hfc, w.hfc)
            elif codec == "encode":
                same_code(g, w)
            else:
                same(g, w)
    finally:
        build._compiled.cache_clear()


def test_codec_calls_traced_by_dynamo_warn_nothing():
    """The backend's entry points traced in a user's compiled region (a
    codec called inside ``torch.compile``) raise no warning: Dynamo warns
    about every ``functools.cache``d function it meets, and the backend's
    module lookup once was one (a new user's finding)."""
    from actpack.codecs import backend as dispatch

    x = torch.randn(64, 512)  # over COMPILED_MIN_NUMEL: "auto" picks the compiled codecs
    maps = torch.randn(2, 4, 16, 16)
    mask = torch.randn(64, 512) > 0

    def codes(x, maps, mask):
        code = dispatch.quantize_groups(x * 1.0, 2, 256, stochastic=False)
        dual = dispatch.division_encode(maps * 1.0, 8, 2, stochastic=False)
        bits = dispatch.unpack_mask(dispatch.pack_mask(mask), mask.shape)
        y = dispatch.dequantize_groups(code, torch.float32)
        return y + 0, dispatch.division_decode(dual, torch.float32) + 0, bits

    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = torch.compile(codes, backend="eager")(x, maps, mask)
    assert [str(w.message)[:120] for w in caught] == []
    want = codes(x, maps, mask)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_torch_compile_path_traces_each_body_in_one_graph(monkeypatch):
    """Layouts no standalone artifact serves (beyond MAX_ARTIFACTS) take a
    configuration's torch.compile path: each body must trace as one graph.
    The group step's divisor was ``full_like(lok, levels)`` with a 0-d tensor
    ``levels``, a data-dependent ``.item()``: Dynamo broke the graph there
    and recompiled the resumed pieces per row count until its recompile
    limit warned (a new user's finding).  Codes stay the reference's."""
    from torch._dynamo.utils import counters

    from actpack.codecs.compiled import standalone

    monkeypatch.setattr(standalone.Standalone, "__call__", lambda self, args, q: standalone.MISS)
    base = torch.randn(40, 600, generator=torch.Generator().manual_seed(3))
    inputs = [base[:, :256].t(), base[3:19, 5:261], base[3:19, 1:258]]
    inputs += [base[:rows, :512] for rows in (8, 16, 24, 32)]
    counters.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for bits in (2, 8):
            for x in inputs:
                got = cgq.quantize_groups(x, bits, 256, stochastic=False)
                same_code(got, rgq.quantize_groups(x, bits, 256, stochastic=False))
                same(cgq.dequantize_groups(got), rgq.dequantize_groups(got))
        for n in (1, 2, 3):
            maps = torch.randn(n, 4, 16, 16)
            got = cdiv.division_encode(maps, 8, 2, stochastic=False)
            same_division(got, rdiv.division_encode(maps, 8, 2, stochastic=False))
    assert dict(counters["graph_break"]) == {}
    assert [str(w.message)[:100] for w in caught if "recompile" in str(w.message)] == []


@pytest.mark.parametrize("codec", ["groups", "division"])
def test_a_pending_negation_is_read_as_its_values(codec):
    """A negated view (``torch._neg_view``, what ``z.conj().imag`` gives) holds
    -x in memory, which the compiled bodies read: the compiled entry points
    resolve it (the backend's did already; called directly they did not)."""
    gen = torch.Generator().manual_seed(13)
    if codec == "groups":
        x = torch.randn(4, 512, generator=gen)
        same_code(cgq.quantize_groups(torch._neg_view(x), 2, 256, stochastic=False),
                  rgq.quantize_groups(-x, 2, 256, stochastic=False))  # fmt: skip
    else:
        x = torch.randn(2, 3, 16, 16, generator=gen)
        same_division(cdiv.division_encode(torch._neg_view(x), 8, 2, stochastic=False),
                      rdiv.division_encode(-x, 8, 2, stochastic=False))  # fmt: skip
