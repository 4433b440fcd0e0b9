"""Byte accounting of a lossless forward ("none"): counted in batches after
the saves (at the forward's exit, at backward's first restore, when ``stats``
is read, or every ``UNACCOUNTED_MAX`` saves), it must equal what an
independent count of autograd's saves gives, and keeping the saves for the
count must never keep memory alive longer than autograd would."""

import gc
import threading
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import actpack
from actpack.engine import eager, lossless
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
    # UNACCOUNTED_MAX of them.  Every one was held while alive, so every one
    # counts (freed addresses reused by the next ones included).
    x = torch.randn(128, 128, requires_grad=True)
    n = 200
    assert lossless.UNACCOUNTED_MAX < n // 2
    refs = []
    with actpack.compress("none") as ctx:
        for _ in range(n):
            y = (x * 1).exp()  # exp saves its output
            refs.append(weakref.ref(y))
            del y
        gc.collect()
        alive = sum(r() is not None for r in refs)
        assert alive <= lossless.UNACCOUNTED_MAX
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


# -- faults found by a break-it pass of the batched count (one test per kind) --


@pytest.mark.parametrize("strategy", ["none", "actnn"])
def test_a_forward_whose_thread_dies_inside_it_ends_cleanly(strategy):
    # A generator running its forward under the engine is started in one
    # thread and closed in another (thread pools driving generators): the
    # forward's state was left behind, its saves kept alive, and a later
    # thread given the same thread id ran without hooks, uncompressed.
    engine = actpack.compress(strategy)
    x = torch.randn(128, 128, requires_grad=True)
    refs = []

    def forward(steps):
        with engine:
            h = x * 1
            for _ in range(steps):
                h = torch.sigmoid(h)
                refs.append(weakref.ref(h))
            yield h.sum()

    box = {}

    def start():
        box["it"] = forward(6)
        box["loss"] = next(box["it"])

    for _ in range(2):  # the second round may reuse the dead thread's id
        thread = threading.Thread(target=start)
        thread.start()
        thread.join()
        del box["loss"]
        box.pop("it").close()  # exits the engine in this thread
        gc.collect()
        assert all(r() is None for r in refs)
        assert engine._states == {}
    seen = {}

    def again():
        with engine:
            seen["hooks"] = torch._C._autograd._top_saved_tensors_default_hooks(False)
            h = x * 1
            for _ in range(3):
                h = torch.exp(h)
        h.sum().backward()

    thread = threading.Thread(target=again)
    thread.start()
    thread.join()
    assert seen["hooks"] is not None
    assert engine.stats.tensors == 3
    assert engine.stats.baseline_bytes == 3 * 128 * 128 * 4


def test_a_state_left_by_a_dead_thread_with_the_same_id_is_ended():
    # CPython reuses thread ids; a state found under this thread's id but
    # made by another (dead) thread must not be taken for a nested entry.
    engine = actpack.compress("none")
    x = torch.randn(64, 64, requires_grad=True)
    dead = threading.Thread(target=lambda: None)
    dead.start()
    dead.join()
    stale = eager._Forward(tracked=False)
    stale.depth, stale.engine, stale.thread = 1, engine, dead
    stale.ref = weakref.ref(stale)
    kept = (x * 2).exp()
    stale.unaccounted.append((kept, lossless.Uncounted(stale, kept)))
    engine._states[threading.get_ident()] = stale
    with engine:
        assert torch._C._autograd._top_saved_tensors_default_hooks(False) is not None
        y = torch.tanh(x * 1)
    y.sum().backward()
    assert engine._states == {}
    assert not stale.unaccounted  # counted and released
    assert engine.stats.tensors == 1 and engine.stats.baseline_bytes == 64 * 64 * 4


class _Wrapper(torch.Tensor):
    """A wrapper subclass (as DTensor, NJT, float8 tensors): its storage is
    a placeholder, the memory lives in the tensor it wraps."""

    @staticmethod
    def __new__(cls, inner):
        return torch.Tensor._make_wrapper_subclass(
            cls, inner.shape, dtype=inner.dtype, requires_grad=inner.requires_grad
        )

    def __init__(self, inner):
        self.inner = inner

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        unwrap = lambda a: a.inner if isinstance(a, _Wrapper) else a  # noqa: E731
        out = func(*[unwrap(a) for a in args], **{k: unwrap(v) for k, v in (kwargs or {}).items()})
        return _Wrapper(out) if isinstance(out, torch.Tensor) else out


@pytest.mark.parametrize("strategy", ["none", "actnn", "division"])
@pytest.mark.parametrize("shape", [(64, 64), (4, 1024)])
def test_wrapper_subclasses_are_not_counted_at_their_nominal_size(strategy, shape):
    x = _Wrapper(torch.randn(shape)).requires_grad_()
    with actpack.compress(strategy, min_numel=0) as ctx:
        y = torch.sigmoid(x * 2)  # saves its output: a wrapper
    y.sum().backward()
    assert ctx.stats.baseline_bytes == 0
    assert "uninspectable" in ctx.stats.passthrough


def test_stats_read_from_another_thread_count_what_a_running_forward_saved():
    engine = actpack.compress("none")
    x = torch.randn(64, 64, requires_grad=True)
    inside, read = threading.Event(), threading.Event()
    seen = {}

    def forward():
        with engine:
            h = x * 1
            for _ in range(10):
                h = torch.sigmoid(h)
            inside.set()
            read.wait()
        h.sum().backward()

    thread = threading.Thread(target=forward)
    thread.start()
    inside.wait()
    seen["inside"] = (engine.stats.tensors, engine.stats.baseline_bytes)
    read.set()
    thread.join()
    assert seen["inside"] == (10, 10 * 64 * 64 * 4)
    assert (engine.stats.tensors, engine.stats.baseline_bytes) == seen["inside"]


@pytest.mark.parametrize("read_before", [False, True])
@pytest.mark.parametrize("swap", ["data", "set_"])
def test_a_save_whose_tensor_is_repointed_counts_the_memory_autograd_holds(read_before, swap):
    # Megatron's deallocate_output_tensor replaces a saved output's .data
    # after use; autograd still holds the old storage through the save.
    x = torch.randn(64, 64, requires_grad=True)
    with actpack.compress("none") as ctx:
        h = (x * 1).exp()  # exp saves its output
        if read_before:
            assert ctx.stats.baseline_bytes == 64 * 64 * 4
        with torch.no_grad():
            if swap == "data":
                h.data = torch.empty(1)
            else:
                h.set_(torch.empty(1))
    assert ctx.stats.baseline_bytes == 64 * 64 * 4


@pytest.mark.parametrize("share", ["from_numpy", "frombuffer"])
def test_two_storages_over_one_buffer_are_one_memory(share):
    np = pytest.importorskip("numpy") if share == "from_numpy" else None
    w = torch.randn(64, 32, requires_grad=True)
    if share == "from_numpy":
        buffer = np.random.rand(16, 64).astype("float32")
        a, b = torch.from_numpy(buffer), torch.from_numpy(buffer)
    else:
        buffer = bytearray(torch.randn(16, 64).numpy().tobytes())
        a = torch.frombuffer(buffer, dtype=torch.float32).view(16, 64)
        b = torch.frombuffer(buffer, dtype=torch.float32).view(16, 64)
    with actpack.compress("none", min_numel=0) as ctx:
        y = (a @ w).sum() + (b @ w).sum()  # each matmul saves its input batch
    y.backward()
    assert ctx.stats.baseline_bytes == 16 * 64 * 4


# -- however the engine is held, a forward's saves are counted --


def _held_by(pattern, fn):
    """Run ``fn`` under a lossless engine held as ``pattern``; the engine."""
    import contextlib

    if pattern == "as name":
        with actpack.compress("none", min_numel=0) as engine:
            out = fn()
    elif pattern == "variable":
        engine = actpack.compress("none", min_numel=0)
        with engine:
            out = fn()
    elif pattern == "attribute":

        class Holder:
            pass

        holder = Holder()
        holder.engine = actpack.compress("none", min_numel=0)
        with holder.engine:
            out = fn()
        engine = holder.engine
    elif pattern == "list":
        engines = [actpack.compress("none", min_numel=0)]
        with engines[0]:
            out = fn()
        engine = engines[0]
    elif pattern == "exit stack, result kept":
        with contextlib.ExitStack() as stack:
            engine = stack.enter_context(actpack.compress("none", min_numel=0))
            out = fn()
    else:  # "entered by hand"
        engine = actpack.compress("none", min_numel=0)
        engine.__enter__()
        try:
            out = fn()
        finally:
            engine.__exit__(None, None, None)
    out.backward()
    return engine


@pytest.mark.parametrize(
    "pattern",
    ["as name", "variable", "attribute", "list", "exit stack, result kept", "entered by hand"],
)
@pytest.mark.parametrize("name", ["transformer layer", "conv-bn-relu", "casts"])
def test_an_engine_that_outlives_its_forward_counts_its_saves(pattern, name):
    out, activations, weights = _oracle(_models()[name])
    engine = _held_by(pattern, _models()[name])
    assert engine.stats.baseline_bytes == activations
    assert engine.stats.weight_bytes == weights


def test_a_wrapped_model_counts_its_saves():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    x = torch.randn(2, 8, 32)
    _, activations, _ = _oracle(lambda: layer(x))  # the hooks cover the model's forward
    model = actpack.wrap(layer, "none", min_numel=0)
    model(x).square().mean().backward()
    assert actpack.engine_of(model).stats.baseline_bytes == activations


# -- a storage saved again after the save that first counted it was dropped --


def _saved_again(kind, x, w):
    """A storage saved twice, with a count in between (at the ``yield``):
    after the first save's alias died (a dropped branch; the tensor lives),
    or after the first saved tensor died (autograd holds its storage through
    the alias; another alias of the storage is saved next)."""
    if kind in ("detached alias, tensor dead", ".data alias, tensor dead"):
        h = (x * 2).exp()  # exp saves its output h
        early = h.detach() if kind.startswith("detached") else h.data
        yield
        del h
        gc.collect()  # of the storage's tensors only early and the alias autograd holds live
        return ((x * 3) * early).sum()  # mul saves early: the same storage
    h = x * 2
    if kind == "activation":
        branch = h.sin()  # saves h (through an alias made for this save)
    elif kind == "view of an activation":
        branch = h[:, :8].sin()
    else:  # a weight's view: mm saves w.t()
        branch = h @ w.t()
    yield
    del branch
    gc.collect()  # the first save's alias is gone; h and w live on
    if kind == "weight view":
        return (h @ w.t()).sum()
    return h.cos().sum()


@pytest.mark.parametrize(
    "kind",
    [
        "activation",
        "view of an activation",
        "weight view",
        "detached alias, tensor dead",
        ".data alias, tensor dead",
    ],
)
@pytest.mark.parametrize("between", ["stats read", "64 saves", "modules tracked"])
def test_a_storage_saved_again_after_a_dropped_save_counts_once(kind, between):
    # Counts in between recorded each storage's liveness by one object: the
    # alias the pack hook made for that save (which dies with a dropped
    # branch while the tensor lives), then the saved tensor (which dies
    # while autograd holds the alias).  Either way the storage, alive all
    # along, was taken for a new one at a reused address and counted again.
    x = torch.randn(64, 64, requires_grad=True)
    w = torch.randn(64, 64, requires_grad=True)

    def run(engine, read):
        with engine:
            steps = _saved_again(kind, x, w)
            next(steps)
            read(engine)
            try:
                next(steps)
            except StopIteration as done:
                return done.value

    def fill(engine):
        for i in range(lossless.UNACCOUNTED_MAX + 2):
            (x * float(i)).tanh()  # saves that are dropped at once

    exact = actpack.Engine("none", track_ops=True, min_numel=0)  # counts each save at once
    run(exact, fill if between == "64 saves" else lambda e: None)
    if between == "modules tracked":

        class Model(nn.Module):
            def forward(self, x):
                return run(actpack.engine_of(self), lambda e: None)

        model = actpack.wrap(Model(), "none", min_numel=0, track_modules=True)
        model(x)
        engine = actpack.engine_of(model)
    else:
        engine = actpack.compress("none", min_numel=0)
        run(engine, (lambda e: e.stats) if between == "stats read" else fill)
    if kind.endswith("tensor dead"):
        # One storage (exp's output, then its alias: "none" counts a save
        # without history as an activation; the tracked engine puts the
        # alias apart, as a leaf input, so it is no oracle here).
        filled = lossless.UNACCOUNTED_MAX + 2 if between == "64 saves" else 0  # tanh outputs
        assert engine.stats.baseline_bytes == 64 * 64 * 4 * (1 + filled)
        return
    assert engine.stats.baseline_bytes == exact.stats.baseline_bytes + exact.stats.leaf_bytes
    assert engine.stats.weight_bytes == exact.stats.weight_bytes
    if kind == "weight view":
        assert engine.stats.weight_bytes == 64 * 64 * 4
