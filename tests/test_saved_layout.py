"""How saved tensors are laid out and shared: regions, strides, groups, views.

Each test here guards a defect found on a real architecture (see
tests/test_zoo.py): a wrong restore that no gradient check on a small
CNN would notice.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import actpack


class _SaveAndCheckStrides(torch.autograd.Function):
    """Saves its input; backward asserts the restored strides are the original ones."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        ctx.stride = x.stride()
        return x * 1

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        assert x.stride() == ctx.stride, (x.stride(), ctx.stride)
        return g


@pytest.mark.parametrize("strategy", ["actnn", "division", "int8", "bf16"])
@pytest.mark.parametrize("shape", [(4, 32, 48), (4, 48), (2, 8, 12, 12)])
def test_restored_contiguous_tensor_is_contiguous(strategy, shape):
    # DIVISION codes (N, L, D) as (N, D, L) and used to hand back a permuted
    # view; oneDNN's LSTM backward read it as contiguous (weight_hh cos ~ 0).
    x = torch.randn(*shape, requires_grad=True)
    with actpack.compress(strategy, min_numel=0):
        y = _SaveAndCheckStrides.apply(x * 1)
    y.sum().backward()


def test_lstm_gradients_under_division_match_exact_on_average():
    torch.manual_seed(0)
    rnn = nn.LSTM(24, 32, batch_first=True)
    x = torch.randn(4, 40, 24)

    def grad(strategy):
        rnn.zero_grad()
        with actpack.compress(strategy, min_numel=0):
            out, _ = rnn(x)
        out.pow(2).mean().backward()
        return rnn.weight_hh_l0.grad.clone()

    exact = grad("none")
    mean = sum(grad(actpack.Division(seed=s)) for s in range(8)) / 8
    cos = F.cosine_similarity(mean.flatten(), exact.flatten(), dim=0)
    assert cos > 0.95, cos


def _relu_then_linear(strategy, x, w):
    w = w.clone().requires_grad_()
    x = x.clone().requires_grad_()  # an activation with autograd history, not a leaf batch
    with actpack.compress(strategy, min_numel=0) as ctx:
        y = F.relu(x * 1)
        out = y @ w
    out.sum().backward()
    return w.grad, ctx.stats


def test_values_read_by_the_next_layer_are_unbiased_not_clamped():
    # Under DIVISION the decode of a ReLU output can be negative; clamping it
    # to >= 0 for ReLU's sake biased the next layer's weight gradient.
    # grad_w[i, j] = sum_n y[n, i]: a mean over K draws must be within 5
    # standard errors of the exact value, where the standard error comes from
    # the draws' own spread.
    torch.manual_seed(0)
    x = torch.randn(64, 256) * 0.3 + 0.1
    w = torch.ones(256, 1)
    exact, _ = _relu_then_linear("none", x, w)
    draws = torch.stack([_relu_then_linear(actpack.Division(seed=s), x, w)[0] for s in range(32)])
    se = draws.std(0) / math.sqrt(len(draws))
    z = (draws.mean(0) - exact) / se.clamp_min(1e-12)
    assert z.abs().max() < 5.0, z.abs().max()
    assert (z**2).mean() < 1.6, (z**2).mean()  # chi-square/256 dof: mean 1, sd 0.09


@pytest.mark.parametrize("strategy", ["division", "bf16", actpack.ActNN(bits=1)])
def test_activation_alone_is_stored_as_its_region_in_one_bit(strategy):
    # Strategies that cannot keep ReLU zeros exact store what ReLU's own
    # backward reads, the sign pattern, in 1 bit, and nothing else.
    x = torch.randn(8, 4096, requires_grad=True)
    for act in (F.relu, F.leaky_relu, F.relu6, F.hardtanh):
        with actpack.compress(strategy, min_numel=0) as ctx:
            y = act(x * 1)
        assert ctx.stats.compressed_bytes == x.numel() // 8, act
        g = torch.randn_like(y)
        (got,) = torch.autograd.grad(y, x, g)
        y0 = act(x * 1)
        (want,) = torch.autograd.grad(y0, x, g)
        assert torch.equal(got, want), act


_STRATEGIES = {
    "actnn": lambda: actpack.ActNN(seed=0),
    "division": lambda: actpack.Division(seed=0),
    "actnn-mixed": lambda: actpack.ActNNMixed(budget=2.0, seed=0),
}


@pytest.mark.parametrize("strategy", list(_STRATEGIES))
def test_layer_norm_input_ranges_do_not_span_tokens(strategy):
    # One token 1000x smaller than the others (a cls token at init): LayerNorm
    # backward multiplies its input error by that token's 1/std, so a range
    # shared with the other tokens would drown its gradient.
    torch.manual_seed(0)
    x0 = torch.randn(2, 16, 64)
    x0[:, 0] *= 1e-3
    ln = nn.LayerNorm(64)
    r = torch.randn(2, 16, 64)

    def grad(s):
        x = x0.clone().requires_grad_()
        with actpack.compress(s, min_numel=0):
            y = ln(x * 1)
        (y * r).sum().backward()
        return x.grad

    exact = grad("none")
    got = grad(_STRATEGIES[strategy]())
    rel = (got - exact).norm(dim=-1) / exact.norm(dim=-1)  # per token
    # The small token's relative error is that of any other token (per-token
    # ranges), not 1000x larger.
    assert rel[:, 0].max() < 3 * rel[:, 1:].median(), rel[:, 0]


def test_views_made_inside_an_op_are_encoded_once():
    # F.linear on a 3-D input saves a 2-D view it makes itself; q, k and v
    # Linears each make their own.  The view dies at once, but its base (the
    # input) lives on, so the three saves are one tensor: stored once, and the
    # baseline is the same under every strategy.
    torch.manual_seed(0)
    q, k, v = (nn.Linear(64, 64) for _ in range(3))
    x0 = torch.randn(4, 32, 64)

    def stats(strategy):
        x = x0.clone().requires_grad_()
        with actpack.compress(strategy, min_numel=0) as ctx:
            h = x * 1
            out = q(h) + k(h) + v(h)
        out.sum().backward()
        return ctx.stats

    none, actnn = stats("none"), stats("actnn")
    assert actnn.baseline_bytes == none.baseline_bytes
    one_code = actpack.ActNN().encode(x0, actpack.SaveInfo()).nbytes
    assert actnn.compressed_bytes == one_code


@pytest.mark.parametrize("strategy", ["actnn", "actnn-mixed"])
def test_rows_shorter_than_a_group_are_not_padded(strategy):
    # A (tokens, 64) input: one 256-element group per 64-element row would
    # spend 8 bits per element.  Allowed: 2 bits, 32 bits of range per 64
    # elements, and (mixed) a 4-byte row index per row.
    x = torch.randn(512, 64, requires_grad=True)
    lin = nn.Linear(64, 64)
    with actpack.compress(strategy, min_numel=0) as ctx:
        lin(x * 1).sum().backward()
    assert ctx.stats.bits_per_element <= 2 + 32 / 64 + 32 / 64, ctx.stats.bits_per_element


@pytest.mark.parametrize("strategy", ["actnn", "int8", "division"])
@pytest.mark.parametrize("view", ["flatten", "reshape", "view"])
def test_a_view_of_a_saved_tensor_shares_its_code(strategy, view):
    # ReLU saves its output; the Linear after a Flatten saves a view of the
    # same memory with another shape: one code serves both.
    torch.manual_seed(0)
    conv, lin = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8 * 16 * 16, 10)
    x = torch.randn(4, 3, 16, 16)
    flat = {
        "flatten": lambda h: h.flatten(1),
        "reshape": lambda h: h.reshape(4, -1),
        "view": lambda h: h.view(4, -1),
    }[view]
    with actpack.compress(strategy) as ctx:
        out = lin(flat(F.relu(conv(x))))
    by_op = ctx.stats.by_op
    # No new memory for the Linear: its row holds no bytes of its own.
    assert by_op.get("linear", [0, 0]) == [0, 0]
    if strategy == "division":
        # ReLU's own save is its 1-bit region; the Linear needs an unbiased
        # code of the values: one more code, booked to the row holding h.
        assert by_op["relu"][1] > 4 * 8 * 16 * 16 // 8
    out.square().sum().backward()
    assert torch.isfinite(lin.weight.grad).all()
