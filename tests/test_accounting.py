"""Byte accounting of a lossless forward ("none"): counted in batches after
the saves (at the forward's exit, at backward's first restore, when ``stats``
is read, or every ``_UNACCOUNTED_MAX`` saves), it must equal what an
independent count of autograd's saves gives, and keeping the saves for the
count must never keep memory alive longer than autograd would."""

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import actpack
from actpack.engine import eager
from actpack.engine.savefacts import parameter_source

# Autograd nodes of views (and casts): the chain from a weight to its save.
_VIEW_OR_CAST = {
    "ToCopyBackward0", "TBackward0", "ViewBackward0", "TransposeBackward0",
    "PermuteBackward0", "ExpandBackward0", "UnsqueezeBackward0", "AliasBackward0",
    "SliceBackward0", "SelectBackward0", "SqueezeBackward0", "SqueezeBackward1",
    "ReshapeAliasBackward0", "AsStridedBackward0", "SplitBackward0",
    "SplitWithSizesBackward0", "UnsafeSplitBackward0", "UnsafeSplitWithSizesBackward0",
    "NarrowBackward0", "UnbindBackward0",
}  # fmt: skip


def _walk(t):
    """The oracle of ``parameter_source``: walk autograd's nodes from ``t``."""
    node, cast = t.grad_fn, False
    for _ in range(6):
        if node is None:
            return None
        name = type(node).__name__
        if name == "AccumulateGrad":
            return "parameter cast" if cast else "parameter view"
        if name not in _VIEW_OR_CAST or len(node.next_functions) != 1:
            return None
        cast = cast or name == "ToCopyBackward0"
        node = node.next_functions[0][0]
    return None


def _oracle(fn):
    """Run ``fn`` under plain hooks recording every save; the bytes a
    lossless engine must count: (activations, weights), each storage once."""
    saves = []

    def pack(t):
        saves.append(t)
        return t.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    activations, weights = {}, {}
    for t in saves:
        if t.requires_grad and t.is_leaf:
            continue  # parameters and inputs needing grad: never counted
        source = _walk(t) if t.grad_fn is not None else None
        table = weights if source is not None else activations
        table[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return out, sum(activations.values()), sum(weights.values())


def _weight_uses():
    w = nn.Parameter(torch.randn(64, 48))
    b = nn.Parameter(torch.randn(48))
    x = torch.randn(32, 64)

    def views():  # transposes, slices, a reshape, an expand of the bias
        h = torch.tanh(x @ w) * b.expand(32, 48)
        return (h @ w.t()).sum() + (x[:, :16] @ w[:16, :]).sum() + w.reshape(-1)[:10].sum()

    def casts():  # casts, views of casts, casts of views, a view of a computed weight
        wb = w.to(torch.bfloat16)
        h = x.to(torch.bfloat16) @ wb
        g = (h.float() @ w.t().to(torch.float64).float()).sigmoid()
        scaled = (w * 2)[:, :40]  # a view of an activation computed from a weight
        return g.sum() + (g @ scaled).exp().sum()

    def edited():  # a view of an activation edited in place, then saved
        h = (x @ w).clone()
        v = h[:, :8]
        v.mul_(torch.sigmoid(v.detach()))
        return (v.exp() * 2).sum() + (h * h).sum()

    return {"views": views, "casts": casts, "edited": edited}


@pytest.mark.parametrize("case", list(_weight_uses()))
def test_parameter_source_equals_walking_autograd_nodes(case):
    saves = []

    def pack(t):
        saves.append(t)
        return t.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _weight_uses()[case]()
    with_history = [t for t in saves if t.grad_fn is not None]
    assert with_history
    assert [parameter_source(t) for t in with_history] == [_walk(t) for t in with_history]
    if case != "edited":
        assert any(parameter_source(t) is not None for t in with_history)


def _models():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    conv = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))
    lin = nn.Linear(64, 48)
    uses = _weight_uses()
    x = torch.randn(2, 8, 32)
    img = torch.randn(2, 3, 16, 16)
    batch = torch.randn(32, 64, requires_grad=True)

    def autocast():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return lin(batch * 1).float().relu().sum()

    def detached_alias():  # an activation saved again through a detached alias
        h = torch.tanh(batch * 3)
        return (h * h.detach().exp()).sum()

    return {
        "transformer layer": lambda: layer(x).square().mean(),
        "conv-bn-relu": lambda: conv(img).sum(),
        "autocast linear": autocast,
        "detached alias": detached_alias,
        **uses,
    }


@pytest.mark.parametrize("name", list(_models()))
@pytest.mark.parametrize("backward_inside", [False, True])
def test_lossless_counts_equal_an_independent_count(name, backward_inside):
    fn = _models()[name]
    out, activations, weights = _oracle(fn)
    out.backward()
    fn = _models()[name]
    with actpack.compress("none", min_numel=0) as ctx:
        out = fn()
        if backward_inside:  # counted at the first restore
            out.backward()
    if not backward_inside:
        out.backward()
    assert ctx.stats.baseline_bytes == ctx.stats.compressed_bytes == activations
    assert ctx.stats.weight_bytes == weights
    assert ctx.stats.passthrough == {"exact strategy": activations}


def test_saves_are_freed_when_backward_inside_the_context_frees_them():
    x = torch.randn(256, 256, requires_grad=True)
    refs = []
    with actpack.compress("none") as ctx:
        h = x * 1
        for _ in range(8):
            h = torch.sigmoid(h)  # saves its output
            refs.append(weakref.ref(h))
        h.sum().backward()
        del h
        gc.collect()
        # Autograd released every save; the accounting must not hold them.
        assert all(r() is None for r in refs)
        counted = ctx.stats.baseline_bytes
    assert counted == ctx.stats.baseline_bytes == 8 * 256 * 256 * 4


def test_saves_of_a_dropped_branch_are_freed_within_a_bounded_number_of_saves():
    # Each iteration saves one 64 KiB tensor and drops it: without actpack it
    # dies at once; a batch waiting to be counted holds at most
    # _UNACCOUNTED_MAX of them.  Every one was held while alive, so every one
    # counts (freed addresses reused by the next ones included).
    x = torch.randn(128, 128, requires_grad=True)
    n = 200
    assert eager._UNACCOUNTED_MAX < n // 2
    refs = []
    with actpack.compress("none") as ctx:
        for _ in range(n):
            y = (x * 1).exp()  # exp saves its output
            refs.append(weakref.ref(y))
            del y
        gc.collect()
        alive = sum(r() is not None for r in refs)
        assert alive <= eager._UNACCOUNTED_MAX
        assert ctx.stats.baseline_bytes == n * 128 * 128 * 4  # read inside: counted first


def test_a_save_without_storage_is_passed_through_and_the_others_counted():
    s = torch.randn(8, 8).to_sparse().requires_grad_()
    d = torch.randn(8, 8, requires_grad=True)
    grads = []
    for strategy in (None, "none"):
        d.grad = None
        with actpack.compress(strategy, min_numel=0) if strategy else torch.enable_grad() as ctx:
            y = torch.sparse.mm(s * 1, d * 1)  # saves the sparse product and the dense one
        y.sum().backward()
        grads.append(d.grad.clone())
    assert "uninspectable" in ctx.stats.passthrough
    assert ctx.stats.baseline_bytes == 8 * 8 * 4
    assert torch.equal(grads[0], grads[1])


def test_two_threads_count_their_own_forwards():
    import threading

    x = torch.randn(64, 64, requires_grad=True)
    engine = actpack.compress("none")
    states = {}
    barrier = threading.Barrier(2)

    def run(k):
        with engine:
            states[k] = engine._state()
            barrier.wait()  # both forwards save at once
            h = x * 1
            for _ in range(k):
                h = F.gelu(h)  # saves its input
            barrier.wait()
        h.sum().backward()

    threads = [threading.Thread(target=run, args=(k,)) for k in (3, 5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert states[3].stats.baseline_bytes == 3 * 64 * 64 * 4
    assert states[5].stats.baseline_bytes == 5 * 64 * 64 * 4
    assert not states[3].unaccounted and not states[5].unaccounted
