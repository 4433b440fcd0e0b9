"""The saved-tensor engine: what is compressed, what is not, and restore semantics."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import actpack
from actpack.codecs.encoded import Bits

LOSSY = ["fp16", "bf16", "int8", "actnn", "division"]
ALL = ["none", *LOSSY]


# "none" runs the untracked pack hook (no op names), "actnn" the tracked one.
@pytest.mark.parametrize("strategy", ["actnn", "none"])
def test_parameters_and_buffers_are_never_compressed(strategy):
    lin = nn.Linear(64, 64)
    x = torch.randn(64, 64, requires_grad=True)
    with actpack.compress(strategy, min_numel=0) as ctx:
        y = lin(x * 1)
    assert ctx.stats.baseline_bytes == x.numel() * 4  # only the input, never the weight
    before = lin.weight.detach().clone()
    y.sum().backward()
    assert torch.equal(lin.weight, before)


@pytest.mark.parametrize("strategy", ["actnn", "none"])
@pytest.mark.parametrize("min_numel", [0, 10**6])  # coded-size and small saves
def test_autocast_weight_casts_pass_through(strategy, min_numel):
    lin = nn.Linear(64, 48)
    x = torch.randn(32, 64, requires_grad=True)
    with (
        torch.autocast("cpu", dtype=torch.bfloat16),
        actpack.compress(strategy, min_numel=min_numel) as ctx,
    ):
        lin(x * 1).float().sum().backward()
    # The bf16 weight copy is a weight; the bf16 copy of the input is saved.
    assert ctx.stats.weight_bytes == 48 * 64 * 2
    assert ctx.stats.baseline_bytes == 32 * 64 * 2


@pytest.mark.parametrize("strategy", ["actnn", "none"])
@pytest.mark.parametrize("shape", [(64, 64), (8, 64, 64)])
def test_input_cast_shaped_like_the_weight_is_not_a_weight(strategy, shape):
    # A square weight and an input batch of the same shape: the bf16 copy of
    # the batch (no history: the batch needs no grad) was taken for a cast
    # of the weight by its shape.
    lin = nn.Linear(64, 64)
    x = torch.randn(*shape)
    with (
        torch.autocast("cpu", dtype=torch.bfloat16),
        actpack.compress(strategy, min_numel=0) as ctx,
    ):
        lin(x).float().sum().backward()
    assert ctx.stats.weight_bytes == 0
    assert ctx.stats.baseline_bytes == x.numel() * 2


@pytest.mark.parametrize("strategy", ["actnn", "none"])
@pytest.mark.parametrize("layer", ["attention", "encoder layer"])
@pytest.mark.parametrize("frozen", [False, True])  # True: out_proj frozen, in_proj trained
def test_reshaped_input_cast_shaped_like_a_weight_is_not_a_weight(strategy, layer, frozen):
    # Under autocast, attention reshapes its (4, 16, 64) input to (64, 64)
    # and saves its bf16 copy, whose shape is out_proj.weight's: the op's
    # arguments hold no other (64, 64) tensor, so the shape alone called it
    # a weight cast.  A weight that requires grad casts with history: a
    # save without history is never one of its casts.
    torch.manual_seed(0)
    if layer == "attention":
        model = nn.MultiheadAttention(64, 4, batch_first=True)
        run = lambda x: model(x, x, x, need_weights=False)[0]  # noqa: E731
    else:
        model = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True)
        run = model
    if frozen:  # its weight's cast has no history: only shapes and values can tell
        attention = model if layer == "attention" else model.self_attn
        attention.out_proj.requires_grad_(False)
    x = torch.randn(4, 16, 64)
    params = list(model.parameters())
    weights = {p.untyped_storage().data_ptr() for p in params}
    casts = 0  # bytes of the weights' bf16 casts autograd saves (history, or values, say so)
    saved = set()

    def is_cast(t):
        if t.grad_fn is None:  # a frozen weight's cast: the values tell
            return any(
                torch.equal(w.to(t.dtype), t)
                for p in params
                for w in (p, p.t() if p.dim() == 2 else p)
                if w.shape == t.shape
            )
        node = (t._base if t._base is not None else t).grad_fn
        if type(node).__name__ != "ToCopyBackward0":
            return False
        source = node.next_functions[0][0]
        return type(source).__name__ == "AccumulateGrad" and (
            source.variable.untyped_storage().data_ptr() in weights
        )

    def pack(t):
        nonlocal casts
        key = t.untyped_storage().data_ptr()
        if t.dtype == torch.bfloat16 and key not in saved and is_cast(t):
            casts += t.untyped_storage().nbytes()
        saved.add(key)
        return t

    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            run(x)
        engine = actpack.Engine(strategy, min_numel=0, track_ops=True)
        with engine:
            run(x).float().sum().backward()
    assert casts > 0
    assert engine.stats.weight_bytes == casts


@pytest.mark.parametrize("rows,out", [(64, 64), (32, 48)])  # square: told apart by value
def test_frozen_weight_cast_under_autocast_passes_through(rows, out):
    lin = nn.Linear(64, out).requires_grad_(False)
    x = torch.randn(rows, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16), actpack.compress("actnn", min_numel=0) as ctx:
        lin(x * 2).float().sum().backward()
    assert ctx.stats.weight_bytes == out * 64 * 2


def test_same_tensor_saved_twice_is_stored_once():
    x = torch.randn(8, 4096, requires_grad=True)
    w1, w2 = torch.randn(4096, requires_grad=True), torch.randn(4096, requires_grad=True)
    with actpack.compress("actnn") as ctx:
        y = x * 3
        (y * w1 + y * w2).sum().backward()
    # y is saved by both multiplications: one encoding, one storage in the baseline.
    assert ctx.stats.baseline_bytes == y.numel() * 4
    single = actpack.ActNN().encode(y.detach(), actpack.SaveInfo()).nbytes
    assert ctx.stats.compressed_bytes == single


class _UnpackTwice(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * 2

    @staticmethod
    def backward(ctx, g):
        (a,) = ctx.saved_tensors
        (b,) = ctx.saved_tensors
        assert torch.equal(a, b)
        return g * a * 0 + g * 2


@pytest.mark.parametrize("strategy", LOSSY)
def test_double_unpack_returns_same_values(strategy):
    x = torch.randn(4, 4096).mul(3).requires_grad_()
    with actpack.compress(strategy):
        y = _UnpackTwice.apply(x * 1)
    y.sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 2.0))


@pytest.mark.parametrize("strategy", LOSSY)
def test_retain_graph_backward_twice_is_deterministic(strategy):
    lin = nn.Linear(256, 256)
    x = torch.randn(32, 256)
    with actpack.compress(strategy):
        loss = torch.tanh(lin(x)).pow(2).sum()
    loss.backward(retain_graph=True)
    g1 = lin.weight.grad.clone()
    lin.weight.grad = None
    loss.backward()
    assert torch.equal(g1, lin.weight.grad)


def test_create_graph_raises_clear_error():
    x = torch.randn(32, 256, requires_grad=True)
    with actpack.compress("actnn"):
        y = (x * 1).tanh()
    with pytest.raises(RuntimeError, match="create_graph"):
        torch.autograd.grad(y.sum(), x, create_graph=True)


def test_create_graph_works_with_exact_strategy():
    x = torch.randn(32, 256, requires_grad=True)
    with actpack.compress("none"):
        y = (x * 1).tanh().sum()
    (g,) = torch.autograd.grad(y, x, create_graph=True)
    (gg,) = torch.autograd.grad(g.sum(), x)
    t = torch.tanh(x.detach())
    torch.testing.assert_close(gg, -2 * t * (1 - t**2))


def _with_tiny_values(shape):
    z = torch.randn(shape)
    z.view(-1)[::7] = 1e-30  # positives a lossy code would round to zero
    z.view(-1)[1::7] = -1e-30
    z.view(-1)[2::11] = 0.0
    return z


ACTIVATIONS = {
    "relu": F.relu,
    "relu_inplace": lambda z: F.relu(z * 1, inplace=True),
    "leaky_relu": lambda z: F.leaky_relu(z, 0.1),
    "relu6": lambda z: F.relu6(z * 4),
    "hardtanh": lambda z: F.hardtanh(z, -0.5, 0.5),
    "threshold": lambda z: F.threshold(z, 0.3, -1.0),
    "module_relu": nn.ReLU(),
}


@pytest.mark.parametrize("act", list(ACTIVATIONS))
@pytest.mark.parametrize("strategy", LOSSY)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_relu_family_backward_is_exact(act, strategy, dtype):
    fn = ACTIVATIONS[act]
    z0 = _with_tiny_values((4, 8, 16, 16)).to(dtype)
    if act in ("relu6", "hardtanh", "threshold"):
        z0.view(-1)[3::13] = 0.5 if act == "hardtanh" else 0.3  # exactly on a boundary
    g = torch.randn(z0.shape, dtype=dtype)
    grads = []
    for ctx in (actpack.compress("none"), actpack.compress(strategy)):
        z = z0.clone().requires_grad_()
        with ctx:
            y = fn(z * 1)
        y.backward(g)
        grads.append(z.grad)
    assert torch.equal(grads[0], grads[1])


def test_relu_output_under_actnn_needs_no_mask_bit():
    z = torch.randn(8, 4096, requires_grad=True)
    with actpack.compress("actnn") as ctx:
        F.relu(z * 1).sum().backward()
    # 2 bits per element + min/max (2 x 16 bit) per group of 256 -> 2.125 bits
    assert ctx.stats.compressed_bytes == 8 * 4096 * 2 // 8 + 8 * 16 * 4


@pytest.mark.parametrize("strategy", LOSSY)
def test_non_finite_values_reach_the_gradients(strategy):
    conv = nn.Conv2d(4, 4, 3, padding=1)
    x = torch.randn(2, 4, 32, 32)
    x[0, 1, 5, 7] = float("nan")
    x[1, 2, 20, 3] = float("inf")
    x[1, 3, 30, 30] = float("-inf")
    grads = []
    for s in ("none", strategy):
        conv.zero_grad()
        with actpack.compress(s):
            y = conv(x * 1)
        y.backward(torch.ones_like(y))
        grads.append(conv.weight.grad.clone())
    exact, comp = grads
    assert not torch.isfinite(comp[~torch.isfinite(exact)]).any()


@pytest.mark.parametrize("strategy", ["int8", "actnn", "division"])
def test_non_finite_damage_is_contained(strategy):
    x = torch.randn(4, 16, 16, 16).requires_grad_()
    g = torch.randn_like(x)
    with actpack.compress(strategy):
        a = x * 1
        y = a * a  # saves a
    a_poisoned = a.detach().clone()
    y.backward(g)
    x2 = x.detach().clone()
    x2[2, 3, 4, 5] = float("nan")
    x2.requires_grad_()
    with actpack.compress(strategy):
        a = x2 * 1
        y = a * a
    y.backward(g)
    bad = ~torch.isfinite(x2.grad)
    assert bad[2, 3, 4, 5]
    # only the unit that shares a range may be damaged: one (sample, channel) map
    assert bad.sum() <= 16 * 16
    assert bad[[0, 1, 3]].sum() == 0 and bad[2, [0, 1, 2] + list(range(4, 16))].sum() == 0
    del a_poisoned


@pytest.mark.parametrize("strategy", LOSSY)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed"])
def test_restored_tensor_keeps_dtype_shape_strides(strategy, dtype, layout):
    x = torch.randn(4, 8, 16, 16, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "transposed":
        x = x.transpose(2, 3)
    seen = {}

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            ctx.save_for_backward(t)
            return t.clone()

        @staticmethod
        def backward(ctx, g):
            (t,) = ctx.saved_tensors
            seen["t"] = t
            return g

    leaf = x.detach().requires_grad_()
    with actpack.compress(strategy):
        Probe.apply(leaf * 1).sum().backward()
    t = seen["t"]
    assert t.dtype == dtype and t.shape == x.shape and t.device == x.device
    assert t.stride() == (leaf * 1).stride()
    step = (x.float().amax() - x.float().amin()) / (1 if strategy not in ("fp16", "bf16") else 64)
    assert (t.float() - x.float()).abs().max() <= step


def test_bool_masks_are_one_bit_and_lossless():
    mask = torch.rand(64, 4096) > 0.5
    enc = Bits.encode(mask)
    assert enc.nbytes == mask.numel() // 8
    assert torch.equal(enc.decode(), mask)


def test_dropout_is_exact_under_compression():
    x = torch.randn(16, 4096, requires_grad=True)
    torch.manual_seed(3)
    F.dropout(x, 0.5).sum().backward()
    ref = x.grad.clone()
    x.grad = None
    torch.manual_seed(3)
    with actpack.compress("actnn"):
        y = F.dropout(x, 0.5)
    y.sum().backward()
    assert torch.equal(ref, x.grad)


def test_tiny_tensors_pass_through():
    x = torch.randn(10, 10, requires_grad=True)
    with actpack.compress("actnn") as ctx:
        (x * 1).tanh().sum().backward()
    assert ctx.stats.compressed_bytes == ctx.stats.baseline_bytes
    assert ctx.stats.passthrough["tiny"] > 0


def test_two_models_in_one_process_do_not_interfere():
    def make():
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 10))

    x = torch.randn(64, 256)

    def grads(model, strategy):
        model.zero_grad()
        model(x).pow(2).sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    a = actpack.wrap(make(), actpack.ActNN(seed=11))
    alone = grads(a, None)
    actpack.unwrap(a)
    a = actpack.wrap(make(), actpack.ActNN(seed=11))
    b = actpack.wrap(make(), actpack.Division(seed=12))
    torch.manual_seed(5)  # consuming global RNG must not matter: strategies own theirs
    grads(b, None)
    together = grads(a, None)
    for g1, g2 in zip(alone, together):
        assert torch.equal(g1, g2)


def test_wrap_keeps_parameters_state_dict_and_weights():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten())
    keys = list(model.state_dict())
    params = [p.detach().clone() for p in model.parameters()]
    wrapped = actpack.wrap(model, "division")
    assert wrapped is model
    assert list(wrapped.state_dict()) == keys
    assert all(torch.equal(a, b) for a, b in zip(params, wrapped.parameters()))
    wrapped(torch.randn(2, 3, 32, 32)).sum().backward()
    assert actpack.engine_of(wrapped).stats.ratio > 1.5
    with pytest.raises(ValueError, match="already wrapped"):
        actpack.wrap(model, "actnn")
    actpack.unwrap(model)
    with pytest.raises(ValueError, match="not wrapped"):
        actpack.unwrap(model)


@pytest.mark.parametrize(
    "make",
    [
        actpack.ActNN,
        actpack.RowActNN,
        actpack.Division,
        lambda: actpack.ActNNMixed(budget=2.0, refresh_every=1),
    ],
)
def test_one_strategy_object_serves_one_wrapped_model(make):
    # Shared, the two models' layers of one name overwrote each other's
    # statistics (ActNNMixed's allocation never settled) and every strategy's
    # generator made one model's noise depend on the other's steps.
    a, b = nn.Sequential(nn.Linear(8, 32), nn.ReLU()), nn.Sequential(nn.Linear(8, 64), nn.ReLU())
    strategy = make()
    actpack.wrap(a, strategy)
    actpack.wrap(a := actpack.unwrap(a), strategy)  # the same model again: fine
    with pytest.raises(ValueError, match="already runs for another wrapped model"):
        actpack.wrap(b, strategy)
    assert not hasattr(b, "_actpack_engine") and not b._forward_pre_hooks
    actpack.wrap(b, make())  # the fix the message gives: a strategy of its own
    twin = copy.deepcopy(a)  # a copy of a wrapped model has a strategy of its own
    assert actpack.engine_of(twin).strategy is not strategy
    actpack.unwrap(a)
    actpack.wrap(nn.Sequential(nn.Linear(8, 8)), strategy)  # free again once unwrapped


@pytest.mark.parametrize(
    ("running", "asked", "same"),
    [
        (lambda: actpack.ActNN(bits=8), "actnn", False),
        (lambda: actpack.ActNN(bits=8), lambda: actpack.ActNN(bits=8, seed=3), True),
        (lambda: actpack.ActNN(), "ACTNN", True),
        (lambda: actpack.Division(block_size=4), "division", False),
        (lambda: actpack.Division(), lambda: actpack.ActNN(), False),
        # ActNNMixed's repr leaves most knobs out: its settings are compared.
        (lambda: actpack.ActNNMixed(max_bits=4, momentum=0.5), "actnn-mixed", False),
        (lambda: actpack.ActNNMixed(), "actnn-mixed", True),
    ],
)
def test_measure_of_a_wrapped_model_checks_the_settings_asked_for(running, asked, same):
    # A name used to be compared by the strategy's name only: a model wrapped
    # with ActNN(bits=8) measured 3.9x for strategy="actnn" (2-bit: 15x),
    # while an equal object was refused.
    model = actpack.wrap(nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 8)), running())
    x = torch.randn(32, 64)
    strategy = asked if isinstance(asked, str) else asked()
    if same:
        assert actpack.measure(model, x, strategy=strategy).ratio == actpack.measure(model, x).ratio
    else:
        with pytest.raises(ValueError, match="omit strategy= to measure what it runs"):
            actpack.measure(model, x, strategy=strategy)
    with pytest.raises(ValueError, match="unknown strategy"):
        actpack.measure(model, x, strategy="actnm")


def test_wrap_refuses_modules_without_a_forward():
    """Hooks on a module that is never called never run: a container, or a
    training-loop module whose step calls a submodule, would train
    uncompressed without a word."""

    class Loop(nn.Module):  # a LightningModule's shape: the step calls self.net
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(4, 4)

        def training_step(self, x):
            return self.net(x).sum()

    for model in (Loop(), nn.ModuleList([nn.Linear(4, 4)]), nn.ModuleDict({"a": nn.ReLU()})):
        with pytest.raises(TypeError, match="defines no forward"):
            actpack.wrap(model, "actnn")
        assert not hasattr(model, "_actpack_engine") and not model._forward_pre_hooks
    loop = Loop()
    actpack.wrap(loop.net, "actnn")  # what the message says to do
    assert actpack.engine_of(loop.net) is not None


def test_wrap_exits_cleanly_when_forward_raises():
    class Boom(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    model = actpack.wrap(Boom(), "actnn")
    with pytest.raises(RuntimeError, match="boom"):
        model(torch.randn(2))
    x = torch.randn(8, 4096, requires_grad=True)
    (x * 1).tanh().sum().backward()  # no actpack hooks left installed
    assert torch.allclose(x.grad, 1 - torch.tanh(x.detach()) ** 2)


@pytest.mark.parametrize("cls", [actpack.ActNN, actpack.Division, actpack.RowActNN])
def test_a_strategy_class_instead_of_an_instance_names_the_fix(cls):
    model = torch.nn.Linear(4, 4)
    for call in (lambda: actpack.compress(cls), lambda: actpack.wrap(model, cls)):
        with pytest.raises(
            TypeError, match=rf"the class {cls.__name__}; .*actpack\.{cls.__name__}\(\)"
        ):
            call()
    assert not model._forward_pre_hooks and not model._forward_hooks  # nothing installed


def test_unknown_strategy_and_bad_knobs_raise_value_error():
    with pytest.raises(ValueError, match="valid names"):
        actpack.compress("actnm")
    with pytest.raises(ValueError, match="bits"):
        actpack.ActNN(bits=9)
    with pytest.raises(ValueError, match="group_size"):
        actpack.ActNN(group_size=0)
    with pytest.raises(ValueError, match="block_size"):
        actpack.Division(block_size=0)
    with pytest.raises(ValueError, match="min_numel"):
        actpack.compress("actnn", min_numel=-1)
    # model= that is not a module: raised at once, not as an AttributeError
    # on entering the engine.
    for bad in ("x", nn.Linear(2, 2).weight, [nn.Linear(2, 2)]):
        with pytest.raises(TypeError, match="model must be the nn.Module"):
            actpack.compress("actnn", model=bad)
    for make in (actpack.ActNN, actpack.Division, actpack.RowActNN):
        for bad in ("no", 0, None):  # read as booleans, they silently meant True or False
            with pytest.raises(ValueError, match="stochastic must be True or False"):
                make(stochastic=bad)


@pytest.mark.parametrize("bad", [2**70, -(2**70), 2**64, -(2**63) - 1, 1.5, "abc", True])
@pytest.mark.parametrize(
    "make", [actpack.ActNN, actpack.Division, actpack.ActNNMixed, actpack.Cast16]
)
def test_a_bad_seed_raises_when_the_strategy_is_made(make, bad):
    # 2**70 used to fail inside the first forward (an overflow in manual_seed),
    # 1.5 was truncated to 1, "abc" raised int()'s own message.
    with pytest.raises(ValueError, match="seed must be an integer"):
        make(seed=bad)


# An integer as a PyTorch user may hold it: NumPy integers (from a config or an
# array) and 0-d integer tensors, read through operator.index as seed= is.
INTEGERS = {
    "np.int64": lambda v: pytest.importorskip("numpy").int64(v),
    "np.int32": lambda v: pytest.importorskip("numpy").int32(v),
    "0-d tensor": lambda v: torch.tensor(v),
}
# (strategy, knob, valid value, attribute holding it)
INTEGER_KNOBS = [
    (actpack.ActNN, "bits", 4, "bits"),
    (actpack.ActNN, "group_size", 128, "group_size"),
    (actpack.Int8, "group_size", 64, "group_size"),
    (actpack.RowActNN, "bits", 3, "bits"),
    (actpack.RowActNN, "sensitive_bits", 4, "sensitive_bits"),
    (actpack.RowActNN, "group_size", 128, "group_size"),
    (actpack.Division, "bits", 3, "bits"),
    (actpack.Division, "block_size", 4, "block_size"),
    (actpack.RowActNN, "min_group", 64, "min_group"),
    (actpack.ActNNMixed, "group_size", 128, "group_size"),
    (actpack.ActNNMixed, "min_bits", 2, "min_bits"),
    (actpack.ActNNMixed, "max_bits", 6, "max_bits"),
    (actpack.ActNNMixed, "refresh_every", 3, "refresh_every"),
    (actpack.ActNNMixed, "prefetch", 1, "prefetch"),
    (lambda **kw: actpack.ActNN(level="L1", **kw), "group_size", 64, "group_size"),
    (lambda **kw: actpack.ActNN(level="L3", **kw), "group_size", 64, "group_size"),
]


@pytest.mark.parametrize("kind", list(INTEGERS))
@pytest.mark.parametrize(("make", "knob", "value", "attr"), INTEGER_KNOBS)
def test_integer_knobs_take_numpy_and_0d_tensor_integers(make, knob, value, attr, kind):
    # ActNN(bits=np.int64(4)) raised "bits must be an integer in 1..8, got
    # np.int64(4)" though seed= took it.
    strategy = make(**{knob: INTEGERS[kind](value)})
    got = getattr(strategy, attr)
    assert type(got) is int and got == value  # stored as a plain int
    assert repr(strategy) == repr(make(**{knob: value}))


@pytest.mark.parametrize(
    "bad",
    [True, 2.0, "2", None, torch.tensor(2.0), torch.tensor([2]), torch.tensor(True)],
    ids=["True", "2.0", "str", "None", "float tensor", "1-d tensor", "bool tensor"],
)
@pytest.mark.parametrize(("make", "knob", "value", "attr"), INTEGER_KNOBS)
def test_integer_knobs_refuse_bools_floats_and_arrays(make, knob, value, attr, bad):
    with pytest.raises(ValueError, match=f"{knob} must be (an|a positive|a non-negative) integer"):
        make(**{knob: bad})


@pytest.mark.parametrize("kind", list(INTEGERS))
def test_rows_block_takes_numpy_and_0d_tensor_integers(kind):
    assert actpack.RowActNN(block=INTEGERS[kind](32)).block == 32
    for bad in (True, 2.0, 24, torch.tensor([32])):
        with pytest.raises(ValueError, match="block must be a power of two"):
            actpack.RowActNN(block=bad)


@pytest.mark.parametrize(
    "make",
    [
        actpack.ActNN,
        actpack.Int8,
        actpack.RowActNN,
        actpack.Division,
        actpack.ActNNMixed,
        actpack.Cast16,
        lambda: actpack.ActNN(level="L1"),
    ],
)
def test_a_state_without_a_seed_names_the_missing_key(make):
    # load_state_dict({}) raised a bare KeyError: 'seed'.
    with pytest.raises(ValueError, match="no 'seed'"):
        make().load_state_dict({})
    with pytest.raises(TypeError, match="expects a dict from state_dict"):
        make().load_state_dict([("seed", 1)])


@pytest.mark.parametrize("bad", [torch.tensor([3]), torch.tensor([[4]]), torch.tensor(True)])
def test_a_seed_tensor_must_be_a_0d_integer(bad):
    with pytest.raises(ValueError, match="seed must be an integer"):
        actpack.ActNN(seed=bad)


@pytest.mark.parametrize("knob", ["budget", "momentum"])
@pytest.mark.parametrize(
    "kind",
    ["np.float32", "np.float64", "np.int64", "0-d tensor", "0-d int tensor"],
)
def test_real_knobs_take_numpy_and_0d_tensor_numbers(knob, kind):
    # budget=np.float64(2.5) was taken and np.float32(2.5) refused ("must be a
    # number of bits"); momentum="0.5" was taken.
    value = {"budget": 3.0, "momentum": 0.5}[knob]
    make = {
        "np.float32": lambda v: pytest.importorskip("numpy").float32(v),
        "np.float64": lambda v: pytest.importorskip("numpy").float64(v),
        "np.int64": lambda v: pytest.importorskip("numpy").int64(v) if v == int(v) else v,
        "0-d tensor": lambda v: torch.tensor(v),
        "0-d int tensor": lambda v: torch.tensor(int(v)) if v == int(v) else torch.tensor(v),
    }[kind]
    strategy = actpack.ActNNMixed(**{knob: make(value)})
    got = getattr(strategy, knob)
    assert type(got) is float and got == value


@pytest.mark.parametrize(
    ("knob", "bad", "message"),
    [
        ("budget", "2.5", "budget must be a number of bits"),
        ("budget", True, "budget must be a number of bits"),
        ("budget", torch.tensor([2.5]), "budget must be a number of bits"),
        ("momentum", "0.5", "momentum must be a real number"),
        ("momentum", None, "momentum must be a real number"),
    ],
)
def test_real_knobs_refuse_strings_bools_and_arrays(knob, bad, message):
    with pytest.raises(ValueError, match=message):
        actpack.ActNNMixed(**{knob: bad})


def test_min_bits_above_max_bits_names_the_two():
    # It said "budget must be within [4, 2], got 3".
    with pytest.raises(ValueError, match="min_bits must not exceed max_bits"):
        actpack.ActNNMixed(min_bits=4, max_bits=2, budget=3)


def test_allocate_bits_knobs_are_checked_as_the_strategy_checks_them():
    from actpack.strategies.allocate import allocate_bits

    sens, elements = [torch.ones(4)], [8]
    with pytest.raises(ValueError, match="max_bits must be an integer in 1..8"):
        allocate_bits(sens, elements, 2.0, max_bits=4.5)  # was truncated to 4
    with pytest.raises(ValueError, match="min_bits must be an integer in 1..8"):
        allocate_bits(sens, elements, 2.0, min_bits=1.5)
    with pytest.raises(ValueError, match="budget must be a real number"):
        allocate_bits(sens, elements, "2.0")
    with pytest.raises(ValueError, match="elements must be a positive integer"):
        allocate_bits(sens, [8.5], 2.0)
    want = allocate_bits(sens, elements, 2.0, max_bits=4, min_bits=2).bits[0].tolist()
    got = allocate_bits(
        sens, [torch.tensor(8)], torch.tensor(2.0), max_bits=torch.tensor(4), min_bits=[2]
    )
    assert got.bits[0].tolist() == want


def test_level_none_is_plain_actnn():
    # ActNN(level=None) raised "ActNN.__init__() got an unexpected keyword argument 'level'".
    for kwargs in ({}, {"bits": 4, "group_size": 64}):
        strategy = actpack.ActNN(level=None, **kwargs)
        assert type(strategy) is actpack.ActNN
        assert repr(strategy) == repr(actpack.ActNN(**kwargs))


@pytest.mark.parametrize("level", ["L0", "L1", "L3", "L5"])
@pytest.mark.parametrize("args", [(4,), (2, 256), (2, 256, True, 5)])
def test_positional_bits_with_a_level_is_refused_as_bits_is(level, args):
    # ActNN(4, level="L3") built ActNNMixed(budget=4.0) and ActNN(2, level="L1")
    # raised "ActNNPreset.__init__() got multiple values for argument 'level'",
    # where ActNN(bits=4, level=...) says the level sets the bits.
    with pytest.raises(TypeError, match=rf"ActNN\(level='{level}'\) does not take 'bits'.*keyword"):
        actpack.ActNN(*args, level=level)


@pytest.mark.parametrize("kind", list(INTEGERS))
def test_a_level_may_be_a_numpy_or_tensor_integer(kind):
    strategy = actpack.ActNN(level=INTEGERS[kind](3))
    assert strategy.level == "L3" and strategy.name == "actnn-l3"


@pytest.mark.parametrize("seed", [None, 0, -1, -(2**63), 2**64 - 1, torch.tensor(7)])
def test_every_seed_manual_seed_takes_works(seed):
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
    strategy = actpack.Division(seed=seed)  # derives seed + 1 and seed + 2
    with actpack.compress(strategy, min_numel=1):
        model(torch.randn(64, 8)).sum().backward()
    assert type(strategy.seed) is int
    assert seed is None or strategy.seed == int(seed)


@pytest.mark.parametrize("strategy", ["none", "actnn-l0"])
@pytest.mark.parametrize("form", ["bf16", "fp16", "int8"])
def test_lossy_checkpoint_inputs_under_a_lossless_strategy_raise(strategy, form):
    # They were ignored without a word: a lossless strategy keeps every save exact.
    with pytest.raises(ValueError, match="is lossless and keeps every saved tensor exact"):
        actpack.compress(strategy, checkpoint_inputs=form)
    with pytest.raises(ValueError, match="is lossless"):
        actpack.wrap(nn.Linear(4, 4), strategy, checkpoint_inputs=form)
    actpack.compress(strategy, checkpoint_inputs="exact")  # the default stays valid


@pytest.mark.parametrize("strategy", LOSSY)
def test_no_host_synchronisation_on_save_or_restore(strategy, monkeypatch):
    # The code that also runs on GPUs: the engine and the reference codecs
    # (the compiled codecs run on CPU tensors only, where reading a flag
    # synchronises nothing: they skip their poisoned groups' fix-up so).
    monkeypatch.setenv("ACTPACK_BACKEND", "reference")
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(8 * 16 * 16, 10), nn.Dropout(0.1),
    )  # fmt: skip
    x = torch.randn(4, 3, 32, 32)
    with actpack.compress(strategy, min_numel=0):
        out = model(x)

    def forbidden(*args, **kwargs):
        raise AssertionError("host synchronisation on the compressed path")

    # Only the restore path runs from here on; the save path is checked by a
    # second forward below with the same guards in place.
    for name in ("item", "tolist", "cpu", "numpy", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    with actpack.compress(strategy, min_numel=0):
        out2 = model(x)
    out.sum().backward()
    out2.sum().backward()


@pytest.mark.parametrize("strategy", LOSSY)
def test_packed_data_is_freed_with_the_graph(strategy, monkeypatch):
    import gc
    import weakref

    from actpack.engine.eager import Engine

    engine = actpack.compress(strategy)
    refs = []
    pack = Engine._pack_in  # the pack hook a forward of a lossy strategy binds

    def spy(self, st, t):
        saved = pack(self, st, t)
        if not isinstance(saved, torch.Tensor):
            refs.append(weakref.ref(saved))
        return saved

    monkeypatch.setattr(Engine, "_pack_in", spy)
    x = torch.randn(16, 4096, requires_grad=True)
    with engine:
        loss = torch.tanh(x * 2).pow(2).sum()
    assert refs and all(r() is not None for r in refs)
    loss.backward()
    del loss
    gc.collect()
    assert all(r() is None for r in refs)


def test_small_view_of_a_large_storage_is_copied_exactly():
    x = torch.randn(64, 256, requires_grad=True)
    w = torch.randn(256, 10, requires_grad=True)
    with actpack.compress("actnn") as ctx:
        h = x * 2  # 16384 elements
        out = h[:, 0:1] * w[:1]  # saves a 64-element view of h's storage
    assert ctx.stats.passthrough["tiny"] == 64 * 4  # the copy, not h's 64 KiB storage
    out.sum().backward()
    copied = w.grad.clone()
    w.grad = None
    ((x * 2)[:, 0:1] * w[:1]).sum().backward()
    assert torch.equal(copied, w.grad)


def test_cast_strategies_leave_16_bit_tensors_alone():
    x = torch.randn(64, 4096, dtype=torch.bfloat16, requires_grad=True)
    with actpack.compress("fp16") as ctx:
        y = torch.relu(x * 1)
    assert ctx.stats.passthrough["already 16-bit"] == x.numel() * 2
    assert ctx.stats.compressed_bytes == ctx.stats.baseline_bytes
    y.sum().backward()


@pytest.mark.parametrize("strategy", ["none", "actnn", "division"])
def test_an_engine_dies_by_reference_count(strategy):
    # A reference cycle through an engine (its compile-native hooks pointing
    # back at it) left every ``with compress(...)`` of a training loop to the
    # garbage collector, whose full passes over a large heap (Inductor
    # imported) then cost more than the step.  No timing here: the engine and
    # its hooks must be freed as soon as the last reference goes.
    import gc
    import weakref

    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    x = torch.randn(64, 64)
    # The first engine of a configuration builds the shared GraphModule pair;
    # torch.fx keeps frames of that first build (and so that engine) alive.
    with actpack.compress(strategy, min_numel=16):
        model(x).square().mean().backward()
    enabled = gc.isenabled()
    gc.disable()  # a collection in between would hide a cycle
    try:
        engine = actpack.compress(strategy, min_numel=16)
        with engine:
            loss = model(x).square().mean()
        loss.backward()
        refs = [weakref.ref(engine), weakref.ref(engine.stats)]
        hooks = getattr(engine, "_graph_hooks", None)
        if hooks is not None:
            refs.append(weakref.ref(hooks))
        del engine, hooks, loss
        assert all(r() is None for r in refs)
    finally:
        if enabled:
            gc.enable()


class _ScaledByBuffer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(64, 64)
        self.register_buffer("scale", torch.rand(64, 64))

    def forward(self, x):
        return self.lin(x) * self.scale  # the product saves the buffer


@pytest.mark.parametrize(
    "change",
    [
        "nothing", "data", "to", "load_state_dict(assign)",
        "load_state_dict(assign), old weights held", "submodule replaced, old one held",
        "buffer replaced, old one held",
    ],
)  # fmt: skip
def test_weight_table_follows_the_model(change):
    # The engine keeps its table of weight storages between forwards; a
    # weight that moves to another storage must not turn into "leaf input".
    # Nor must a weight replaced while the old one lives on elsewhere (an
    # optimizer's or EMA's reference): no weight the table lists died or moved.
    model = _ScaledByBuffer()
    held = [*model.parameters(), *model.buffers(), model.lin]
    x = torch.randn(64, 64, requires_grad=True)
    with actpack.compress("actnn") as unknown:  # no model: the buffer is an input
        model(x)
    assert unknown.stats.leaf_bytes == 64 * 64 * 4
    model = actpack.wrap(model, "actnn")
    model(x).sum().backward()
    engine = actpack.engine_of(model)
    assert engine.stats.leaf_bytes == 0
    if change == "data":
        model.scale.data = torch.rand(64, 64)
    elif change == "to":
        model.to(torch.float64)
        x = x.detach().double().requires_grad_()
    elif change.startswith("load_state_dict(assign)"):
        state = {k: v.clone() for k, v in model.state_dict().items()}
        model.load_state_dict(state, assign=True)
    elif change.startswith("submodule replaced"):
        model.lin = nn.Linear(64, 64).requires_grad_(False)  # its weight's view is saved
    elif change.startswith("buffer replaced"):
        model.scale = torch.rand(64, 64)
    if "held" not in change:
        del held
    model(x).sum().backward()
    assert engine.stats.leaf_bytes == 0
    if "held" in change:
        model.to(torch.float64)  # and the table still follows what it missed
        model(x.detach().double().requires_grad_()).sum().backward()
        assert engine.stats.leaf_bytes == 0


@pytest.mark.parametrize("strategy", ["none", "actnn"])
@pytest.mark.parametrize("how", ["wrap", "compress(model=)"])
def test_buffers_are_left_out_of_the_baseline(strategy, how):
    # Stats: "parameters, buffers and their casts are excluded" from the
    # baseline.  The untracked path ("none") counted a buffer an op saves as
    # an activation (the tracked path finds it in the table of weight storages).
    model = _ScaledByBuffer()
    x = torch.randn(64, 64, requires_grad=True)
    if how == "wrap":
        actpack.wrap(model, strategy, min_numel=0)
        model(x).sum().backward()
        stats = actpack.engine_of(model).stats
    else:
        with actpack.compress(strategy, model=model, min_numel=0) as ctx:
            model(x).sum().backward()
        stats = ctx.stats
    # Saved: x (a leaf that needs grad), the weight's transpose (a weight
    # view), the buffer: no activation.
    assert stats.baseline_bytes == stats.compressed_bytes == stats.leaf_bytes == 0
    assert stats.weight_bytes == 64 * 64 * 4


@pytest.mark.parametrize("strategy", ["actnn", "none"])
def test_suspended_inside_an_active_forward(strategy):
    # suspended() inside a running `with engine:` left its hooks in place.
    x = torch.randn(16, 4096, requires_grad=True)
    w = torch.randn(4096, requires_grad=True)
    engine = actpack.compress(strategy)
    with engine:
        a = (x * 2).tanh()  # saved by the engine
        counted = engine.stats.baseline_bytes
        with engine.suspended():
            b = (x * 3).tanh() * w  # kept as autograd keeps it
        assert engine.stats.baseline_bytes == counted > 0
        c = (x * 4).sigmoid()
    (a.sum() + b.sum() + c.sum()).backward()
    got = x.grad.clone()
    x.grad = w.grad = None
    ((x * 2).tanh().sum() + ((x * 3).tanh() * w).sum() + (x * 4).sigmoid().sum()).backward()
    if strategy == "none":
        assert torch.equal(got, x.grad)
    assert engine.stats.baseline_bytes > counted  # c's save counted after it


@pytest.mark.parametrize("strategy", ["none", "actnn"])
@pytest.mark.parametrize("root_op", ["sin", "layer_norm"])
def test_module_rows_are_the_same_in_every_forward(strategy, root_op):
    # The tracker was made in the root's forward pre-hook, after PyTorch had
    # collected this call's hooks: the first forward put the root's own
    # saves under "<none>", the next ones under "<root>".
    class Root(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 32))

        def forward(self, x):
            h = self.body(x)
            return h.sin() if root_op == "sin" else F.layer_norm(h, (32,))

    model = actpack.wrap(Root(), strategy, min_numel=0, track_modules=True)
    x = torch.randn(16, 32)
    rows = []
    for _ in range(3):
        model(x).sum().backward()
        rows.append(dict(actpack.engine_of(model).stats.by_module))
    assert rows[0] == rows[1] == rows[2]
    assert "<root>" in rows[0] and "<none>" not in rows[0]
    assert {"body.1", "body.2"} <= set(rows[0])  # (body.0 saves the input batch: a leaf)


class _Float64Copy(actpack.Strategy):
    """A (lossless) code twice or four times the tensor's size: float64 values."""

    name = "float64-copy"

    def encode(self, x, info):
        from actpack.codecs.encoded import Cast

        return Cast(x.detach().double(), x.dtype)


def _bloated_models():
    conv = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.GELU(), nn.Conv2d(8, 4, 3))
    mlp = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 8))
    return [(conv, (6, 3, 12, 12)), (mlp, (32, 16))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("which", [0, 1])
def test_a_code_larger_than_its_tensor_is_kept_exact(which, dtype):
    """No save is ever held in more bytes than the tensor: a strategy's code
    that would be larger is dropped and the tensor kept exact, with a reason."""
    model, shape = _bloated_models()[which]
    model = model.to(dtype)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    model(x).float().square().sum().backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with actpack.compress(_Float64Copy(), min_numel=1) as ctx:
        model(x).float().square().sum().backward()
    for p, g in zip(model.parameters(), want):
        assert torch.equal(p.grad, g)
    kept = ctx.stats.passthrough.get("code larger than the tensor", 0)
    assert kept > 0
    assert ctx.stats.compressed_bytes <= ctx.stats.baseline_bytes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("spatial", [(1, 1), (2, 2), (1, 5), (5,), (3,)])
def test_division_codes_maps_of_heavy_metadata_with_actnn(spatial, dtype):
    """A 1x1 map (squeeze-and-excitation, a head after global pooling) cost
    DIVISION 50 bits per element (a bfloat16 mean and range per channel):
    more than float32.  Maps with more than 8 bits of that metadata per
    element take the per-group ActNN code, which is smaller than the tensor."""
    from actpack.codecs.encoded import Dual

    strategy = actpack.Division()
    x = torch.randn(64, 32, *spatial).to(dtype)
    code = strategy.encode(x, actpack.SaveInfo(op="conv2d" if len(spatial) == 2 else "conv1d"))
    assert not isinstance(code, Dual)
    assert code.nbytes * 8 < x.numel() * 3  # 2 bits and group metadata: under 3 bits
    assert code.decode().shape == x.shape and code.decode().dtype == dtype
    conv = nn.Conv2d(32, 32, 1) if len(spatial) == 2 else nn.Conv1d(32, 32, 1)
    head = nn.Sequential(conv, nn.GELU(), nn.Flatten(), nn.LazyLinear(5)).to(dtype)
    head(x)  # materialise the lazy layer
    report = actpack.measure(head, x, strategy="division", loss_fn=lambda o: o.float().sum())
    assert report.ratio > 4


@pytest.mark.parametrize("spatial", [(2, 3), (3, 3), (4, 4), (7, 7), (2, 40), (6,), (25,)])
def test_division_codes_maps_of_light_metadata(spatial):
    from actpack.codecs.encoded import Dual

    x = torch.randn(4, 8, *spatial)
    op = "conv2d" if len(spatial) == 2 else "conv1d"
    code = actpack.Division().encode(x, actpack.SaveInfo(op=op))
    assert isinstance(code, Dual)
    assert code.nbytes < x.numel() * 2  # below bfloat16's bytes


def test_importing_actpack_loads_neither_dynamo_nor_inductor():
    # compress()'s Dynamo-disabled twin, made at import, loaded both (2 s).
    import subprocess
    import sys

    code = (
        "import sys, actpack; "
        "print(sorted(m for m in ('torch._dynamo', 'torch._inductor') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
