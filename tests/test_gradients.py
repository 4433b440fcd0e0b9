"""Gradients under every strategy against uncompressed autograd."""

import pytest
import torch
import torch.nn.functional as F
from small_models import SmallCNN
from torch import nn

import actpack


class Block(nn.Module):
    def __init__(self, dim=64, heads=4):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        n, length, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(n, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5).softmax(-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(n, length, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


def _grads(model, x, ctx):
    model.zero_grad()
    with ctx:
        out = model(x)
    out.pow(2).mean().backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def _case(kind):
    torch.manual_seed(0)
    if kind == "cnn":
        return SmallCNN(), torch.randn(8, 3, 32, 32)
    return Block(), torch.randn(4, 32, 64)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("kind", ["cnn", "transformer"])
@pytest.mark.parametrize(
    "strategy,bound",
    # Relative error of the whole gradient vector.  fp16 keeps 11 mantissa bits,
    # bf16 8; int8 steps are range/255 per group of 256.  Measured errors are
    # ~10x below these bounds (see test output with -s); a broken codec or a
    # quantized BatchNorm statistic gives errors of order 1.
    [("none", 0.0), ("fp16", 1e-3), ("int8", 1e-2), ("bf16", 1e-2)],
)
def test_near_lossless_strategies(kind, strategy, bound):
    model, x = _case(kind)
    exact = _grads(model, x, actpack.compress("none", min_numel=0))
    got = _grads(model, x, actpack.compress(strategy, min_numel=0))
    assert _rel(got, exact) <= bound


K = 16

#: The 2-bit strategies, one per seed (shared with test_cuda.py).
TWO_BIT = pytest.mark.parametrize(
    "make",
    [
        lambda s: actpack.ActNN(seed=s),
        lambda s: actpack.Division(seed=s),
        lambda s: actpack.RowActNN(seed=s),
    ],
    ids=["actnn", "division", "rows"],
)


@pytest.mark.parametrize("kind", ["cnn", "transformer"])
@TWO_BIT
def test_two_bit_gradients_are_unbiased(kind, make):
    """Mean of K draws against exact autograd, judged by its own spread.

    For an unbiased estimator, z_j = (mean_j - exact_j) / (s_j / sqrt(K)) follows
    Student's t with K-1 degrees of freedom per coordinate, so E[z^2] = (K-1)/(K-3)
    = 1.15 for K = 16.  A bias b_j adds b_j^2 K / s_j^2; the bound 1.5 leaves room
    for the second-order bias of backward formulas that are nonlinear in the saved
    tensor (GELU, softmax, BatchNorm's projection) and nothing more: quantizing a
    BatchNorm statistic, for instance, gives E[z^2] > 30.
    """
    model, x = _case(kind)
    exact = _grads(model, x, actpack.compress("none", min_numel=0)).double()
    draws = torch.stack(
        [_grads(model, x, actpack.compress(make(s), min_numel=0)) for s in range(K)]
    ).double()
    mean, std = draws.mean(0), draws.std(0)
    noisy = std > 0
    z = (mean - exact)[noisy] / (std[noisy] / K**0.5)
    assert noisy.sum() > 0.5 * exact.numel()
    assert (z**2).mean() < 1.5
    # Averaging K unbiased draws divides the error norm by sqrt(K) = 4.
    single = sum(_rel(d, exact) for d in draws) / K
    assert _rel(mean, exact) < 0.5 * single


def test_autocast_bf16_gradients_match_uncompressed_autocast():
    model, x = _case("cnn")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        exact = _grads(model, x, actpack.compress("none", min_numel=0))
        got = _grads(model, x, actpack.compress("int8", min_numel=0))
    assert _rel(got, exact) < 5e-2
