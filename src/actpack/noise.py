"""Gradient bias and variance that compression adds, measured against autograd."""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn

from actpack.engine import DEFAULT_MIN_NUMEL, Engine
from actpack.probe import (
    buffer_restorer,
    compile_wrappers,
    default_loss,
    eager_behind,
    eager_calls,
    preserved_rng,
)
from actpack.strategies import DEFAULT_STRATEGY, Exact, Strategy, resolve
from actpack.strategies.actnn import as_int
from actpack.strategies.seeds import check_seed, derived_seed

__all__ = ["NoiseReport", "gradient_noise"]


def _ratio(x: float, norm: float) -> float:
    if norm > 0:
        return x / norm
    return 0.0 if x == 0 else math.inf


@dataclass
class NoiseReport:
    """Relative gradient bias and variance of a strategy; see :func:`gradient_noise`.

    ``bias`` and ``variance`` are over all parameters together; ``layers``
    maps each module (the prefix of its parameters' names) and ``params``
    each parameter to its own ``(bias, variance)``, normalised by its own
    exact squared gradient norm.
    """

    strategy: str
    draws: int
    bias: float
    variance: float
    exact_norm_sq: float
    layers: dict[str, tuple[float, float]] = field(default_factory=dict)
    params: dict[str, tuple[float, float]] = field(default_factory=dict)

    @property
    def error(self) -> float:
        """Mean relative squared error of one draw: ``bias + variance``."""
        return self.bias + self.variance

    @property
    def bias_corrected(self) -> float:
        """``bias`` minus the part the draws' own noise explains (``variance / (draws - 1)``).

        ``E[bias] = b + sigma2 / draws`` and ``E[variance] = sigma2 (draws - 1) / draws``
        for a true relative bias ``b`` and per-draw variance ``sigma2``.  NaN for
        one draw (``bias`` is then that draw's error, ``variance`` 0).
        """
        if self.draws < 2:
            return math.nan  # one draw: its noise and a bias cannot be told apart
        return max(0.0, self.bias - self.variance / (self.draws - 1))

    def __str__(self) -> str:
        if self.draws < 2:
            # bias holds the one draw's whole error and variance is 0 by
            # construction: printed as bias and variance they read as "biased".
            return (
                f"{self.strategy}: relative squared error of one draw {self.bias:.3g} "
                f"(relative to ||g||^2 = {self.exact_norm_sq:.3g}; bias and variance need "
                "draws >= 2)"
            )
        return (
            f"{self.strategy}: gradient bias {self.bias:.3g}, variance {self.variance:.3g} "
            f"(relative to ||g||^2 = {self.exact_norm_sq:.3g}, {self.draws} draws)"
        )


def _fork(strategy: Strategy, seed: int) -> Strategy:
    fork = getattr(strategy, "fork", None)
    if callable(fork):
        return fork(seed)
    new = copy.deepcopy(strategy)
    state = dict(strategy.state_dict())
    state["seed"] = seed
    state["rng"] = {}  # a new stream from the new seed, not the strategy's state
    new.load_state_dict(state)
    return new


class _Null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _eager_model(model: nn.Module) -> nn.Module:
    """The module whose draws differ: the eager module behind a compiled one.

    Every pass runs under one torch random state (the same dropout masks),
    and codes inside compiled graphs draw their rounding noise from that
    same default generator (:mod:`actpack.codecs.counter_noise`), so their
    draws would all be equal: a variance of 0, the whole error reported as
    bias.  A compiled model is measured through its eager module (its
    strategies keep their own generators); ``torch.compile`` wrappers inside
    a model cannot be set aside, so they are refused (modules compiled in
    place are run eagerly: :func:`actpack.probe.eager_calls`).
    """
    inner = eager_behind(model)
    if inner is not None:
        warnings.warn(
            "gradient_noise: the model is compiled; measuring its eager module "
            "(model._orig_mod), whose codes draw fresh rounding noise in every draw "
            "(compiled codes take theirs from torch's default generator, which every "
            "draw re-seeds to keep dropout masks equal)",
            stacklevel=3,
        )
        return _eager_model(inner)
    compiled = compile_wrappers(model)
    if not compiled:
        return model
    raise ValueError(
        f"gradient_noise: {len(compiled)} submodule(s) of the model are compiled; their "
        "codes take rounding noise from torch's default generator, which every draw "
        "re-seeds (to keep dropout masks equal), so their draws would repeat and the "
        "variance read 0. Measure the model before compiling its blocks."
    )


def gradient_noise(
    model: nn.Module,
    *inputs: Any,
    strategy: str | Strategy | None = None,
    draws: int = 8,
    loss_fn: Callable[[Any], Tensor] | None = None,
    seed: int = 0,
    min_numel: int = DEFAULT_MIN_NUMEL,
    track_modules: bool = False,
    kwargs: Mapping[str, Any] | None = None,
) -> NoiseReport:
    """Measure the gradient bias and variance ``strategy`` adds on one batch
    (``model(*inputs, **kwargs)``; ``kwargs``: keyword inputs, e.g. a Hugging
    Face batch).

    ``strategy``: by default the strategy of a model wrapped with
    :func:`actpack.wrap` (another one given here runs in its place for the
    measurement), else :data:`actpack.DEFAULT_STRATEGY`.

    Runs one uncompressed forward and backward (plain autograd) for the
    exact gradient ``g``, then ``draws`` compressed ones giving ``g_1..g_D``,
    draw ``d`` with a copy of ``strategy`` seeded ``strategy.seed + 1 + d``
    (a stateful strategy such as :class:`~actpack.ActNNMixed` is copied with
    its statistics, so every draw uses the same bit allocation and the
    original is left untouched).  With ``m = mean_d g_d``:

    * ``bias = ||m - g||^2 / ||g||^2``
    * ``variance = (1/D) sum_d ||g_d - m||^2 / ||g||^2``

    i.e. ActNN's ``get_var`` quantities (``||E[g_d] - g||^2`` and
    ``sum E[g_d^2] - E[g_d]^2``) divided by the exact squared gradient norm;
    ActNN's code sums them, unnormalised, over conv/linear weights and
    averages over batches.  ``bias`` also holds ``variance / (D - 1)`` of pure
    sampling noise (see :attr:`NoiseReport.bias_corrected`).  Sums run over
    every parameter that requires grad; per-parameter and per-module figures
    are normalised by their own exact norms.

    The model is not modified: its buffers (BatchNorm running statistics) are
    restored before every pass and at the end, ``.grad`` is not touched, and
    every pass runs with the same torch random state (same dropout masks).
    ``loss_fn(output)`` gives the scalar loss (default: the ``.loss`` of a
    HuggingFace output, else the sum of the outputs; see
    :func:`actpack.probe.default_loss`).
    ``seed``: the torch random seed every pass runs under (the same dropout
    masks, random inputs drawn inside the model, in every pass); an integer
    (also a NumPy integer or a 0-d integer tensor) in [-2**63, 2**64), as
    ``torch.manual_seed`` takes.  The draws' rounding noise comes from the
    strategy's own ``seed`` (draw ``d``: ``strategy.seed + 1 + d``).
    ``track_modules`` must match how a stateful strategy was trained (its
    statistics are keyed by module names only when modules were tracked); a
    model wrapped with :func:`actpack.wrap` is measured through its own
    engine.  A compiled model (``torch.compile(model)``, wrapped or not) is
    measured through its eager module, and modules compiled in place
    (``nn.Module.compile``, the whole model or its blocks) are run eagerly
    for the measurement, with a warning: compiled codes draw their noise
    from the generator every pass re-seeds.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: ``draws`` is not a positive integer; ``seed`` is not an
            integer ``torch.manual_seed`` takes; grad mode is off (called
            under ``torch.no_grad()`` or ``torch.inference_mode()``); the
            model has no parameter that requires grad; the loss does not require grad (a
            non-differentiable output such as ``argmax``); or some of its submodules (not the
            model itself) are ``torch.compile`` wrappers (compile them in
            place with ``module.compile()`` instead, or measure first).

    Example::

        report = actpack.gradient_noise(model, x, strategy=actpack.ActNN(level="L3"),
                                        loss_fn=lambda out: F.cross_entropy(out, y))
        print(report.bias, report.variance)
    """
    count = as_int(draws)
    if count is None or count < 1:
        raise ValueError(f"draws must be a positive integer, got {draws!r}")
    draws = count
    seed = check_seed(seed)  # 1.5 was truncated, None and 2**64 failed inside torch
    if not isinstance(model, nn.Module):
        raise TypeError(f"gradient_noise expects an nn.Module, got {type(model).__name__}")
    if torch.is_inference_mode_enabled() or not torch.is_grad_enabled():
        # Every pass then builds no graph: the loss "does not require grad",
        # whatever loss_fn is.
        raise ValueError(
            "gradient_noise: grad mode is off (called under torch.no_grad() or "
            "torch.inference_mode()), so no pass builds a gradient; call it outside "
            "that block (under torch.no_grad(), `with torch.enable_grad():` also does)"
        )
    outer = getattr(model, "_actpack_engine", None)  # wrap(torch.compile(model)) too
    if strategy is None and outer is not None:
        strategy = outer.strategy  # what the wrapped model runs (copied per draw)
    model = _eager_model(model)
    wrapped_engine = getattr(model, "_actpack_engine", None)
    base = resolve(DEFAULT_STRATEGY if strategy is None else strategy)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("gradient_noise: the model has no parameter that requires grad")
    params = [p for _, p in named]
    named_inputs = dict(kwargs or {})
    restore = buffer_restorer(model)

    def run(strat: Strategy | None) -> list[Tensor]:
        restore()
        engine = None
        if wrapped_engine is not None:
            wrapped_engine.strategy = strat if strat is not None else Exact()
            ctx: Any = _Null()
        elif strat is None:
            ctx = _Null()
        else:
            engine = Engine(strat, model=model, min_numel=min_numel, track_modules=track_modules)
            ctx = engine
        try:
            with preserved_rng([*inputs, *named_inputs.values(), *params]):
                torch.manual_seed(seed)
                with ctx:
                    out = model(*inputs, **named_inputs)
                    loss = loss_fn(out) if loss_fn is not None else default_loss(out)
                if not (isinstance(loss, Tensor) and loss.requires_grad):
                    raise ValueError(
                        "gradient_noise: the loss does not require grad, so no gradient "
                        "reaches the parameters (a non-differentiable output such as argmax, "
                        "a detached or frozen model, or a forward under torch.no_grad); pass "
                        "loss_fn= returning a differentiable scalar"
                    )
                grads = torch.autograd.grad(loss, params, allow_unused=True)
        finally:
            if engine is not None:
                engine.close()
        return [
            torch.zeros_like(p, dtype=torch.float64) if g is None else g.detach().double()
            for p, g in zip(params, grads)
        ]

    original = wrapped_engine.strategy if wrapped_engine is not None else None
    with eager_calls(model, "gradient_noise"):
        try:
            exact = run(None)
            mean = [torch.zeros_like(g) for g in exact]
            m2 = [torch.zeros_like(g) for g in exact]
            for d in range(draws):
                grads = run(_fork(base, derived_seed(base.seed, 1 + d)))
                for mu, s2, g in zip(mean, m2, grads):
                    delta = g - mu
                    mu.add_(delta / (d + 1))
                    s2.add_(delta * (g - mu))
        finally:
            if wrapped_engine is not None:
                wrapped_engine.strategy = original
            restore()

    params_out: dict[str, tuple[float, float]] = {}
    per_layer: dict[str, list[float]] = {}
    tot_b = tot_v = tot_n = 0.0
    for (name, _), g, mu, s2 in zip(named, exact, mean, m2):
        b = float((mu - g).square().sum())
        v = float(s2.sum()) / draws
        n = float(g.square().sum())
        params_out[name] = (_ratio(b, n), _ratio(v, n))
        layer = name.rsplit(".", 1)[0] if "." in name else "<root>"
        acc = per_layer.setdefault(layer, [0.0, 0.0, 0.0])
        acc[0] += b
        acc[1] += v
        acc[2] += n
        tot_b, tot_v, tot_n = tot_b + b, tot_v + v, tot_n + n
    return NoiseReport(
        strategy=repr(base),
        draws=draws,
        bias=_ratio(tot_b, tot_n),
        variance=_ratio(tot_v, tot_n),
        exact_norm_sq=tot_n,
        layers={k: (_ratio(b, n), _ratio(v, n)) for k, (b, v, n) in per_layer.items()},
        params=params_out,
    )
