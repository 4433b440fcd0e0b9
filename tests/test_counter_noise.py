"""The counter-based hash behind stochastic rounding in both compiled paths
(:mod:`actpack.codecs.counter_noise`): uniform, decorrelated, and independent
across keys; tolerances are 5 standard deviations of each statistic."""

from __future__ import annotations

import pytest
import torch

from actpack.codecs import counter_noise, traceable
from actpack.codecs.compiled import build


def _check_uniform(u: torch.Tensor) -> None:
    n = u.numel()
    assert u.dtype == torch.float32 and bool((u >= 0).all()) and bool((u < 1).all())
    assert abs(u.mean().item() - 0.5) < 5 * (1 / 12 / n) ** 0.5
    assert abs(u.var().item() - 1 / 12) < 5 * (1 / 180 / n) ** 0.5  # var of (u-1/2)^2 is 1/180
    counts = torch.histc(u, 64, 0, 1)
    chi2 = ((counts - n / 64) ** 2 / (n / 64)).sum().item()
    assert chi2 < 63 + 5 * (2 * 63) ** 0.5  # chi^2 with 63 degrees of freedom
    for lag in (1, 2, 3, 256, 4096):
        r = torch.corrcoef(torch.stack([u[:-lag], u[lag:]]))[0, 1].item()
        assert abs(r) < 5 / n**0.5


@pytest.mark.parametrize("start", [0, 2**32 - 2**19, 2**40])
def test_uniform_and_uncorrelated_along_indices(start):
    """Consecutive indices, also across and beyond the 32-bit boundary."""
    key = counter_noise.random_key(torch.Generator().manual_seed(1))
    _check_uniform(counter_noise.uniform(torch.arange(start, start + 2**20), key))


def test_high_index_word_changes_the_draw():
    """Indices equal modulo 2**32 draw uncorrelated values (the high word is hashed)."""
    key = counter_noise.random_key(torch.Generator().manual_seed(2))
    n = 2**18
    low = counter_noise.uniform(torch.arange(n), key)
    high = counter_noise.uniform(torch.arange(n) + 2**32, key)
    assert abs(torch.corrcoef(torch.stack([low, high]))[0, 1].item()) < 5 / n**0.5


def test_one_index_is_uniform_over_keys():
    """The same elements under 2048 independent keys: per-element means within
    5 sigma of 1/2 (what unbiased rounding needs), and no two elements correlated."""
    gen = torch.Generator().manual_seed(3)
    k = 2048
    draws = torch.stack(
        [traceable.hash_uniform(64, counter_noise.random_key(gen)) for _ in range(k)]
    )
    assert (draws.mean(0) - 0.5).abs().max().item() < 5 * (1 / 12 / k) ** 0.5
    r = torch.corrcoef(draws.T)
    off = r[~torch.eye(64, dtype=torch.bool)]
    # 2016 pairs: the largest |r| of that many N(0, 1/k) values stays below ~4.5 sigma.
    assert off.abs().max().item() < 5 / k**0.5


def test_values_are_a_function_of_index_and_key():
    key = counter_noise.random_key(torch.Generator().manual_seed(4))
    idx = torch.tensor([[7, 3], [2**33 + 1, 0]])
    u = counter_noise.uniform(idx, key)
    assert u.shape == (2, 2)
    assert torch.equal(u, counter_noise.uniform(idx.clone(), key.clone()))
    assert torch.equal(u.reshape(-1)[[1, 3]], traceable.hash_uniform(4, key)[[3, 0]])
    other = counter_noise.uniform(idx, key ^ 1)
    assert not torch.equal(u, other)


def test_key_is_checked():
    for bad in (torch.tensor(3), torch.zeros(2), torch.zeros(3, dtype=torch.int64)):
        with pytest.raises(ValueError, match="random_key"):
            traceable.hash_uniform(8, bad)


@pytest.mark.parametrize("start", [0, 2**31 - 2**18])
def test_int32_index_gives_the_int64_values(start):
    """The 32-bit-lane form draws exactly the int64 form's values, up to the
    largest int32 index (where every product and shift wraps)."""
    key = counter_noise.random_key(torch.Generator().manual_seed(5))
    idx = torch.arange(start, start + 2**18)
    want = counter_noise.uniform(idx, key)
    assert torch.equal(counter_noise.uniform(idx.to(torch.int32), key), want)
    assert torch.equal(counter_noise.uniform(idx.to(torch.int32), key.to(torch.int32)), want)


@pytest.mark.parametrize("n", [1, 15, 17, 1000, 4099])
def test_int32_index_compiled_by_inductor_gives_the_int64_values(n):
    """Inductor's C++ (vector loops and their masked tails) computes the int32
    form's wrapping products as ATen does: same values as the int64 form."""
    key = counter_noise.random_key(torch.Generator().manual_seed(6))

    def draw(start: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        idx = torch.arange(n, dtype=torch.int32) + start
        return counter_noise.uniform(idx, k)

    with build._quiet_torch():  # torch's own deprecation notices while it compiles
        compiled = torch.compile(draw, backend="inductor", fullgraph=True)
        got = compiled(torch.tensor(2**31 - n, dtype=torch.int32), key)
    want = counter_noise.uniform(torch.arange(2**31 - n, 2**31), key)
    assert torch.equal(got, want)
