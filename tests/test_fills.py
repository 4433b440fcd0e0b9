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
Fills the first rule missed (``F.pad``, ``scatter``, ``fill_diagonal_``,
``pad_sequence``, in-place fills through a view or ``.data``, the log of an
action mask) gave R = 130-200 at K = 32 under ``actnn-rows``; a ``-inf`` no
fill op wrote made a smooth op's coded input decode NaN.  Unbiasedness is
tested with the statistic R of ``unbiased.py`` (~1 for an unbiased code,
growing with K under a bias).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Categorical
from unbiased import model_grad, r_statistic

import actpack
from actpack.engine.fills import FILL_REASON

D, A = 64, 256


#: Made before the forward (a module constant): a fill only a read of it tells.
NEG = torch.tensor(-1e9)


def _pad_rows(logits, valid):
    rows = [r[: A - 8 * (i % 8)] for i, r in enumerate(logits)]  # variable-length action sets
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=-1e9)


def _slice_filled(logits, valid):
    masked = logits.clone()
    masked[:, : A // 4].fill_(-1e9)  # an in-place fill of a view: the view dies at once
    return masked


def _flat_masked_fill_(logits, valid):
    masked = logits.clone()
    masked.view(-1).masked_fill_(~valid.view(-1), -1e9)
    return masked


def _data_setitem(logits, valid):
    masked = logits.clone()
    masked.data[~valid] = -1e9
    return masked


def _view_of_view(logits, valid):
    flat = logits.clone().view(-1)
    masked = flat.view(logits.shape)  # its _base is flat's base, not flat
    flat.view(-1, A // 4)[:, 0].fill_(float("-inf"))
    return masked


def _diagonal(logits, valid):
    masked = logits.clone()
    masked.fill_diagonal_(float("-inf"))  # every row of the first A: one -inf a group
    return masked


# Fills written by ops the first rule missed (F.pad, scatter, index_put_ of a
# constant made before the forward, fill_diagonal_, pad_sequence, a sum with
# an extreme scalar or alpha, a one-element tensor that is not 0-dim), in
# place through a view or an alias (the tag went to the temporary view, not
# the tensor read next), and a -inf from the log of a constant (RLlib's action
# mask: no fill op at all).  Each gave R = 115-180 at K = 32 under actnn.
FLOAT_MIN = torch.finfo(torch.float32).min
MORE_FORMS = {
    "pad(value=-1e9)": lambda z, v: F.pad(z[:, : A - 64], (0, 64), value=-1e9),
    "scatter(value=-1e9)": lambda z, v: z.scatter(1, torch.arange(0, A, 3).expand(128, -1), -1e9),
    "index_put_(constant tensor)": lambda z, v: z.clone().index_put_((~v,), NEG),
    "fill_diagonal_(-inf)": _diagonal,
    "pad_sequence(padding_value=-1e9)": _pad_rows,
    "where(valid, logits, zeros - 1e9)": lambda z, v: torch.where(v, z, torch.zeros_like(z) - 1e9),
    "add(1 - valid, alpha=-1e9)": lambda z, v: z.add(1 - v.float(), alpha=-1e9),
    "where(valid, logits, tensor([-1e8]))": lambda z, v: torch.where(v, z, torch.tensor([-1e8])),
    "logits[:, :k].fill_(-1e9)": _slice_filled,
    "view(-1).masked_fill_(-1e9)": _flat_masked_fill_,
    "logits.data[~valid] = -1e9": _data_setitem,
    "a view of a view filled with -inf": _view_of_view,
    "clamp(log(mask), FLOAT_MIN) (RLlib)": lambda z, v: z + torch.log(v.float()).clamp(FLOAT_MIN),
    "logits + log(mask)": lambda z, v: z + v.float().log(),
    "logits + log10(mask)": lambda z, v: z + torch.log10(v.double()).float(),
}  # fmt: skip


class Policy(nn.Module):
    """Logits over A actions, some of them invalid, in the forms RL code masks them."""

    def __init__(self, form: str) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.form = form
        self.body, self.head = nn.Linear(D, D), nn.Linear(D, A)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        # ReLU: its output is coded for the head (values) and held as a 1-bit
        # region for itself; an exact tanh output would serve the head exact.
        logits = self.head(torch.relu(self.body(x)))
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
            masked = MORE_FORMS[form](logits, valid)
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


def _check_unbiased(form: str, strategy: str) -> None:
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


@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("form", FORMS)
def test_masked_policy_gradients_are_unbiased(form, strategy):
    _check_unbiased(form, strategy)


@pytest.mark.parametrize("strategy", ["actnn-rows", "int8"])
@pytest.mark.parametrize("form", list(MORE_FORMS))
def test_more_fill_forms_are_unbiased(form, strategy):
    _check_unbiased(form, strategy)


@pytest.mark.parametrize(
    "form", ["logits[:, :k].fill_(-1e9)", "logits.data[~valid] = -1e9", "logits + log(mask)"]
)
def test_more_fill_forms_are_kept(form):
    model, (x, valid) = Policy(form), _inputs()
    with actpack.compress("actnn") as ctx:
        model(x, valid).backward()
    assert ctx.stats.passthrough.get(FILL_REASON, 0) >= 128 * A * 4


@pytest.mark.parametrize("strategy", ["actnn", "int8"])
@pytest.mark.parametrize(
    "form",
    ["softplus(-(h + log(mask)))", "softplus(h + log2(mask))", "softplus(-pad(h, -inf))"],
)  # fmt: skip
def test_a_minus_inf_no_fill_op_wrote_gives_finite_gradients(form, strategy):
    """A group code of a tensor holding -inf decodes its group's finite
    values to NaN: a smooth op's coded input (``smooth="code"``) made the
    gradient NaN where the exact one is finite."""
    torch.manual_seed(3)
    lin = nn.Linear(D, A)
    x, valid = _inputs()

    def loss():
        h = lin(x)
        if form == "softplus(-(h + log(mask)))":
            return (-F.softplus(-(h + valid.float().log()))).exp().sum()
        if form == "softplus(h + log2(mask))":
            return F.softplus(h + torch.log2(valid.float())).square().sum()
        return (-F.softplus(-F.pad(h[:, :-16], (0, 16), value=float("-inf")))).exp().sum()

    loss().backward()
    exact, lin.weight.grad = lin.weight.grad, None
    assert torch.isfinite(exact).all()
    with actpack.compress(STRATEGIES[strategy](seed=0)):
        coded = loss()
    coded.backward()
    assert torch.isfinite(lin.weight.grad).all(), f"{form} under {strategy}: NaN gradient"


@pytest.mark.parametrize("form", FORMS)
def test_the_masked_save_is_kept_and_reported(form):
    model, (x, valid) = Policy(form), _inputs()
    with actpack.compress("actnn") as ctx:
        model(x, valid).backward()
    kept = ctx.stats.passthrough.get(FILL_REASON, 0)
    assert kept >= 128 * A * 4  # at least the masked log-probabilities, exact
    relu = ctx.stats.by_op["relu"]
    assert 0 < relu[1] < relu[0] / 8  # the layers before the mask stay coded


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


def _timestep_embedding(t: torch.Tensor, dim: int = D) -> torch.Tensor:
    """diffusers' / DiT's sinusoidal embedding of a timestep."""
    freqs = torch.exp(-math.log(10000) * torch.arange(dim // 2, dtype=torch.float32) / (dim // 2))
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class Denoiser(nn.Module):
    """A DiT-style block conditioned on a timestep embedded from ``sigma``."""

    def __init__(self, form: str) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.form = form
        self.t = nn.Sequential(nn.Linear(D, D), nn.SiLU(), nn.Linear(D, 2 * D))
        self.block = nn.TransformerEncoderLayer(D, 4, 4 * D, 0.0, batch_first=True)
        self.out = nn.Linear(D, D)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if self.form == "sigma * 1000":  # Flux, SD3: timestep = sigma * 1000
            temb = _timestep_embedding(sigma * 1000)
        elif self.form == "full(1000.0) * sigma":
            temb = _timestep_embedding(torch.full_like(sigma, 1000.0) * sigma)
        elif self.form == "10000 ** (-k / d) from log(tensor(1e4))":  # a positional encoding
            k = torch.arange(D // 2, dtype=torch.float32)
            freqs = torch.exp(k * (-torch.log(torch.tensor(10000.0)) / (D // 2)))
            args = (sigma * 50)[:, None] * freqs[None]
            temb = torch.cat([torch.sin(args), torch.cos(args)], -1)
        elif self.form == "log of positive features":  # log-mel style, computed in the forward
            temb = _timestep_embedding(torch.log(sigma.clamp(min=1e-10)))
        else:
            temb = _timestep_embedding(sigma)
        shift, scale = self.t(temb).chunk(2, -1)
        h = self.block(x * (1 + scale[:, None]) + shift[:, None])
        return F.gelu(self.out(h)).square().mean()


@pytest.mark.parametrize(
    "form",
    ["sigma * 1000", "full(1000.0) * sigma", "10000 ** (-k / d) from log(tensor(1e4))",
     "log of positive features"],
)  # fmt: skip
def test_a_scaled_timestep_ends_at_its_sinusoidal_embedding(form):
    """sin and cos are bounded: an extreme constant scaling a timestep (or a
    frequency) never reaches the network.  Before, ``sigma * 1000`` tagged
    the whole denoiser (compression 4.7x -> 1.3x on a small DiT)."""
    x, sigma = torch.randn(4, 32, D), torch.rand(4)
    coded = {}
    for f in (form, "plain"):
        with actpack.compress("actnn") as ctx:
            Denoiser(f)(x, sigma).backward()
        assert FILL_REASON not in ctx.stats.passthrough
        coded[f] = ctx.stats.by_op
    for op in ("linear", "gelu"):
        assert coded[form][op] == coded["plain"][op]


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


class _Bf16(nn.Module):
    """``Policy`` in bfloat16: under CPU autocast (fp32 weights, bf16 linears)
    or with bf16 weights and inputs; the loss in float32."""

    def __init__(self, form: str, mode: str) -> None:
        super().__init__()
        self.policy, self.mode = Policy(form), mode
        if mode == "bf16 weights":
            self.policy.to(torch.bfloat16)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        if self.mode == "bf16 weights":
            return self.policy(x.bfloat16(), valid).float()
        with torch.autocast("cpu", torch.bfloat16):
            return self.policy(x, valid).float()


@pytest.mark.parametrize("mode", ["bf16 autocast", "bf16 weights"])
@pytest.mark.parametrize("form", ["where(valid, logits, tensor(-1e8))", "masked_fill(-1e9)"])
def test_bf16_masked_policy_keeps_the_fill_exact(form, mode):
    """The tags survive autocast's casts and bf16 tensors: the masked
    log-probabilities stay exact and the gradient's mean is the exact one's."""
    model, inputs = _Bf16(form, mode), _inputs()
    with actpack.compress("actnn") as ctx:
        model(*inputs).backward()
    assert ctx.stats.passthrough.get(FILL_REASON, 0) >= 128 * A * 2  # bf16 or wider, exact
    exact = model_grad(model, inputs, None)
    assert torch.isfinite(exact).all()
    draws = torch.stack([model_grad(model, inputs, actpack.ActNN(seed=s)) for s in range(64)])
    r = r_statistic(draws, exact)
    assert r < 2.0, f"{form} under {mode}: R = {r:.2f} (1 if unbiased)"


# --------------------------------------------------------------------------- #
# Compiled graphs: the same threshold, and the tracker out of Dynamo's way
# --------------------------------------------------------------------------- #


def _masked(h, valid, form, fill):
    if form == "where":
        return torch.where(valid, h, fill)
    if form == "masked_fill":
        return h.masked_fill(~valid, fill)
    if form == "additive":  # (1 - mask) * fill added: HF's extended attention mask
        return h + (1.0 - valid.float()) * fill
    raise ValueError(form)


class MaskedMLP(nn.Module):
    """A masked hidden layer read by a Linear: its weight's gradient needs the
    masked tensor itself, so the partitioner saves it (not the mask)."""

    def __init__(self, form: str, fill: float):
        super().__init__()
        self.form, self.fill = form, fill
        self.lin0, self.lin1, self.lin2 = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)

    def forward(self, x, valid):
        h = self.lin1(torch.relu(self.lin0(x)))
        return self.lin2(_masked(h, valid, self.form, self.fill)).clamp(min=-50).square().mean()


def _compiled_decisions(form, fill, backend, strategy="actnn"):
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = MaskedMLP(form, fill)
    x, valid = torch.randn(32, D), torch.rand(32, D) > 0.3
    engine = actpack.compress(strategy, min_numel=0)
    torch._dynamo.utils.counters.clear()
    # No on-disk AOTAutograd cache: a hit would skip the hooks' decisions.
    with torch._functorch.config.patch(enable_autograd_cache=False), engine:
        torch.compile(model, backend=backend)(x, valid).backward()
    breaks = dict(torch._dynamo.utils.counters["graph_break"])
    return list(engine._graph_hooks.decisions.values()), breaks


def _masked_save(decisions, form):
    producers = {"where": {"where"}, "masked_fill": {"where", "masked_fill"}, "additive": {"add"}}
    found = [d for d in decisions if d.producer in producers[form] and d.op == "linear"]
    assert len(found) == 1, decisions
    return found[0]


@pytest.mark.parametrize("fill", [-1e4, -1e9, torch.finfo(torch.float32).min])
@pytest.mark.parametrize("form", ["where", "masked_fill", "additive"])
def test_compiled_saves_holding_a_fill_stay_exact(form, fill):
    """The compiled walk keeps fills of magnitude >= fills.EXTREME_FILL exact,
    as eager mode does (it took only >= 1e30 before: a -1e4 or -1e9 fill was
    coded in compiled graphs and kept exact in eager ones)."""
    decisions, breaks = _compiled_decisions(form, fill, "aot_eager")
    save = _masked_save(decisions, form)
    assert save.form == "exact" and "fill" in save.reason, save
    assert not breaks


@pytest.mark.parametrize("form", ["where", "masked_fill", "additive"])
def test_compiled_fills_within_the_data_range_stay_coded(form):
    save = _masked_save(_compiled_decisions(form, -100.0, "aot_eager")[0], form)
    assert save.form != "exact", save


@pytest.mark.parametrize("strategy", ["actnn", "division", "int8"])
def test_compress_around_a_compiled_masked_model_compiles_it(strategy):
    """``with compress(): compiled(x)`` on a model with an extreme fill: one
    graph, decided by the compiled engine.  The eager tracker's fill tags are
    skipped while Dynamo traces: traced, their id() of containers made Dynamo
    abandon the frame and run the whole model eagerly (no decisions at all)."""
    decisions, breaks = _compiled_decisions("where", -1e9, "inductor", strategy)
    assert decisions and not breaks
    assert _masked_save(decisions, "where").form == "exact"


class Reshaped(nn.Module):
    """Sizes, dims and slice bounds >= 1e3 in the graph are not fills."""

    def __init__(self, int_fill: int | None = None):
        super().__init__()
        self.int_fill = int_fill
        self.lin0, self.lin1 = nn.Linear(D, 2048), nn.Linear(1024, D)

    def forward(self, x, valid):
        h = torch.relu(self.lin0(x)).view(-1, 1024)[:, :1000]
        h = torch.cat([h, h[:, :24]], dim=1)
        if self.int_fill is not None:
            h = torch.where(valid.repeat(2, 16), h, self.int_fill)
        return self.lin1(h).square().mean()


@pytest.mark.parametrize("int_fill", [None, -10000])
def test_compiled_sizes_are_not_fills_but_int_values_are(int_fill):
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = Reshaped(int_fill)
    x, valid = torch.randn(32, D), torch.rand(32, D) > 0.3
    engine = actpack.compress("actnn", min_numel=0)
    with torch._functorch.config.patch(enable_autograd_cache=False), engine:
        torch.compile(model, backend="aot_eager")(x, valid).backward()
    saves = [d for d in engine._graph_hooks.decisions.values() if d.op == "linear"]
    read_by_lin1 = [d for d in saves if d.producer in ("cat", "where")]
    assert len(read_by_lin1) == 1, saves
    if int_fill is None:  # view(-1, 1024), [:, :1000] and cat's sizes: coded
        assert read_by_lin1[0].form != "exact", read_by_lin1
    else:
        assert read_by_lin1[0].form == "exact" and "fill" in read_by_lin1[0].reason


_SCALINGS = {
    "mul": lambda h: h * 1000.0,
    "rmul": lambda h: -1e4 * h,
    "mul_": lambda h: h.clone().mul_(2e3),
    "torch.mul": lambda h: torch.mul(h, 1e3),
}


class _Scaled(nn.Module):
    def __init__(self, scale) -> None:
        super().__init__()
        self.scale = scale
        self.conv = nn.Conv2d(3, 8, 3)
        self.rest = nn.Sequential(nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))

    def forward(self, x):
        return self.rest(self.scale(self.conv(x)))


@pytest.mark.parametrize("form", sorted(_SCALINGS))
def test_a_scaled_activation_taken_as_a_fill_warns_once(form):
    """A product of an activation by a scalar >= 1e3 is tagged like a soft
    mask's fill: what follows stays exact, and that is said once (it used to
    switch compression off for the rest of a CNN without a word)."""
    model = _Scaled(_SCALINGS[form])
    x = torch.randn(4, 3, 12, 12)
    engine = actpack.compress("division", min_numel=1)
    with pytest.warns(UserWarning, match="taken as a mask's fill") as record:
        for _ in range(2):  # once per engine
            with engine:
                model(x).square().sum().backward()
    assert sum("mask's fill" in str(w.message) for w in record) == 1
    assert engine.stats.passthrough.get(FILL_REASON, 0) > 0


@pytest.mark.parametrize("scale", [lambda h: h * 999.0, lambda h: h / 1e-3 * 0 + h])
def test_smaller_scalings_neither_warn_nor_stay_exact(scale, recwarn):
    model = _Scaled(scale)
    with actpack.compress("division", min_numel=1) as ctx:
        model(torch.randn(4, 3, 12, 12)).square().sum().backward()
    assert not [w for w in recwarn if "mask's fill" in str(w.message)]
    assert ctx.stats.passthrough.get(FILL_REASON, 0) == 0


def test_a_mask_times_an_extreme_scalar_is_a_fill_without_a_warning(recwarn):
    """``(1 - mask) * -1e9`` (no autograd history): a fill, as before, and
    not the scaling the warning is about."""

    class Additive(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(16, 16)

        def forward(self, x, valid):
            bias = (1.0 - valid.float()) * -1e9
            return (self.lin(x) + bias).log_softmax(-1)

    model = Additive()
    valid = torch.rand(8, 16) > 0.3
    with actpack.compress("actnn", min_numel=1) as ctx:
        out = model(torch.randn(8, 16), valid)
        (out.exp() * out).sum().backward()
    assert not [w for w in recwarn if "mask's fill" in str(w.message)]
    assert ctx.stats.passthrough.get(FILL_REASON, 0) > 0


def test_a_scaled_loss_saves_nothing_and_does_not_warn(recwarn):
    """Static loss scaling (``loss * 1024.0``, DeepSpeed's and apex's) is a
    product by an extreme scalar whose result no op saves: no warning."""
    model = _Scaled(lambda h: h)
    with actpack.compress("division", min_numel=1) as ctx:
        scaled = model(torch.randn(4, 3, 12, 12)).square().sum() * 1024.0
    scaled.backward()
    assert not [w for w in recwarn if "mask's fill" in str(w.message)]
    assert ctx.stats.passthrough.get(FILL_REASON, 0) == 0


def test_the_warning_never_replaces_the_users_exception():
    model = _Scaled(_SCALINGS["mul"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(KeyError, match="the user's"):
            with actpack.compress("division", min_numel=1):
                model(torch.randn(4, 3, 12, 12))
                raise KeyError("the user's")
