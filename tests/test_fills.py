"""Saves holding a mask's extreme fill stay exact in eager mode; the mask's
other users keep their codes.

A group code of a tensor holding ``-1e8`` (or ``finfo.min``, ``-inf`` behind a
clamp) decodes every other value of its group at the fill's scale.  A masked
policy's entropy (``Categorical(logits=...).entropy()`` saves the masked
log-probabilities for ``p * logp``) had, before the rule of
:mod:`actpack.engine.fills`, a bias as large as its gradient (every valid
value of a group decoded to the group's maximum: R = 230-260 at K = 64 under
``actnn`` and ``actnn-rows`` with a ``-1e9`` fill, 1.9e6 under ``int8``), or
with a ``-1e4`` fill, unbiased noise 85-96x the gradient's norm per draw.
Unbiasedness is tested with the statistic R of ``unbiased.py`` (~1 for an
unbiased code, growing with K under a bias).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Categorical
from unbiased import model_grad, r_statistic

import actpack
from actpack.engine.fills import FILL_REASON

D, A = 64, 256


class Policy(nn.Module):
    """Logits over A actions, some of them invalid, in the forms RL code masks them."""

    def __init__(self, form: str) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.form = form
        self.body, self.head = nn.Linear(D, D), nn.Linear(D, A)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        logits = self.head(torch.tanh(self.body(x)))
        form = self.form
        if form == "where(valid, logits, tensor(-1e8))":  # CleanRL's invalid-action masking
            masked = torch.where(valid, logits, torch.tensor(-1e8))
        elif form == "masked_fill(-1e9)":
            masked = logits.masked_fill(~valid, -1e9)
        elif form == "logits[~valid] = finfo.min":
            masked = logits.clone()
            masked[~valid] = torch.finfo(logits.dtype).min
        elif form == "masked_fill(-inf)":  # Categorical clamps -inf to finfo.min
            masked = logits.masked_fill(~valid, float("-inf"))
        elif form == "logits + (1 - valid) * -1e4":  # an additive mask
            masked = logits + (1 - valid.float()) * -1e4
        elif form == "where(valid, logits, full_like(-1e8))":
            masked = torch.where(valid, logits, torch.full_like(logits, -1e8))
        else:
            raise AssertionError(form)
        dist = Categorical(logits=masked)
        return -dist.entropy().mean()  # an entropy bonus, alone: its gradient is the test


FORMS = [
    "where(valid, logits, tensor(-1e8))", "masked_fill(-1e9)", "logits[~valid] = finfo.min",
    "masked_fill(-inf)", "logits + (1 - valid) * -1e4", "where(valid, logits, full_like(-1e8))",
]  # fmt: skip
STRATEGIES = {"actnn": actpack.ActNN, "actnn-rows": actpack.RowActNN, "int8": actpack.Int8}


def _inputs():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(128, D, generator=gen), torch.rand(128, A, generator=gen) < 0.5


@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("form", FORMS)
def test_masked_policy_gradients_are_unbiased(form, strategy):
    model, inputs = Policy(form), _inputs()
    exact = model_grad(model, inputs, None)
    assert torch.isfinite(exact).all()
    draws = torch.stack(
        [model_grad(model, inputs, STRATEGIES[strategy](seed=s)) for s in range(64)]
    )
    r = r_statistic(draws, exact)
    assert r < 2.0, f"{form} under {strategy}: R = {r:.2f} (1 if unbiased)"
    # Unbiased is not enough: a -1e4 mask gave R ~ 1 with one draw's error
    # 85-96x the gradient's norm.  Coded without the fill, one draw errs by
    # 0.5-0.6x under 2-bit codes (0.006x under int8): bound it at 2x.
    noise = (draws.var(0).sum() / exact.square().sum()).sqrt().item()
    assert noise < 2.0, f"{form} under {strategy}: one draw errs by {noise:.1f}x the gradient"


@pytest.mark.parametrize("form", FORMS)
def test_the_masked_save_is_kept_and_reported(form):
    model, (x, valid) = Policy(form), _inputs()
    with actpack.compress("actnn") as ctx:
        model(x, valid).backward()
    kept = ctx.stats.passthrough.get(FILL_REASON, 0)
    assert kept >= 128 * A * 4  # at least the masked log-probabilities, exact
    tanh = ctx.stats.by_op["tanh"]
    assert 0 < tanh[1] < tanh[0] / 8  # the layers before the mask stay coded


class MaskedAttention(nn.Module):
    """Attention written out, with the masks of HF's eager attention."""

    def __init__(self, mask: str) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.mask = mask
        self.qkv, self.out, self.mlp = nn.Linear(D, 3 * D), nn.Linear(D, D), nn.Linear(D, 4 * D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, -1)
        scores = q @ k.transpose(-1, -2) / D**0.5
        n = x.shape[-2]
        causal = torch.ones(n, n, dtype=torch.bool).triu(1)
        if self.mask == "masked_fill(-inf)":
            scores = scores.masked_fill(causal, float("-inf"))
        elif self.mask == "where(causal, finfo.min)":  # HF GPT-2
            floor = torch.full([], torch.finfo(scores.dtype).min)
            scores = torch.where(~causal, scores, floor)
        elif self.mask == "additive finfo.min mask":  # HF Llama/BERT
            scores = scores + causal.float() * torch.finfo(scores.dtype).min
        elif self.mask == "sdpa(attn_mask=-inf mask)":
            bias = torch.zeros(n, n).masked_fill(causal, float("-inf"))
            h = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
            return F.gelu(self.mlp(self.out(h) + x)).sum()
        elif self.mask != "none":
            raise AssertionError(self.mask)
        h = torch.softmax(scores, -1) @ v
        return F.gelu(self.mlp(self.out(h) + x)).sum()


@pytest.mark.parametrize(
    "mask",
    ["masked_fill(-inf)", "where(causal, finfo.min)", "additive finfo.min mask",
     "sdpa(attn_mask=-inf mask)"],
)  # fmt: skip
def test_an_attention_mask_ends_at_softmax(mask):
    """The mask's fill never reaches what softmax (or fused attention)
    returns: every save after it is coded as without a mask."""
    x = torch.randn(4, 32, D)
    coded = {}
    for form in (mask, "none"):
        with actpack.compress("actnn") as ctx:
            MaskedAttention(form)(x).backward()
        assert FILL_REASON not in ctx.stats.passthrough
        coded[form] = ctx.stats.by_op
    for op in ("linear", "gelu"):
        assert coded[mask][op] == coded["none"][op]


@pytest.mark.parametrize("fill", [0.0, -5.0, 1.0])
def test_fills_within_the_data_range_stay_coded(fill):
    model, (x, valid) = Policy("masked_fill(-1e9)"), _inputs()
    with actpack.compress("actnn") as ctx:
        logits = model.head(torch.tanh(model.body(x))).masked_fill(~valid, fill)
        (logits.log_softmax(-1) * logits).sum().backward()
    assert FILL_REASON not in ctx.stats.passthrough
    assert ctx.stats.by_op["mul"][1] < ctx.stats.by_op["mul"][0] / 4  # coded


def test_tags_hold_no_tensor_alive():
    """A tagged tensor dropped inside the forward is freed at once (tags are
    weak references, kept by the forward's op tracker only)."""
    import weakref

    x, valid = _inputs()
    head = nn.Linear(D, A)
    with actpack.compress("actnn"):
        masked = head(x).masked_fill(~valid, -1e9)
        ref = weakref.ref(masked)
        del masked
        assert ref() is None
