"""A tensor saved by several ops: every gradient stays unbiased, shared codes stay shared.

One code serves every op that saves a tensor, unless a gradient term could
multiply two reads of it (a self-product: HF's Python RMSNorm, ``(h @ W) *
h``, ``h * h * h``, ``nn.Bilinear(h, h)``, ``exp(h) ** 2`` inside
``Normal.log_prob``, an einsum quadratic form) or the ops read it in different
forms (log_softmax's output: its own backward reads ``exp`` of it, an
entropy term reads the values).  See :mod:`actpack.engine.rereads`.

Unbiasedness is tested with the statistic R of ``unbiased.py`` (~1 for an
unbiased code, growing with K under a bias).  The cases below, before the
fixes, gave R of 2-148 at K = 64.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from unbiased import model_grad, r_statistic

import actpack

D = 64


class Net(nn.Module):
    def __init__(self, form: str) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.form = form
        self.a, self.b = nn.Linear(D, D), nn.Linear(D, D)
        self.w = nn.Parameter(torch.randn(D, D) / D**0.5)
        self.bilinear = nn.Bilinear(D, D, D)

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        if self.form == "python rmsnorm":  # HF Llama/Mistral/Qwen2/T5's norm
            n = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
            return F.mse_loss(self.b(n), target)
        if self.form == "(h @ W) * h":
            return F.mse_loss(self.b((h @ self.w) * h), target)
        if self.form == "h * h * h":
            return F.mse_loss(self.b(h * h * h), target)
        if self.form == "bilinear(h, h)":
            return F.mse_loss(self.bilinear(h, h), target)
        if self.form == "entropy":  # a confidence penalty: -sum p log p
            logp = F.log_softmax(3 * h, -1)
            return (
                F.cross_entropy(self.b(h), target.argmax(-1)) - (logp.exp() * logp).sum(-1).mean()
            )
        if self.form == "soft-target cross-entropy":  # the target keeps its grad
            return F.cross_entropy(3 * h, F.softmax(3 * self.b(x), -1))
        if self.form == "kl_div, log target":
            return F.kl_div(F.log_softmax(3 * h, -1), F.log_softmax(3 * self.b(x), -1),
                            reduction="batchmean", log_target=True)  # fmt: skip
        if self.form == "Normal(mu, exp(h)).log_prob":  # log_prob squares the scale
            dist = torch.distributions.Normal(self.b(x), torch.exp(h / 4))
            return -dist.log_prob(target).mean()
        if self.form == "einsum('bi,ij,bj', h, W, h)":  # a quadratic form: h twice
            return F.mse_loss(torch.einsum("bi,ij,bj->b", h, self.w, h), target[:, 0])
        if self.form == "mul(input=h, other=h @ W)":  # operands by keyword
            return F.mse_loss(self.b(torch.mul(input=h, other=h @ self.w)), target)
        if self.form == "pow(h, 3)":  # pow's backward reads h nonlinearly: h stays exact
            return F.mse_loss(self.b(torch.pow(h, 3)), target)
        if self.form == "tanh(h) * tanh(h)":
            t = torch.tanh(h)
            return F.mse_loss(self.b(t * t), target)
        if self.form == "e * e":  # exp's backward reads e, the product reads it twice
            e = torch.exp(h / 4)
            return F.mse_loss(self.b(e * e), target)
        # A smooth op gating another projection: compiled, its input may be
        # saved and its output recomputed for the other factor's gradient.
        if self.form == "b(x) * tanh(h)":
            return F.mse_loss(self.b(self.b(x) * torch.tanh(h)), target)
        if self.form == "sigmoid(2 h) * b(x)":
            return F.mse_loss(self.b(torch.sigmoid(2 * h) * self.b(x)), target)
        if self.form == "b(x) * gelu(h, tanh)":
            return F.mse_loss(self.b(self.b(x) * F.gelu(h, approximate="tanh")), target)
        if self.form == "b(x) * silu(h)":  # SwiGLU's gate and up projections
            return F.mse_loss(self.b(self.b(x) * F.silu(h)), target)
        if self.form == "b(x) * layer_norm(h)":
            return F.mse_loss(self.b(self.b(x) * F.layer_norm(h, (D,))), target)
        raise AssertionError(self.form)


FORMS = [
    "python rmsnorm", "(h @ W) * h", "h * h * h", "bilinear(h, h)", "entropy",
    "soft-target cross-entropy", "kl_div, log target", "Normal(mu, exp(h)).log_prob",
    "einsum('bi,ij,bj', h, W, h)", "mul(input=h, other=h @ W)", "tanh(h) * tanh(h)", "e * e",
]  # fmt: skip
STRATEGIES = {"actnn": actpack.ActNN, "actnn-rows": actpack.RowActNN, "int8": actpack.Int8}


def _inputs():
    gen = torch.Generator().manual_seed(0)
    # Rows of different scales: the codes' ranges, and their noise, differ.
    x = torch.randn(256, D, generator=gen) * torch.rand(256, 1, generator=gen) * 3
    return x, torch.randn(256, D, generator=gen)


@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("form", FORMS)
def test_every_reader_gets_an_unbiased_gradient(form, strategy):
    model, inputs = Net(form), _inputs()
    exact = model_grad(model, inputs, None)
    draws = torch.stack(
        [model_grad(model, inputs, STRATEGIES[strategy](seed=s)) for s in range(64)]
    )
    r = r_statistic(draws, exact)
    assert r < 2.0, f"{form} under {strategy}: R = {r:.2f} (1 if unbiased)"


def test_independent_readers_share_one_code():
    """q/k/v projections of one input, a ReLU output read by max-pool and
    by a product with a weight, a residual read twice: one code each, as
    many bytes as one save."""

    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.k, self.v = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
            self.a, self.w = nn.Linear(D, D), nn.Parameter(torch.randn(D))

        def forward(self, x):
            h = torch.relu(self.a(x))
            q, k, v = self.q(h), self.k(h), self.v(h)
            pooled = F.max_pool1d(h.unsqueeze(1), 2).squeeze(1)
            return (q * k).sum() + v.sum() + (h * self.w).sum() + pooled.sum()

    with actpack.compress("actnn", min_numel=1) as ctx:
        Shared()(torch.randn(512, D)).backward()
    by_op = ctx.stats.by_op
    relu = by_op["relu"][1]  # the code of h
    assert relu > 0
    assert by_op["linear"][1] == 0  # q, k and v read relu's code of h
    assert by_op["mul"][1] == 2 * relu  # codes of q and k; h * w reads the code of h
    assert by_op["max_pool1d"][1] < relu  # its indices only


def test_a_self_product_gets_a_second_code_of_the_same_size():
    """The second save of a self-product is counted at its own bytes:
    nothing is hidden from the accounting."""
    x = torch.randn(512, D)
    with actpack.compress("actnn") as ctx:
        h = nn.Linear(D, D)(x)
        (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).sum().backward()
    # The same storage as pow's save: no new memory without actpack, and the
    # second code is booked to the row holding that storage, pow's.
    assert ctx.stats.by_op.get("mul", [0, 0]) == [0, 0]
    with actpack.compress("actnn") as one:
        nn.Linear(D, D)(x).pow(2).mean(-1).sum().backward()
    single = one.stats.by_op["square"][1]
    assert single > 0 and ctx.stats.by_op["square"][1] == 2 * single  # as large as pow's


@pytest.mark.parametrize("form", ["cross_entropy", "nll_loss(log_softmax)"])
def test_nll_loss_reads_no_values_and_shares_the_code(form):
    """nll_loss saves its input only for its shape: it shares log_softmax's
    code (one code for the log-probabilities, as without this rule), and
    the gradient is the exact one's mean."""
    h0, y = torch.randn(256, 512) * 3, torch.randint(0, 512, (256,))

    def loss(h):
        if form == "cross_entropy":
            return F.cross_entropy(h, y)
        return F.nll_loss(F.log_softmax(h, -1), y)

    h = h0.clone().requires_grad_()
    loss(h * 1).backward()
    exact = h.grad.double()
    draws = []
    for seed in range(64):
        h = h0.clone().requires_grad_()
        with actpack.compress(actpack.ActNN(seed=seed)) as ctx:
            out = loss(h * 1)
        out.backward()
        draws.append(h.grad.double())
    coded = sum(after for _, after in ctx.stats.by_op.values())
    # One 2-bit code of the 256 x 512 log-probabilities (bf16 range pairs per
    # group of 256: 2.125 bits an element), the targets at most 8 bytes each,
    # and nll_loss's scalar total weight; two codes would be twice the first.
    assert coded <= 256 * 512 * 2.125 / 8 + 256 * 8 + 4
    r = r_statistic(torch.stack(draws), exact)
    assert r < 2.0, r
