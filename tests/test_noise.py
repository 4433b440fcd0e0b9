"""actpack.gradient_noise: gradient bias and variance against plain autograd."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import actpack


def _case():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 16 * 16, 10),
    )  # fmt: skip
    x = torch.randn(8, 3, 16, 16)
    y = torch.randint(0, 10, (8,))
    return model, x, lambda out: F.cross_entropy(out, y)


def test_exact_strategy_has_zero_bias_and_variance():
    model, x, loss = _case()
    r = actpack.gradient_noise(model, x, strategy="none", draws=3, loss_fn=loss)
    assert r.bias == 0.0 and r.variance == 0.0 and r.bias_corrected == 0.0
    assert all(b == 0.0 and v == 0.0 for b, v in r.layers.values())
    assert r.exact_norm_sq > 0 and r.draws == 3


def test_report_overall_and_per_layer():
    model, x, loss = _case()
    before = [p.detach().clone() for p in model.parameters()]
    buffers = [b.clone() for b in model.buffers()]
    r = actpack.gradient_noise(model, x, strategy="actnn", draws=4, loss_fn=loss)
    assert set(r.layers) == {"0", "1", "3", "6"}
    assert len(r.params) == 8
    assert r.variance > 0 and r.bias > 0 and r.error == r.bias + r.variance
    assert all(v > 0 for _, v in r.layers.values())
    assert "gradient bias" in str(r)
    # Model untouched: weights, BatchNorm statistics and .grad.
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("strategy", ["none", "actnn"])
def test_a_backward_pending_on_the_model_still_runs(strategy):
    """gradient_noise between a training forward and its backward: the
    parameters' versions are unchanged, BatchNorm's statistics are put back
    as the forward left them, and the pending backward (whose BatchNorm holds
    its running statistics) runs, with autograd's gradients."""
    model, x, loss = _case()
    twin = copy.deepcopy(model)
    want = torch.autograd.grad(loss(twin(x)), list(twin.parameters()))
    params = list(model.parameters())
    pending = loss(model(x))
    after_forward = [b.clone() for b in model.buffers()]
    versions = [p._version for p in params]
    actpack.gradient_noise(model, x, strategy=strategy, draws=2, loss_fn=loss)
    assert [p._version for p in params] == versions
    assert all(torch.equal(a, b) for a, b in zip(after_forward, model.buffers()))
    for g, w in zip(torch.autograd.grad(pending, params), want):
        torch.testing.assert_close(g, w)


def test_int8_is_much_quieter_than_two_bit_actnn():
    model, x, loss = _case()
    int8 = actpack.gradient_noise(model, x, strategy="int8", draws=4, loss_fn=loss)
    actnn = actpack.gradient_noise(model, x, strategy="actnn", draws=4, loss_fn=loss)
    # 8-bit steps are 85x smaller than 2-bit ones: variance ~7000x smaller.
    assert int8.variance < actnn.variance / 100
    assert int8.bias < actnn.bias / 10


def test_stateful_strategy_is_copied_not_changed():
    model, x, loss = _case()
    mixed = actpack.ActNNMixed(refresh_every=1, seed=0)
    for _ in range(2):
        with actpack.compress(mixed, model=model):
            out = model(x)
        loss(out).backward()
    state = mixed.state_dict()
    r = actpack.gradient_noise(model, x, strategy=mixed, draws=3, loss_fn=loss)
    assert r.variance > 0
    after = mixed.state_dict()
    assert after["step"] == state["step"] and after["seed"] == state["seed"]


def test_invalid_draws_raise_value_error():
    model, x, loss = _case()
    with pytest.raises(ValueError, match="draws"):
        actpack.gradient_noise(model, x, draws=0, loss_fn=loss)


@pytest.mark.parametrize(
    "bad", [1.5, None, 2**64, -(2**63) - 1, "3", True],
    ids=["1.5", "None", "2**64", "-2**63-1", "str", "True"],
)  # fmt: skip
def test_a_bad_seed_raises_a_clear_error(bad):
    # 1.5 was truncated to 1 (strategies refuse it), None raised int()'s
    # message and 2**64 "Overflow when unpacking long long".
    model, x, loss = _case()
    with pytest.raises(ValueError, match=r"seed must be an integer in \[-2\*\*63, 2\*\*64\)"):
        actpack.gradient_noise(model, x, draws=2, loss_fn=loss, seed=bad)


def test_numpy_and_tensor_integers_are_read_as_ints():
    np = pytest.importorskip("numpy")
    model, x, loss = _mlp(), torch.randn(16, 64), None
    strategy = actpack.ActNN(seed=5)
    want = actpack.gradient_noise(model, x, strategy=strategy, draws=2, loss_fn=loss, seed=3)
    for seed, draws in ((np.int64(3), np.int64(2)), (torch.tensor(3), torch.tensor(2))):
        got = actpack.gradient_noise(
            model, x, strategy=strategy, draws=draws, loss_fn=loss, seed=seed
        )
        assert (got.bias, got.variance, got.draws) == (want.bias, want.variance, 2)
    with pytest.raises(ValueError, match="draws must be a positive integer"):
        actpack.gradient_noise(model, x, draws=2.0, loss_fn=loss)


def test_seed_is_documented():
    assert "``seed``" in actpack.gradient_noise.__doc__


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_grad_mode_off_is_named_as_the_cause(mode):
    # It said "pass loss_fn= returning a differentiable scalar": the wrong fix.
    model, x, loss = _mlp(), torch.randn(16, 64), None
    with mode(), pytest.raises(ValueError, match="grad mode is off") as err:
        actpack.gradient_noise(model, x, draws=2, loss_fn=loss)
    assert "loss_fn" not in str(err.value)
    with torch.no_grad(), torch.enable_grad():  # the fix the message gives
        actpack.gradient_noise(model, x, draws=2, loss_fn=loss)


@pytest.mark.parametrize(
    "loss_fn",
    [
        lambda out: out.argmax(-1).float().sum(),  # a non-differentiable output
        lambda out: out.detach().sum(),
        None,  # the default loss of an integer output
    ],
    ids=["argmax", "detach", "default of argmax"],
)
def test_a_loss_without_grad_raises_a_clear_error(loss_fn):
    # It stopped with autograd's "element 0 of tensors does not require grad".
    model = nn.Sequential(nn.Linear(8, 4))
    x = torch.randn(16, 8)
    if loss_fn is None:
        model = nn.Sequential(model, _Argmax())
    with pytest.raises(ValueError, match="the loss does not require grad"):
        actpack.gradient_noise(model, x, draws=2, loss_fn=loss_fn)


class _Argmax(nn.Module):
    def forward(self, x):
        return x.argmax(-1)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(),
                         nn.Linear(256, 1))  # fmt: skip


@pytest.mark.parametrize("order", ["wrap(compile)", "compile(wrap)", "compile"])
def test_compiled_model_is_measured_through_its_eager_module(order):
    """Compiled codes draw their noise from the generator every draw re-seeds:
    measured as compiled, the draws repeat (variance 0).  The report is the
    eager module's, to the bit, with a warning."""
    x = torch.randn(512, 64)
    want = actpack.gradient_noise(_mlp(), x, strategy=actpack.ActNN(seed=5), draws=3)
    model = _mlp()
    if order == "wrap(compile)":
        model = actpack.wrap(torch.compile(model, backend="aot_eager"), "actnn")
    elif order == "compile(wrap)":
        model = torch.compile(actpack.wrap(model, "actnn"), backend="aot_eager")
    else:
        model = torch.compile(model, backend="aot_eager")
    with pytest.warns(UserWarning, match="eager module"):
        got = actpack.gradient_noise(model, x, strategy=actpack.ActNN(seed=5), draws=3)
    assert got.variance > 0
    assert got.variance == pytest.approx(want.variance, rel=1e-12)
    assert got.bias == pytest.approx(want.bias, rel=1e-12)


def test_compiled_submodules_are_refused():
    model = _mlp()
    model[2] = torch.compile(model[2], backend="aot_eager")
    with pytest.raises(ValueError, match="before compiling its blocks"):
        actpack.gradient_noise(model, torch.randn(8, 64), strategy="actnn", draws=2)


@pytest.mark.parametrize("where", ["model", "blocks"])
def test_modules_compiled_in_place_run_eagerly(where):
    """nn.Module.compile keeps the class (no OptimizedModule to unwrap): those
    modules run eagerly for the measurement (the draws repeated: variance 0),
    with a warning, and are compiled again after."""
    x = torch.randn(512, 64)
    want = actpack.gradient_noise(_mlp(), x, strategy=actpack.ActNN(seed=5), draws=3)
    model = _mlp()
    compiled = [model] if where == "model" else [m for m in model if isinstance(m, nn.Linear)]
    for m in compiled:
        m.compile(backend="aot_eager")
    with pytest.warns(UserWarning, match="compiled in place"):
        got = actpack.gradient_noise(model, x, strategy=actpack.ActNN(seed=5), draws=3)
    assert got.variance > 0
    assert got.variance == pytest.approx(want.variance, rel=1e-12)
    assert all(m._compiled_call_impl is not None for m in compiled)


def test_wrapped_model_is_measured_with_the_strategy_it_runs():
    """Without strategy=, a wrapped model's noise is that of the strategy it
    was wrapped with (not the package default); one given runs in its place."""
    x = torch.randn(256, 64)
    want = actpack.gradient_noise(_mlp(), x, strategy=actpack.Division(seed=3), draws=3)
    default = actpack.gradient_noise(_mlp(), x, draws=3)
    model = actpack.wrap(_mlp(), actpack.Division(seed=3))
    got = actpack.gradient_noise(model, x, draws=3)
    assert got.variance == want.variance and got.bias == want.bias
    assert got.variance != default.variance
    other = actpack.gradient_noise(model, x, strategy=actpack.ActNN(seed=5), draws=3)
    assert (
        other.variance
        == actpack.gradient_noise(_mlp(), x, strategy=actpack.ActNN(seed=5), draws=3).variance
    )
    assert actpack.engine_of(model).strategy.seed == 3  # the wrapped strategy untouched


@pytest.mark.parametrize("fn", [actpack.gradient_noise, actpack.measure])
def test_a_model_that_is_not_a_module_is_a_type_error(fn):
    with pytest.raises(TypeError, match="expects an nn.Module, got str"):
        fn("model", torch.randn(2, 4))


def test_one_draw_reports_its_error_not_a_bias():
    """With one draw ``variance`` is 0 by construction and ``bias`` is the
    draw's whole error: the report must not present that noise as a bias."""
    model, x, loss = _case()
    one = actpack.gradient_noise(model, x, strategy="actnn", draws=1, loss_fn=loss)
    assert one.variance == 0.0 and one.bias > 0 and one.error == one.bias
    assert math.isnan(one.bias_corrected)
    text = str(one)
    assert "gradient bias" not in text and "error of one draw" in text and "draws >= 2" in text
    many = actpack.gradient_noise(model, x, strategy="actnn", draws=4, loss_fn=loss)
    # The bias of an unbiased code is noise / draws: far below one draw's error.
    assert many.bias_corrected < one.bias / 2
