"""Randomized Hadamard rotation + per-group quantization: exactness of the rotation,
error bounds, unbiasedness, non-finite rows, awkward widths, every dtype.

Bounds come from orthogonality: decoding adds to each row the inverse rotation
of the rotated codes' error ``e``, so the row's squared error equals ``|e|^2``,
and ``|e_j| <= step_j`` (stochastic) or ``step_j / 2`` (nearest), ``step_j`` the
grid step of the group holding rotated element ``j``.  For unbiasedness, one
decode's error has per-element variance ``<= step^2 / 4`` in the rotated
domain (a two-point distribution over one step), so the mean of ``K``
independent decodes has ``E |mean - x|^2 <= sum step^2 / (4 K)`` over the
matrix; over thousands of elements the observed value concentrates near
its expectation (about 2/3 of the bound for uniform fractional positions).
"""

from __future__ import annotations

import math

import pytest
import torch

from actpack.codecs.encoded import Rotated
from actpack.codecs.hadamard import (
    chunk_sizes,
    hadamard_decode,
    hadamard_encode,
    hadamard_matrix,
    rotate,
    unrotate,
)
from actpack.codecs.pack import unpack_bits

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
WIDTHS = [1, 3, 63, 64, 65, 100, 200, 257]


def _steps(code) -> torch.Tensor:
    """Grid step of the group of each rotated element (rows, cols), float64."""
    inner = code.inner
    step = (inner.hi.double() - inner.lo.double()) / (2**inner.bits - 1)
    return step.repeat_interleave(inner.group_size, dim=1)[:, : inner.cols]


def _plain(code) -> torch.Tensor:
    return unpack_bits(code.plain, 1, code.rows).bool()


@pytest.mark.parametrize("n", [1, 2, 4, 8, 16, 64, 256])
def test_hadamard_matrix_is_orthonormal_and_symmetric(n: int) -> None:
    h = hadamard_matrix(n).double()
    assert torch.equal(h, h.T)
    assert torch.allclose(h @ h, torch.eye(n, dtype=torch.float64), atol=1e-6)
    assert torch.all(hadamard_matrix(n).abs() == torch.tensor(1 / math.sqrt(n)))


def test_hadamard_matrix_is_the_callers_own() -> None:
    # Built once and shared by the codecs; what the public function returns
    # may be written to without changing the codecs' copy.
    x, signs = torch.randn(4, 64), torch.ones(64)
    before = rotate(x, signs, 64)
    hadamard_matrix(64).zero_()
    assert torch.equal(rotate(x, signs, 64), before)
    torch.testing.assert_close(unrotate(before, signs, 64), x)


@pytest.mark.parametrize("cols", [0, 1, 5, 64, 100, 130, 255])
def test_chunk_sizes_cover_cols_with_powers_of_two(cols: int) -> None:
    sizes = chunk_sizes(cols, 64)
    assert sum(sizes) == cols
    assert all(s & (s - 1) == 0 and 1 <= s <= 64 for s in sizes)
    assert sizes == sorted(sizes, reverse=True)
    assert chunk_sizes(100, 64) == [64, 32, 4]


@pytest.mark.parametrize("cols", WIDTHS)
def test_rotation_round_trip_and_norm(cols: int) -> None:
    x = torch.randn(7, cols) * 5
    signs = torch.randint(0, 2, (cols,)).float() * 2 - 1
    y = rotate(x, signs, 64)
    assert torch.allclose(y.norm(dim=1), x.norm(dim=1), rtol=1e-5)
    assert torch.allclose(unrotate(y, signs, 64), x, atol=1e-5)


def test_rotation_spreads_an_outlier() -> None:
    # One outlier per row: rotated, every element of its block has magnitude
    # |outlier| / sqrt(64) plus the others' share, so the range shrinks ~8x.
    x = torch.randn(4, 64) * 0.01
    x[:, 7] = 10.0
    signs = torch.randint(0, 2, (64,)).float() * 2 - 1
    y = rotate(x, signs, 64)
    assert (y.amax(1) - y.amin(1)).max() < 3.0 < (x.amax(1) - x.amin(1)).min()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cols", WIDTHS)
@pytest.mark.parametrize("bits", [2, 3, 8])
def test_error_bound_every_dtype_and_width(bits: int, cols: int, dtype: torch.dtype) -> None:
    x = (torch.randn(6, cols) * 3 + 1).to(dtype)
    x[:, 0] = 40.0  # an outlier feature
    for stochastic, factor in ((True, 1.0), (False, 0.5)):
        gen = torch.Generator().manual_seed(cols) if stochastic else None
        code = hadamard_encode(x, bits, 64, stochastic=stochastic, generator=gen)
        out = Rotated(code, x.shape, x.dtype).decode()
        assert out.dtype == dtype and out.shape == x.shape
        err = (out.double() - x.double()).square().sum(1).sqrt()
        bound = factor * _steps(code).square().sum(1).sqrt()
        slack = x.double().norm(dim=1) * (torch.finfo(dtype).eps + 1e-5) * math.sqrt(cols)
        assert torch.all(err <= bound + slack), (err - bound).max()


@pytest.mark.parametrize("group_size", [None, 32])
@pytest.mark.parametrize("cols", [100, 128])
def test_unbiased(cols: int, group_size: int | None) -> None:
    x = torch.randn(16, cols)
    x[:, 3] *= 20
    gen = torch.Generator().manual_seed(1)
    k, total, bound = 64, torch.zeros_like(x, dtype=torch.float64), 0.0
    for _ in range(k):
        code = hadamard_encode(x, 2, 64, group_size, generator=gen)
        total += hadamard_decode(code).double()
        bound += _steps(code).square().sum().item() / 4
    mse = (total / k - x.double()).square().sum().item()
    # E[mse] <= mean bound / k; one decode's error is ~bound (not / k).
    assert mse <= bound / k / k
    one = (hadamard_decode(code).double() - x.double()).square().sum().item()
    assert one > 8 * mse  # the average really is closer than one draw


def test_reproducible_from_the_generator_and_fresh_signs() -> None:
    x = torch.randn(8, 96)
    a = hadamard_encode(x, 2, generator=torch.Generator().manual_seed(5))
    b = hadamard_encode(x, 2, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.signs, b.signs) and torch.equal(a.inner.packed, b.inner.packed)
    gen = torch.Generator().manual_seed(5)
    c, d = hadamard_encode(x, 2, generator=gen), hadamard_encode(x, 2, generator=gen)
    assert not torch.equal(c.signs, d.signs)


def test_non_finite_rows_decode_exactly_and_stay_in_their_row() -> None:
    x = torch.randn(5, 100)
    x[1, 3] = math.nan
    x[2, 70] = math.inf
    x[3, 99] = -math.inf
    code = hadamard_encode(x, 2, 64, generator=torch.Generator().manual_seed(0))
    assert _plain(code).tolist() == [False, True, True, True, False]
    out = hadamard_decode(code)
    assert math.isnan(out[1, 3]) and out[2, 70] == math.inf and out[3, 99] == -math.inf
    # Finite elements of a poisoned group decode to NaN (as without rotation).
    assert torch.isnan(out[1]).all() and torch.isnan(out[2, :70]).all()
    assert torch.isfinite(out[[0, 4]]).all()
    bound = _steps(code)[[0, 4]].square().sum(1).sqrt()
    assert torch.all((out[[0, 4]] - x[[0, 4]]).norm(dim=1) <= bound * 1.0001)


def test_huge_finite_rows_are_not_rotated_into_overflow() -> None:
    x = torch.randn(3, 64)
    x[1, :] = 3e38  # a rotated sum of 64 such values overflows float32
    code = hadamard_encode(x, 8, 64, generator=torch.Generator().manual_seed(0))
    assert _plain(code).tolist() == [False, True, False]
    out = hadamard_decode(code)
    assert torch.isfinite(out).all()
    assert torch.allclose(out[1], x[1], rtol=1e-2)


def test_decode_never_overflows_a_narrow_dtype() -> None:
    x = torch.full((2, 64), 65000.0, dtype=torch.float16)
    out = hadamard_decode(
        hadamard_encode(x, 2, generator=torch.Generator().manual_seed(0)), x.dtype
    )
    assert torch.isfinite(out).all()


def test_adaptive_keeps_one_sided_rows_plain() -> None:
    one_sided = torch.rand(1, 128)  # uniform [0, 1): range 1, rotated ~ +-2.5 * 0.58
    outlier = torch.randn(1, 128) * 0.1
    outlier[0, 5] = 30.0
    x = torch.cat([one_sided, outlier])
    code = hadamard_encode(x, 2, 64, adaptive=True, generator=torch.Generator().manual_seed(0))
    assert _plain(code).tolist() == [True, False]
    always = hadamard_encode(x, 2, 64, generator=torch.Generator().manual_seed(0))
    assert _plain(always).tolist() == [False, False]


def test_bytes_from_shapes() -> None:
    code = hadamard_encode(torch.randn(10, 100), 3, 64)
    packed = (10 * 100 * 3 + 7) // 8
    assert code.nbytes == packed + 2 * 10 * 2 + (100 + 7) // 8 + (10 + 7) // 8


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(x=torch.randn(3), bits=2), "2-D"),
        (dict(x=torch.ones(2, 4, dtype=torch.int32), bits=2), "floating-point"),
        (dict(x=torch.randn(2, 8), bits=2, block=48), "power of two"),
        (dict(x=torch.randn(2, 8), bits=9), "bits"),
    ],
)
def test_bad_input(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        hadamard_encode(**kwargs)
