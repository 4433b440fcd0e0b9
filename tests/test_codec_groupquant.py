"""Per-group quantization: bounds, unbiasedness, zero-exact codes, non-finite groups.

Statistical tests use fixed seeds and a tolerance derived from Hoeffding's
inequality: one stochastic decode of an element lies in [a, a + step], so the
mean of n independent decodes deviates from its expectation by eps with
probability <= 2 exp(-2 n eps^2 / step^2).  With eps = 3 step / sqrt(n)
(i.e. 6 standard deviations of step / (2 sqrt(n))) that is <= 3e-8 per
element.  Independent draws come from repeating the input rows: groups never
cross rows, so each copy is quantized independently.
"""

from __future__ import annotations

import math

import pytest
import torch

import actpack
from actpack.codecs import GroupCode, dequantize_groups, packed_numel, quantize_groups

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")),
]


def _step(code: GroupCode) -> torch.Tensor:
    """Grid step per element (rows, cols) in float64, overflow-free."""
    levels = 2**code.bits - 1 - int(code.zero_exact)
    step = (code.hi.double() - code.lo.double()) / levels
    return step.repeat_interleave(code.group_size, dim=1)[:, : code.cols]


def _slack(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rounding of the float32 decode into ``dtype`` plus float32 arithmetic."""
    return x.double().abs() * (torch.finfo(dtype).eps + 1e-6) + 1e-30


def _groups(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference per-group min and max of the unpadded matrix."""
    rows, cols = x.shape
    ng = -(-cols // group_size)
    mins = torch.stack([x[:, g * group_size : (g + 1) * group_size].amin(1) for g in range(ng)], 1)
    maxs = torch.stack([x[:, g * group_size : (g + 1) * group_size].amax(1) for g in range(ng)], 1)
    return mins, maxs


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", range(1, 9))
def test_error_bounds(bits: int, dtype: torch.dtype, device: str) -> None:
    x = (torch.randn(6, 100) * 3 + 1).to(dtype).to(device)  # 100 = 3 groups of 32 + a tail of 4
    for stochastic, bound in ((True, 1.0), (False, 0.5)):
        gen = torch.Generator(device).manual_seed(bits) if stochastic else None
        code = quantize_groups(x, bits, 32, stochastic=stochastic, generator=gen)
        assert (code.rows, code.cols, code.group_size, code.bits) == (6, 100, 32, bits)
        assert code.lo.shape == code.hi.shape == (6, 4)
        y = dequantize_groups(code, dtype)
        assert y.dtype == dtype and y.shape == x.shape and y.device == x.device
        err = (y.double() - x.double()).abs()
        assert (err <= bound * _step(code) + _slack(x, dtype)).all()


@pytest.mark.parametrize("meta", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("dtype", DTYPES)
def test_outward_rounding(meta: torch.dtype, dtype: torch.dtype) -> None:
    x = (torch.randn(8, 77) * 10).to(dtype)
    # Around zero and below the meta's subnormals: outward steps must cross zero correctly.
    x[0, :16] = torch.tensor([1e-42, 2e-45, 1e-9, 3e-8, 0.0] * 3 + [1e-42]).to(dtype)
    x[0, 16:32] = -x[0, :16]
    x[0, 32:48] = torch.tensor([0.0, -0.0] * 8).to(dtype)
    code = quantize_groups(x, 2, 16, meta_dtype=meta)
    assert code.lo.dtype == code.hi.dtype == meta
    mins, maxs = _groups(x.float(), 16)
    assert (code.lo.float() <= mins).all() and (code.hi.float() >= maxs).all()
    assert torch.equal(code.lo[0, 2].float(), torch.zeros(())) and code.hi[0, 2] == 0
    # Outward by at most about one meta ulp: the tail padding must not widen the range.
    ulp = torch.finfo(meta).eps * 2
    lo, hi = code.lo[1:].double(), code.hi[1:].double()
    assert (lo >= mins[1:].double() - mins[1:].double().abs() * ulp).all()
    assert (hi <= maxs[1:].double() + maxs[1:].double().abs() * ulp).all()


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_unbiased(bits: int) -> None:
    n = 4000
    x = torch.randn(4, 40) * 2
    gen = torch.Generator().manual_seed(10 + bits)
    code = quantize_groups(x.repeat(n, 1), bits, 16, generator=gen)
    mean = dequantize_groups(code).double().view(n, 4, 40).mean(0)
    step = _step(code).view(n, 4, 40)[0]
    assert (step > 0).all()
    assert ((mean - x.double()).abs() <= 3 * step / math.sqrt(n) + 1e-5).all()


def test_nonrepresentable_constant_is_unbiased() -> None:
    # 0.1 lies strictly between two bf16 values, so lo < hi and rounding is random.
    n = 4000
    x = torch.full((n, 8), 0.1)
    code = quantize_groups(x, 2, 8, generator=torch.Generator().manual_seed(0))
    assert (code.lo.float() < 0.1).all() and (code.hi.float() > 0.1).all()
    mean = dequantize_groups(code).double().mean()
    step = _step(code)[0, 0]
    assert abs(mean - 0.1) <= 3 * step / math.sqrt(x.numel())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [1, 2, 8])
def test_constant_groups_exact(bits: int, dtype: torch.dtype) -> None:
    x = torch.tensor([0.75, -2.5, 0.0, 1024.0]).repeat_interleave(10).view(4, 10).to(dtype)
    for stochastic in (True, False):
        code = quantize_groups(x, bits, 5, stochastic=stochastic)
        assert torch.equal(code.lo, code.hi)
        assert torch.equal(dequantize_groups(code, dtype), x)


def test_tail_group_padding_ignored() -> None:
    # A one-element tail group keeps its exact range, so it decodes exactly.
    x = torch.randn(3, 33)
    x[:, 32] = torch.tensor([0.5, -7.0, 3.25])
    code = quantize_groups(x, 2, 16)
    assert torch.equal(code.lo[:, 2].float(), x[:, 32]) and torch.equal(
        code.hi[:, 2].float(), x[:, 32]
    )
    assert torch.equal(dequantize_groups(code)[:, 32], x[:, 32])


def test_noncontiguous_input() -> None:
    base = torch.randn(50, 12)
    x = base.t()
    assert not x.is_contiguous()
    a = quantize_groups(x, 3, 8, generator=torch.Generator().manual_seed(5))
    b = quantize_groups(x.contiguous(), 3, 8, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.packed, b.packed) and torch.equal(a.lo, b.lo) and torch.equal(a.hi, b.hi)
    assert torch.equal(dequantize_groups(a), dequantize_groups(b))


def test_nbytes_from_shapes() -> None:
    code = quantize_groups(torch.randn(5, 1000), 2, 256)
    assert code.nbytes == packed_numel(5 * 1024, 2) + 2 * 5 * 4 * 2


def _relu_like(dtype: torch.dtype) -> torch.Tensor:
    tiny = 1e-30 if dtype != torch.float16 else 1e-4
    sub = torch.finfo(dtype).tiny / 8  # a subnormal of dtype
    x = torch.relu(torch.randn(6, 64)) * 100
    x[:, 1], x[:, 2], x[:, 3], x[:, 4] = tiny, sub, 0.0, 1000.0  # tiny beside large, same group
    x[5, 32:] = 0.0  # a group with no positive value
    if dtype == torch.float32:
        x[:4, 5] = 1.4e-45  # below bf16's range: lo rounds down to 0, decode must stay > 0
    x = x.to(dtype)
    assert (x[:, 2] > 0).all()
    return x


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_zero_exact(bits: int, dtype: torch.dtype) -> None:
    x = _relu_like(dtype)
    for stochastic in (True, False):
        code = quantize_groups(x, bits, 32, stochastic=stochastic, zero_exact=True)
        assert code.zero_exact
        y = dequantize_groups(code, dtype)
        assert y.dtype == dtype
        assert torch.equal(y == 0, x == 0)  # zeros exact, positives stay positive
        assert (code.lo[5, 1] == 0) and (code.hi[5, 1] == 0)
        err = (y.double() - x.double()).abs()
        # Decodes of positives are clamped up to finfo.tiny at worst.
        bound = (1.0 if stochastic else 0.5) * _step(code) + _slack(x, dtype)
        assert (err <= bound + torch.finfo(dtype).tiny).all()


def test_zero_exact_unbiased_on_positives() -> None:
    n = 4000
    x = torch.relu(torch.randn(2, 32)) + 0.0
    x[:, :4] = 0.0
    code = quantize_groups(
        x.repeat(n, 1), 2, 16, zero_exact=True, generator=torch.Generator().manual_seed(3)
    )
    y = dequantize_groups(code).double().view(n, 2, 32)
    assert (y[:, :, :4] == 0).all()
    step = _step(code).view(n, 2, 32)[0]
    assert ((y.mean(0) - x.double()).abs() <= 3 * step / math.sqrt(n) + 1e-5).all()


def _with_nonfinite(dtype: torch.dtype) -> torch.Tensor:
    x = torch.randn(4, 64).to(dtype)
    x[0, 3] = math.nan
    x[1, 20] = math.inf
    x[2, 40] = -math.inf
    x[3, 0], x[3, 1], x[3, 2] = math.nan, math.inf, -math.inf
    return x


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_nonfinite_poisons_only_its_group(bits: int, dtype: torch.dtype, device: str) -> None:
    x = _with_nonfinite(dtype).to(device)
    for zero_exact in (False, True) if bits >= 2 else (False,):
        xin = x.abs() if zero_exact else x  # zero_exact callers pass x >= 0
        code = quantize_groups(xin, bits, 16, zero_exact=zero_exact)
        y = dequantize_groups(code, dtype)
        poisoned = torch.zeros(4, 4, dtype=torch.bool)
        poisoned[0, 0] = poisoned[1, 1] = poisoned[2, 2] = poisoned[3, 0] = True
        assert torch.equal(torch.isnan(code.lo).cpu(), poisoned)
        elem = poisoned.repeat_interleave(16, dim=1).to(device)
        finite = torch.isfinite(xin)
        if bits >= 2:  # non-finite values exact
            assert torch.equal(torch.isnan(y), torch.isnan(xin) | (elem & finite))
            assert torch.equal(torch.isposinf(y), torch.isposinf(xin))
            assert torch.equal(torch.isneginf(y), torch.isneginf(xin))
        else:  # one bit only says "non-finite": all of the group is NaN
            assert torch.equal(torch.isnan(y), elem)
        # Other groups unaffected and accurate.
        ok = ~elem
        assert torch.isfinite(y[ok]).all()
        err = (y[ok].double() - xin[ok].double()).abs().cpu()
        bound = _step(code)[ok.cpu()].cpu() + _slack(xin[ok].cpu(), dtype) + torch.finfo(dtype).tiny
        assert (err <= bound).all()


@pytest.mark.parametrize("bits", range(1, 9))
def test_huge_finite_range(bits: int) -> None:
    x = torch.rand(3, 40, dtype=torch.float64) * 6e38 - 3e38
    x[:, 0], x[:, 1] = -3e38, 3e38
    x = x.float()
    for stochastic, bound in ((True, 1.0), (False, 0.5)):
        code = quantize_groups(x, bits, 40, stochastic=stochastic)
        assert not torch.isnan(code.lo).any()
        y = dequantize_groups(code)
        assert torch.isfinite(y).all()
        err = (y.double() - x.double()).abs()
        assert (err <= bound * _step(code) * (1 + 1e-5)).all()


def test_beyond_meta_range_saturates_finite() -> None:
    big = torch.finfo(torch.float32).max  # above bf16's largest finite value
    x = torch.tensor([[big, -big, 0.0, 1.0]])
    y = dequantize_groups(quantize_groups(x, 4, 4))
    assert torch.isfinite(y).all()
    # fp16 decode near 65504: bf16's outward hi (65536) must not round to Inf.
    h = torch.tensor([[65504.0, -65504.0, 65504.0, 0.0]], dtype=torch.float16)
    for seed in range(5):
        code = quantize_groups(h, 2, 4, generator=torch.Generator().manual_seed(seed))
        assert torch.isfinite(dequantize_groups(code, torch.float16)).all()


def test_invalid_arguments() -> None:
    x = torch.randn(4, 8)
    for bits in (0, 9, 2.5):
        with pytest.raises(ValueError, match="1..8"):
            quantize_groups(x, bits, 4)
    with pytest.raises(ValueError, match="group_size"):
        quantize_groups(x, 2, 0)
    with pytest.raises(ValueError, match="2-D"):
        quantize_groups(x.view(-1), 2, 4)
    with pytest.raises(ValueError, match="floating"):
        quantize_groups(x.long(), 2, 4)
    with pytest.raises(ValueError, match="zero_exact"):
        quantize_groups(x.abs(), 1, 4, zero_exact=True)


@pytest.mark.parametrize("strategy", ["actnn", "int8", "actnn-rows", "division", "actnn-l3"])
def test_float64_beyond_float32_range_is_refused(strategy):
    """Codes compute in float32: a finite float64 value above 3.4e38 would
    decode infinite (and its group NaN).  Refused with a clear error; float64
    within range codes as before (the engine keeps float64 saves exact)."""
    from actpack.strategies import SaveInfo

    info = SaveInfo(op="linear", module=None, rule=None, key="k")
    x = torch.randn(4, 8, 16, 16, dtype=torch.float64)
    s = actpack.resolve(strategy)
    y = s.encode(x, info).decode()
    assert torch.isfinite(y).all() and y.dtype == torch.float64
    x[0, 0, 0, 0] = 1e300
    with pytest.raises(ValueError, match="beyond float32's range"):
        s.encode(x, info)
