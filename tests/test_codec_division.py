"""DIVISION dual precision: exact block means, unbiased residual, containment.

The statistical tolerance follows test_codec_groupquant: a decode lies in
[a, a + step] with step = (hi - lo) / L of its HFC row (deterministic, since
the LFC is), so by Hoeffding the mean of n draws is within 3 step / sqrt(n)
of its expectation with probability >= 1 - 3e-8 per element.
"""

from __future__ import annotations

import functools
import itertools
import math

import pytest
import torch
from fused_checks import assert_order_matters, order_sensitive_map

from actpack.codecs import DivisionCode, division_decode, division_encode
from actpack.codecs.division import block_sums

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")),
]


def _row_step(code: DivisionCode) -> torch.Tensor:
    """HFC grid step broadcast to code.shape, float64."""
    h = code.hfc
    step = (h.hi.double() - h.lo.double()) / (2**h.bits - 1)
    n, c = code.shape[:2]
    return step.view(n, c, *([1] * (len(code.shape) - 2))).expand(code.shape)


def _slack(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.double().abs() * (torch.finfo(dtype).eps + 1e-5) + 1e-5


def _check_bound(x: torch.Tensor, code: DivisionCode, y: torch.Tensor, factor: float) -> None:
    err = (y.double() - x.double()).abs()
    assert (err <= factor * _row_step(code).to(err.device) + _slack(x, y.dtype)).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("size", [7, 14, 28, 56, 224])
def test_reconstruction_2d(size: int, device: str) -> None:
    x = torch.randn(2, 3, size, size, device=device) * 2 + 0.5
    gen = torch.Generator(device).manual_seed(size)
    code = division_encode(x, 8, 2, generator=gen)
    b = min(8, size)
    assert code.block == (b, b) and code.shape == tuple(x.shape)
    assert code.lfc.dtype == torch.bfloat16 and code.lfc.shape == (
        2,
        3,
        -(-size // b),
        -(-size // b),
    )
    assert (code.hfc.rows, code.hfc.cols, code.hfc.group_size) == (6, size * size, size * size)
    y = division_decode(code)
    assert y.shape == x.shape and y.dtype == torch.float32
    _check_bound(x, code, y, 1.0)
    assert code.nbytes == code.lfc.numel() * 2 + code.hfc.nbytes


@pytest.mark.parametrize(
    ("shape", "block"),
    [((2, 3, 50), 8), ((2, 3, 5), 8), ((2, 3, 9, 10, 11), 4), ((1, 2, 8, 8, 8), 8)],
)
def test_reconstruction_1d_3d(shape: tuple[int, ...], block: int) -> None:
    x = torch.randn(shape)
    for stochastic, factor in ((True, 1.0), (False, 0.5)):
        code = division_encode(x, block, 3, stochastic=stochastic)
        assert code.block == tuple(min(block, s) for s in shape[2:])
        _check_bound(x, code, division_decode(code), factor)


def _hand_means(x: torch.Tensor, block: int) -> torch.Tensor:
    """Block means by explicit loops over (possibly partial) blocks, float64."""
    spatial = x.shape[2:]
    b = [min(block, s) for s in spatial]
    out = torch.empty(
        *x.shape[:2], *[-(-s // bi) for s, bi in zip(spatial, b)], dtype=torch.float64
    )
    for idx in itertools.product(*[range(o) for o in out.shape[2:]]):
        sl = tuple(slice(i * bi, min((i + 1) * bi, s)) for i, bi, s in zip(idx, b, spatial))
        out[(slice(None), slice(None), *idx)] = x.double()[(slice(None), slice(None), *sl)].mean(
            dim=tuple(range(2, x.dim()))
        )
    return out


@pytest.mark.parametrize(
    ("shape", "block"),
    [((2, 3, 14, 14), 8), ((2, 3, 7, 7), 8), ((1, 2, 5, 6, 7), 4), ((2, 2, 13), 4)],
)
def test_lfc_exact_block_means(shape: tuple[int, ...], block: int) -> None:
    # An offset makes a wrong divisor on partial blocks obvious (e.g. 64 instead of 48).
    x = torch.randn(shape) + 3.0
    code = division_encode(x, block, 2)
    want = _hand_means(x, block)
    # Only the bf16 storage rounding (<= 2^-9 relative) separates the two.
    assert ((code.lfc.double() - want).abs() <= want.abs() * 2.0**-8 + 1e-6).all()


def _hand_sums(x: torch.Tensor, block: int) -> torch.Tensor:
    """float32 block sums in the specified order, block by block: the block
    (padded with +0.0 to whole size) reduced over its outermost dim first,
    slice after slice."""
    spatial = x.shape[2:]
    b = [min(block, s) for s in spatial]
    out = torch.empty(*x.shape[:2], *[-(-s // bi) for s, bi in zip(spatial, b)])
    for idx in itertools.product(*[range(o) for o in out.shape[2:]]):
        sl = tuple(slice(i * bi, min((i + 1) * bi, s)) for i, bi, s in zip(idx, b, spatial))
        e = torch.zeros(*x.shape[:2], *b)
        e[(slice(None), slice(None), *[slice(0, t.stop - t.start) for t in sl])] = x[
            (slice(None), slice(None), *sl)
        ]
        while e.dim() > 2:
            s = e[:, :, 0]
            for j in range(1, e.shape[2]):
                s = s + e[:, :, j]
            e = s
        out[(slice(None), slice(None), *idx)] = e
    return out


@pytest.mark.parametrize(
    ("shape", "block"),
    [((2, 3, 14, 14), 8), ((2, 3, 7, 7), 8), ((1, 2, 5, 6, 7), 4), ((2, 2, 13), 4),
     ((2, 3, 16, 16), 8)],
)  # fmt: skip
def test_lfc_sums_in_the_specified_order(shape: tuple[int, ...], block: int) -> None:
    """The LFC is the bf16 of a float32 sum in ``block_sums``' order over the
    covered count, bit for bit, on inputs whose means depend on the order
    (ATen's ``avg_pool`` sums 2-D and 3-D blocks otherwise and differs here)."""
    x = order_sensitive_map(shape, block, seed=len(shape) + block)
    if len(shape) > 3:
        assert_order_matters(x, block)
    eff = tuple(min(block, s) for s in shape[2:])
    sums = _hand_sums(x, block)
    assert torch.equal(block_sums(x, eff), sums)
    count = _hand_sums(torch.ones(shape), block)  # the covered elements, exactly
    assert count.sum() == math.prod(shape)  # each element in one block
    want = (sums / count).to(torch.bfloat16)
    assert torch.equal(division_encode(x, block, 2).lfc.view(torch.int16), want.view(torch.int16))


def test_lfc_rounding_moves_into_hfc() -> None:
    # Constant blocks whose mean is not a bf16 value: the HFC carries the difference.
    x = torch.full((1, 1, 8, 8), 0.1)
    code = division_encode(x, 8, 2, stochastic=False)
    assert code.lfc.float().item() != 0.1
    assert (division_decode(code) - x).abs().max() <= 1e-7


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_unbiased(bits: int) -> None:
    n = 2000
    x = torch.randn(1, 2, 14, 14)
    code = division_encode(
        x.expand(n, 2, 14, 14), 8, bits, generator=torch.Generator().manual_seed(bits)
    )
    mean = division_decode(code).double().mean(0)
    step = _row_step(code)[0]
    assert (step > 0).all()
    assert ((mean - x[0].double()).abs() <= 3 * step / math.sqrt(n) + 1e-5).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_input(dtype: torch.dtype) -> None:
    x = (torch.randn(2, 3, 28, 28) * 4).to(dtype)
    for stochastic, factor in ((True, 1.0), (False, 0.5)):
        code = division_encode(x, 8, 2, stochastic=stochastic)
        y = division_decode(code, dtype)
        assert y.dtype == dtype
        _check_bound(x, code, y, factor)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", [1, 2, 8])
def test_nonfinite_contained_per_row(bits: int, device: str) -> None:
    x = torch.randn(2, 3, 14, 14, device=device)
    x[0, 1, 3, 3] = math.nan
    x[1, 0, 5, 5] = math.inf
    x[1, 2, 0, 13] = -math.inf
    code = division_encode(x, 8, bits)
    y = division_decode(code)
    bad = torch.zeros(2, 3, dtype=torch.bool, device=device)
    bad[0, 1] = bad[1, 0] = bad[1, 2] = True
    assert torch.equal(torch.isnan(code.hfc.lo).view(2, 3), bad)
    rows = bad.view(2, 3, 1, 1).expand_as(x)
    if bits >= 2:
        assert torch.equal(torch.isnan(y), rows & ~torch.isinf(x))
        assert torch.equal(torch.isposinf(y), torch.isposinf(x))
        assert torch.equal(torch.isneginf(y), torch.isneginf(x))
    else:
        assert torch.isnan(y[rows]).all()
    assert torch.isfinite(y[~rows]).all()
    err = (y[~rows].double() - x[~rows].double()).abs()
    assert (err <= _row_step(code).to(device)[~rows] + 1e-5).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("dtype", "pattern"), [(torch.bfloat16, 0x7FC0), (torch.float16, 0x7E00)])
def test_nonfinite_decode_is_canonical_nan(dtype: torch.dtype, pattern: int, device: str) -> None:
    """A poisoned row decodes to the dtype's canonical quiet NaN on every device (a
    vectorised CPU cast would give bfloat16 0xFFFF), as dequantize_groups and the kernels."""
    x = torch.randn(2, 3, 9, 9, device=device)
    x[1, 2, 4, 4] = math.nan
    y = division_decode(division_encode(x, 8, 2), dtype)
    nan = torch.isnan(y)
    assert nan.sum() == 81 and nan[1, 2].all()
    assert ((y.view(torch.int16)[nan].int() & 0xFFFF) == pattern).all()


def test_huge_finite_values_stay_finite() -> None:
    x = torch.randn(1, 3, 16, 16)
    x[0, 0] = 3e38  # block sums overflow float32
    x[0, 1, ::2] = -3e38
    x[0, 1, 1::2] = 3e38  # residual range overflows float32
    for bits in (1, 2, 8):
        code = division_encode(x, 8, bits)
        y = division_decode(code)
        assert torch.isfinite(y).all()
        assert not torch.isnan(code.hfc.lo).any()
        # Rows 0 and 1 fall back to LFC = 0; every row keeps the one-step bound.
        err = (y.double() - x.double()).abs()
        assert (err <= _row_step(code) * (1 + 1e-5) + 1e-5).all()


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="N, C"):
        division_encode(torch.randn(4, 4), 8, 2)
    with pytest.raises(ValueError, match="N, C"):
        division_encode(torch.randn(1, 1, 2, 2, 2, 2), 8, 2)
    with pytest.raises(ValueError, match="block"):
        division_encode(torch.randn(1, 1, 4, 4), 0, 2)
    with pytest.raises(ValueError, match="1..8"):
        division_encode(torch.randn(1, 1, 4, 4), 8, 9)


def _decode(code, backend_name: str, dtype: torch.dtype) -> torch.Tensor:
    from actpack.codecs import backend

    if isinstance(code, DivisionCode):
        return backend.division_decode(code, dtype, backend=backend_name)
    return backend.dequantize_groups(code, dtype, backend=backend_name)


_DECODERS = [
    "division reference", "groups reference", "division compiled", "groups compiled",
    "hadamard", "traceable",
]  # fmt: skip


def _decoders():
    """{name: decode to a dtype} of one code per decoder, encoded from the
    same values (round to nearest, so every backend codes them alike)."""
    from actpack.codecs import backend, hadamard, traceable

    x = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(3)) * 1e3
    x[0, 0, 0, :4] = torch.tensor([3e38, -3e38, 1e-40, 0.0])  # huge and subnormal values
    rows = x.reshape(64, 128)
    out = []
    for name in ("reference", "compiled"):
        code = backend.division_encode(x, 8, 2, stochastic=False, backend=name)
        out.append((f"division {name}", functools.partial(_decode, code, name)))
        code = backend.quantize_groups(rows, 2, 64, stochastic=False, backend=name)
        out.append((f"groups {name}", functools.partial(_decode, code, name)))
    code = hadamard.hadamard_encode(rows, 2, 64, stochastic=False)
    out.append(("hadamard", lambda d, c=code: hadamard.hadamard_decode(c, d)))
    code = traceable.quantize_groups(rows, 2, 64, None)  # no key: round to nearest
    out.append(("traceable", lambda d, c=code: traceable.dequantize_groups(c, d)))
    return dict(out)


@pytest.mark.parametrize("name", _DECODERS)
def test_every_decoder_decodes_to_float64_as_to_float32(name: str) -> None:
    # division_decode clamped its float32 result to float64's largest value
    # ("value cannot be converted to type float without overflow").
    decode = _decoders()[name]
    wide, narrow = decode(torch.float64), decode(torch.float32)
    assert wide.dtype == torch.float64
    assert torch.equal(wide, narrow.double())
