"""The eager and compiled engines on a CUDA device, against uncompressed autograd.

The CPU suite checks every rule and codec; this module checks that the same
promises hold where users train: saved tensors on a GPU go through the fused
Triton kernels (``backend="auto"`` picks them on CUDA), bf16 autocast on
CUDA, non-reentrant checkpointing and ``torch.compile`` with Inductor's Triton
backend.  Each test compares gradients with uncompressed autograd on the same
device: near-lossless codes by relative error, 2-bit codes by the mean of K
draws judged against its own spread (the statistic of
``test_gradients.test_two_bit_gradients_are_unbiased``).  The forward and
backward of a 2-bit step must not synchronise the host with the device (a
synchronisation per saved tensor would serialise the CPU's kernel launches
behind the GPU).

Skipped without CUDA (CI has none); ``benchmarks/gpu_checks.sh`` runs it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from small_models import SmallCNN
from test_gradients import TWO_BIT, Block
from torch.utils.checkpoint import checkpoint

import actpack

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")

DEV = "cuda"
K = 16
# smooth="exact": the second-order bias of coded smooth ops (GELU, softmax) is
# smooth="code"'s documented trade-off, not what these tests look for.
KW = dict(min_numel=0, smooth="exact")


@pytest.fixture(autouse=True)
def _no_tf32():
    # TF32 convolutions (cuDNN's default) round inputs to 10 mantissa bits:
    # the "exact" gradients would then differ run to run by more than fp16 codes.
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


class Blocks(torch.nn.Module):
    """Two transformer blocks, optionally the first under non-reentrant
    checkpointing (its inputs stay exact, its saves go to checkpoint's hooks;
    the second block's saves are coded)."""

    def __init__(self, ckpt: bool = False):
        super().__init__()
        self.blocks = torch.nn.ModuleList([Block(), Block()])
        self.ckpt = ckpt

    def forward(self, x):
        first, second = self.blocks
        x = checkpoint(first, x, use_reentrant=False) if self.ckpt else first(x)
        return second(x)


def _case(kind):
    torch.manual_seed(0)
    if kind == "cnn":
        model, x = SmallCNN(), torch.randn(8, 3, 32, 32)
    else:
        model, x = Blocks(ckpt=kind == "checkpointed"), torch.randn(4, 32, 64)
    return model.to(DEV), x.to(DEV)


def _grads(model, x, engine, autocast=False, run=None):
    model.zero_grad()
    with torch.autocast(DEV, dtype=torch.bfloat16, enabled=autocast), engine:
        out = (model if run is None else run)(x)
    out.float().pow(2).mean().backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()]).double()


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _assert_unbiased(exact, draws):
    """z^2 of the mean of K draws: E = (K-1)/(K-3) = 1.15 if unbiased (see
    test_gradients); averaging must also shrink the error about sqrt(K) = 4x."""
    mean, std = draws.mean(0), draws.std(0)
    noisy = std > 0
    assert noisy.sum() > 0.5 * exact.numel()
    z = (mean - exact)[noisy] / (std[noisy] / K**0.5)
    assert (z**2).mean() < 1.5
    single = sum(_rel(d, exact) for d in draws) / K
    assert _rel(mean, exact) < 0.5 * single


@pytest.mark.parametrize("kind", ["cnn", "transformer", "checkpointed"])
@pytest.mark.parametrize(
    "strategy,bound", [("none", 1e-6), ("fp16", 1e-3), ("int8", 1e-2), ("bf16", 1e-2)]
)
def test_near_lossless_strategies_on_cuda(kind, strategy, bound):
    model, x = _case(kind)
    exact = _grads(model, x, actpack.compress("none", min_numel=0))
    got = _grads(model, x, actpack.compress(strategy, min_numel=0))
    assert _rel(got, exact) <= bound


@pytest.mark.parametrize("kind", ["cnn", "transformer", "checkpointed"])
@TWO_BIT
def test_two_bit_gradients_are_unbiased_on_cuda(kind, make):
    model, x = _case(kind)
    exact = _grads(model, x, actpack.compress("none", min_numel=0))
    draws = torch.stack([_grads(model, x, actpack.compress(make(s), **KW)) for s in range(K)])
    _assert_unbiased(exact, draws)


@pytest.mark.parametrize("kind", ["cnn", "transformer"])
def test_bf16_autocast_on_cuda(kind):
    """Against uncompressed autocast: int8 within its step size, actnn unbiased."""
    model, x = _case(kind)
    exact = _grads(model, x, actpack.compress("none", min_numel=0), autocast=True)
    got = _grads(model, x, actpack.compress("int8", min_numel=0), autocast=True)
    assert _rel(got, exact) < 5e-2
    draws = torch.stack(
        [
            _grads(model, x, actpack.compress(actpack.ActNN(seed=s), **KW), autocast=True)
            for s in range(K)
        ]
    )
    _assert_unbiased(exact, draws)


@pytest.mark.parametrize("kind", ["cnn", "transformer"])
def test_torch_compile_with_inductor_on_cuda(kind):
    """Inductor's Triton backend on CUDA; the engine codes saves inside the graph."""
    model, x = _case(kind)
    exact = _grads(model, x, actpack.compress("none", min_numel=0))
    run = torch.compile(model)
    engines = [actpack.compress(actpack.ActNN(seed=s), **KW) for s in range(K)]
    draws = torch.stack([_grads(model, x, e, run=run) for e in engines])
    _assert_unbiased(exact, draws)
    # The graph was compiled under the first engine, which recorded its decisions.
    decided = list(engines[0]._graph_hooks.decisions.values())
    # Inductor's partition keeps more exact than eager (BENCHMARKS "compiled"):
    # only that something was coded is asserted here.
    assert sum(d.after for d in decided) < sum(d.before for d in decided)


@pytest.mark.parametrize("strategy", ["actnn", "division", "int8"])
@pytest.mark.parametrize("kind", ["cnn", "transformer"])
def test_eager_step_does_not_synchronise(kind, strategy):
    model, x = _case(kind)
    engine = actpack.compress(strategy, min_numel=0)
    _grads(model, x, engine)  # warm-up: kernels compiled, caches filled
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _grads(model, x, engine)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("strategy", ["none", "actnn", "division"])
def test_measured_bytes_do_not_depend_on_the_device(strategy):
    """Saved bytes are a function of shapes and decisions: CPU and CUDA agree."""
    counts = []
    for dev in ("cpu", DEV):
        torch.manual_seed(0)
        model, x = SmallCNN().to(dev), torch.randn(8, 3, 32, 32, device=dev)
        target = torch.zeros(8, dtype=torch.long, device=dev)
        rep = actpack.measure(
            model, x, strategy=strategy, min_numel=0,
            loss_fn=lambda out, target=target: F.cross_entropy(out, target),
        )  # fmt: skip
        counts.append((rep.baseline_bytes, rep.compressed_bytes))
    assert counts[0] == counts[1]
