"""Public entry points: compress, wrap, unwrap, measure."""

from __future__ import annotations

import copy
import warnings
import weakref
from collections.abc import Mapping
from typing import Any, Callable, TypeVar

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
from actpack.report import Report
from actpack.strategies import DEFAULT_STRATEGY, Strategy
from actpack.strategies.registry import resolve

T = TypeVar("T")


def compress(
    strategy: str | Strategy = DEFAULT_STRATEGY,
    *,
    model: nn.Module | None = None,
    min_numel: int = DEFAULT_MIN_NUMEL,
    checkpoint_inputs: str = "exact",
    smooth: str = "code",
) -> Engine:
    """Context manager: compress every tensor autograd saves inside it.

    Mechanism: ``torch.autograd.graph.saved_tensors_hooks``.  A lossy code is
    used only where actpack can show it is safe (see README, "What the
    engine guarantees"): parameters, buffers, autocast's weight casts and
    leaf tensors such as the input batch are never compressed; an op's own
    statistics, saves of custom ``autograd.Function``s, of compiled graphs
    seen from outside, and what ``torch.utils.checkpoint`` recomputes from
    stay exact; tensors with fewer than ``min_numel`` elements pass through;
    bool masks and dropout's noise are kept losslessly in 1 bit; the region
    ReLU-family backward reads stays exact.  Backward may run after the
    context exits.  Each thread entering the context gets its own hooks.

    Args:
        strategy: a name (``"none"``, ``"fp16"``, ``"bf16"``, ``"int8"``,
            ``"actnn"``, ``"division"``, ``"actnn-rows"``, ...) or a
            :class:`~actpack.Strategy`.  Default: ``"actnn-rows"``
            (:data:`actpack.DEFAULT_STRATEGY`): ActNN's 2-bit stochastic codes
            with one range per token row and 3 bits for matmul, attention and
            norm inputs; CNN feature maps are coded exactly as ``"actnn"``
            codes them.  ``"actnn"`` is the paper's method as published.
        model: optional; lets the engine recognise that model's parameters
            and buffers by storage (their views and frozen copies).
        min_numel: smallest tensor (in elements) worth compressing.
        checkpoint_inputs: ``"exact"`` (default), or ``"bf16"``, ``"fp16"``,
            ``"int8"`` to store the inputs ``torch.utils.checkpoint`` keeps
            to recompute from in that form.  Approximate: the recomputed
            block sees the rounded input, which biases its gradients.
        smooth: ``"code"`` (default) codes the inputs of ops whose backward
            is a smooth function of them (normalization, GELU/SiLU/tanh,
            softmax, attention values), leaving a second-order bias;
            ``"exact"`` keeps them exact (more memory, no such bias).

    Returns the engine; its ``stats`` hold the bytes saved for backward.

    Raises:
        ValueError: an unknown strategy name, a negative ``min_numel``, an
            unknown ``checkpoint_inputs`` or ``smooth``.
        TypeError: ``model`` is given and is not an ``nn.Module``.

    Warns once per engine when entered inside other saved-tensor hooks
    (``save_on_cpu``: only the innermost hooks run) and when a compiled
    graph's saves are kept exact.

    Example::

        with actpack.compress() as ctx:  # "actnn-rows"
            loss = model(x).sum()
        loss.backward()
        print(ctx.stats.ratio)
    """
    if torch.compiler.is_compiling():
        # Dynamo traces this call: an engine made and entered inside compiled
        # code is not what the compiled graphs see (fullgraph=True failed
        # deep inside the strategy's seed).  A graph break with actpack's
        # message, which fullgraph=True reports as its error; otherwise the
        # engine is made in eager mode (Dynamo is loaded here: it is tracing).
        torch._dynamo.graph_break(msg=_INSIDE_COMPILE)
    return Engine(
        strategy,
        model=model,
        min_numel=min_numel,
        checkpoint_inputs=checkpoint_inputs,
        smooth=smooth,
    )


_INSIDE_COMPILE = (
    "actpack.compress() is called inside a torch.compile'd function; enter it outside "
    "the compiled code (`with actpack.compress(): compiled_fn(x)`) or use "
    "actpack.wrap(torch.compile(model))"
)


_ATTR = "_actpack_engine"
_HOOK_IDS = "_actpack_hook_ids"


def _enter(module: nn.Module) -> None:
    getattr(module, _ATTR)._enter_forward()


def _leave(module: nn.Module) -> None:
    getattr(module, _ATTR).__exit__(None, None, None)


class _Hook:
    """wrap's hooks: small classes, not closures, so that a wrapped model can
    be deep-copied and pickled (the copy finds its own engine).

    They enter and leave the engine eagerly even when the wrapped model is
    compiled as a whole: Dynamo cannot trace entering saved-tensor hooks, and
    the hooks must be in place before AOTAutograd compiles the forward (they
    are inlined into it).  The forward stays one graph: the breaks fall
    before and after it.  ``torch.compiler.disable`` is applied when a hook
    is made, not at import (it imports Dynamo, and Dynamo Triton).
    """

    fn: Callable[[nn.Module], None]

    def __init__(self) -> None:
        self._run = torch.compiler.disable(type(self).fn)

    def __reduce__(self) -> tuple:
        return (type(self), ())


class _Enter(_Hook):
    """wrap's forward pre-hook."""

    fn = staticmethod(_enter)

    def __call__(self, module: nn.Module, args: Any) -> None:
        self._run(module)


class _Leave(_Hook):
    """wrap's forward hook (always called, also when forward raises)."""

    fn = staticmethod(_leave)

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        self._run(module)


def wrap(
    model: nn.Module,
    strategy: str | Strategy = DEFAULT_STRATEGY,
    *,
    min_numel: int = DEFAULT_MIN_NUMEL,
    track_modules: bool = False,
    checkpoint_inputs: str = "exact",
    smooth: str = "code",
) -> nn.Module:
    """Make every forward of ``model`` run under :func:`compress`.

    The model itself is returned, with a forward pre-hook and hook added: it
    is never rebuilt, so its parameters, ``state_dict`` keys and weights stay
    exactly as they were.  :func:`unwrap` removes the hooks.  A copy of a
    wrapped model (``copy.deepcopy``, e.g. for an EMA or teacher model, or
    ``torch.save``/``torch.load`` of the whole model) gets an engine of its
    own over its own parameters, with a copy of the strategy.

    Args:
        model: the module to wrap.
        strategy, min_numel, checkpoint_inputs, smooth: as in :func:`compress`.
        track_modules: attribute bytes to submodules in ``engine_of(model).stats``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, or defines no
            ``forward`` (an ``nn.ModuleList``; a ``LightningModule`` whose
            ``training_step`` calls a submodule): hooks on it never run.
        ValueError: ``model`` is already wrapped, or ``strategy`` (an
            object) runs for another wrapped model (give each model its own).

    Example::

        model = actpack.wrap(model, actpack.Division(block_size=8, bits=2))
        loss = model(x).sum()
        loss.backward()
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"wrap expects an nn.Module, got {type(model).__name__}")
    if hasattr(model, _ATTR):
        raise ValueError("model is already wrapped by actpack; call actpack.unwrap(model) first")
    if not _has_forward(model):
        raise TypeError(
            f"{type(model).__name__} defines no forward, so wrap's hooks would never run and "
            "nothing would be compressed; wrap the submodule its training step calls "
            "(actpack.wrap(self.net)) or run the step's forward under actpack.compress()"
        )
    _check_unshared(strategy, model)
    engine = Engine(
        strategy,
        model=model,
        min_numel=min_numel,
        track_modules=track_modules,
        checkpoint_inputs=checkpoint_inputs,
        smooth=smooth,
    )
    _warn_if_compiled_before(model)
    if isinstance(strategy, Strategy):
        strategy._wrapped_by = weakref.ref(model)  # dropped by copies and pickles
    object.__setattr__(model, _ATTR, engine)
    pre = model.register_forward_pre_hook(_Enter())
    post = model.register_forward_hook(_Leave(), always_call=True)
    object.__setattr__(model, _HOOK_IDS, (pre.id, post.id))
    return model


def _check_unshared(strategy: str | Strategy, model: nn.Module) -> None:
    """Raise ValueError if ``strategy`` (an object) already runs for another
    wrapped model: the two models would share its generators (each one's
    rounding noise depending on the other's steps) and, for
    :class:`~actpack.ActNNMixed`, the statistics it keys by layer name (two
    models' layers of one name overwriting each other's ranges, so that the
    bit allocation never settles)."""
    owner = getattr(strategy, "_wrapped_by", None)
    other = owner() if owner is not None else None
    if other is None or other is model:
        return
    engine = getattr(other, _ATTR, None)
    if engine is not None and engine.strategy is strategy:
        raise ValueError(
            f"{strategy!r} already runs for another wrapped model "
            f"({type(other).__name__}); two models sharing a strategy object share its "
            "random generators and statistics. Give each model a new strategy object "
            "(a copy.deepcopy of this one would continue its random stream, drawing the "
            "same noise as the original)"
        )


#: Classes whose ``forward`` only raises or passes the call on to
#: ``nn.Module.forward`` (which raises), by module and name: a subclass
#: that defines no forward of its own is never called by its training loop.
_NO_FORWARD = {
    ("torch.nn.modules.module", "Module"),
    ("lightning.pytorch.core.module", "LightningModule"),
    ("pytorch_lightning.core.module", "LightningModule"),
}


def _has_forward(model: nn.Module) -> bool:
    """Whether calling ``model`` runs a forward of its own (so that hooks on
    it see the step), rather than only nn.Module's or LightningModule's
    placeholder, whose training step calls submodules instead."""
    if "forward" in vars(model):  # set on the instance: torch.compile's OptimizedModule
        return True
    for cls in type(model).__mro__:
        if "forward" in vars(cls):
            return (cls.__module__, cls.__qualname__) not in _NO_FORWARD
    return False


def _warn_if_compiled_before(model: nn.Module) -> None:
    """Warn when Dynamo already holds code compiled for ``model``'s class.

    Dynamo does not guard compiled code on module hooks
    (``torch._dynamo.config.skip_nnmodule_hook_guards``): a later
    ``torch.compile(wrap(model))`` may reuse code compiled for an unwrapped
    instance of the class and run without wrap's hooks, uncompressed, with
    no sign of it.  ``wrap(torch.compile(model))`` is not affected.
    """
    if type(model).__name__ == "OptimizedModule":
        return
    try:
        from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list
    except ImportError:  # a torch without Dynamo: nothing was compiled
        return
    forward = getattr(type(model).forward, "__code__", None)
    if forward is not None and _debug_get_cache_entry_list(forward):
        warnings.warn(
            f"torch.compile already compiled {type(model).__qualname__}.forward in this "
            "process, without actpack's hooks; torch.compile(actpack.wrap(model)) may reuse "
            "that code and run uncompressed (Dynamo does not guard on module hooks). Use "
            "actpack.wrap(torch.compile(model)) instead.",
            stacklevel=3,
        )


def engine_of(model: nn.Module) -> Engine:
    """The engine of a wrapped model (its ``stats`` describe the last forward).

    Raises:
        ValueError: ``model`` is not wrapped.
    """
    engine = getattr(model, _ATTR, None)
    if engine is None:
        raise ValueError("model is not wrapped by actpack.wrap")
    return engine


def unwrap(model: nn.Module) -> nn.Module:
    """Remove what :func:`wrap` added; the model is returned unchanged otherwise.

    Raises:
        ValueError: ``model`` is not wrapped.
    """
    engine = engine_of(model)
    pre, post = getattr(model, _HOOK_IDS)
    model._forward_pre_hooks.pop(pre, None)
    model._forward_hooks.pop(post, None)
    model._forward_hooks_always_called.pop(post, None)
    engine.close()
    object.__delattr__(model, _ATTR)
    object.__delattr__(model, _HOOK_IDS)
    return model


def _step(
    model: nn.Module, inputs: tuple, kwargs: dict, loss_fn: Callable | None, ctx: Any
) -> bool:
    """One forward and backward; whether the loss had a graph (else autograd
    saved nothing, and there was nothing to measure)."""
    with ctx:
        out = model(*inputs, **kwargs)
        loss = loss_fn(out) if loss_fn is not None else default_loss(out)
    params = [p for p in model.parameters() if p.requires_grad]
    if loss.requires_grad and params:
        torch.autograd.grad(loss, params, allow_unused=True)
    return loss.requires_grad


def _warn_no_graph(model: nn.Module, given: list) -> None:
    """``measure``'s loss had no graph, so no backward ran: say why.  With
    grad mode off or nothing requiring grad, autograd saved nothing and the
    report's 0 B would read as a perfect compression; otherwise the loss
    does not depend on what requires grad (a ``loss_fn`` that detaches), and
    the report counts saves that no backward read."""
    if torch.is_inference_mode_enabled() or not torch.is_grad_enabled():
        what = "nothing was saved for backward (the report counts 0 B)"
        why = "grad mode is off (torch.no_grad() or torch.inference_mode() around measure)"
        fix = "call measure outside it"
    elif not any(p.requires_grad for p in model.parameters()) and not any(
        isinstance(t, Tensor) and t.requires_grad for t in given
    ):
        what = "nothing was saved for backward (the report counts 0 B)"
        why = "neither a parameter of the model nor an input requires grad"
        fix = "unfreeze the parameters you train, or pass inputs with requires_grad=True"
    else:
        what = "no backward ran (the report counts saves that no backward read)"
        why = "the loss does not depend on anything that requires grad"
        fix = "return a loss with a graph from loss_fn (one that does not detach)"
    warnings.warn(
        f"actpack.measure: the loss has no autograd graph, so {what}: {why}; {fix}",
        RuntimeWarning,
        stacklevel=4,  # measure's caller
    )


def measure(
    model: nn.Module,
    *inputs: Any,
    strategy: str | Strategy | None = None,
    loss_fn: Callable[[Any], Tensor] | None = None,
    min_numel: int | None = None,
    kwargs: Mapping[str, Any] | None = None,
) -> Report:
    """Run one forward and backward of ``model(*inputs, **kwargs)`` and report
    the bytes saved.

    ``kwargs``: keyword inputs of the model, e.g. a Hugging Face batch
    (``measure(model, kwargs=batch)`` runs ``model(**batch)``).

    The count is exact: every tensor autograd saves is seen by the engine.
    Parameter ``.grad``, buffers (BatchNorm statistics) and torch's CPU and
    CUDA random states are left as they were, so measuring before training
    does not change the training run; parameters are never written (their
    versions unchanged), so a backward pending on them, of an earlier
    forward, still runs after the call.  On CUDA the peak memory of the step is
    reported with and without compression.  ``loss_fn(output)`` gives the
    scalar loss; by default :func:`actpack.probe.default_loss` (the
    ``.loss`` of a HuggingFace output, else the sum of the outputs).

    A compiled model is measured through its eager module
    (``model._orig_mod``) and modules compiled in place
    (``nn.Module.compile``) run eagerly for the step, with a warning: saves
    inside compiled graphs are packed where the counters do not reach.

    ``strategy``: what to measure; by default the strategy of a model
    wrapped by :func:`wrap` (measured through a copy of its settings, with
    its own engine set aside for the step), else :data:`actpack.DEFAULT_STRATEGY`
    (``"actnn-rows"``).

    Warns:
        RuntimeWarning: the loss has no autograd graph, so no backward ran:
            grad mode off, or nothing requires grad (a frozen model on plain
            inputs; the report then counts 0 B), or a ``loss_fn`` that
            detaches.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: ``model`` is wrapped and ``strategy`` has other
            settings than the strategy it runs (a name stands for its default
            settings: ``"actnn"`` is not ``ActNN(bits=8)``); unwrap it, or omit
            ``strategy``.  Also an unknown strategy name.

    Example::

        report = actpack.measure(model, x, strategy="division")
        print(report.ratio, report.modules)
    """
    if torch.compiler.is_compiling():
        # Called inside a torch.compile'd function: Dynamo would trace the
        # measured step into that function's graph, where the engine's hooks
        # count nothing (the report said 0 B -> 0 B).  The step runs eagerly.
        return torch.compiler.disable(measure)(
            model, *inputs, strategy=strategy, loss_fn=loss_fn, min_numel=min_numel,
            kwargs=kwargs,
        )  # fmt: skip
    if not isinstance(model, nn.Module):
        raise TypeError(f"measure expects an nn.Module, got {type(model).__name__}")
    wrapped = getattr(model, _ATTR, None)
    if wrapped is not None:
        if strategy is not None and not _same_settings(strategy, wrapped.strategy):
            raise ValueError(
                f"measure: the model is wrapped with {wrapped.strategy!r}, not "
                f"{_describe(strategy)}; omit strategy= to measure what it runs, or "
                "actpack.unwrap(model) to measure another strategy"
            )
        # A copy: measuring must not advance the wrapped strategy's state or generators.
        strategy = copy.deepcopy(wrapped.strategy)
        if min_numel is None:
            min_numel = wrapped.min_numel
    strategy = DEFAULT_STRATEGY if strategy is None else strategy
    min_numel = DEFAULT_MIN_NUMEL if min_numel is None else min_numel
    model = _eager_module(model)
    with wrapped.suspended() if wrapped is not None else _null(), eager_calls(model, "measure"):
        return _measure(model, inputs, dict(kwargs or {}), strategy, loss_fn, min_numel)


def _same_settings(given: str | Strategy, running: Strategy) -> bool:
    """Whether ``given`` (a name or a strategy) codes as ``running`` does:
    the same object, or the same class and knobs (its repr; the seed does not
    change what is saved).  A name stands for its default settings: a model
    wrapped with ``ActNN(bits=8)`` does not run ``"actnn"``."""
    if given is running:
        return True
    made = resolve(given)  # an unknown name or a wrong type raises here
    if type(made) is not type(running):
        return False
    # Every knob where a strategy keeps them (ActNNMixed's repr shows a few).
    config = getattr(running, "_config", None)
    if config is not None:
        return getattr(made, "_config", None) == config
    return repr(made) == repr(running)


def _describe(strategy: str | Strategy) -> str:
    return f"{strategy!r} ({resolve(strategy)!r})" if isinstance(strategy, str) else repr(strategy)


def _eager_module(model: nn.Module) -> nn.Module:
    """The module ``measure`` runs: the eager module behind a compiled one.

    Compiled graphs' saves are packed inside the graphs, where the engine's
    counters do not reach (the report would read 0 B); the eager module's
    saves are what it can count, with the same policy (compiled graphs may
    keep a few more tensors exact, e.g. values backward recomputes from).
    """
    compiled_parts = compile_wrappers(model)
    if not compiled_parts:
        return model
    inner = eager_behind(model)
    if inner is not None:
        warnings.warn(
            "measure: the model is compiled; measuring its eager module (model._orig_mod): "
            "saves inside compiled graphs are not counted by the engine",
            stacklevel=3,
        )
        return inner
    warnings.warn(
        f"measure: {len(compiled_parts)} submodule(s) are compiled; the engine does not see "
        "saves inside compiled graphs, so the report leaves them out. Measure the model "
        "before compiling its blocks.",
        stacklevel=3,
    )
    return model


def _measure(
    model: nn.Module,
    inputs: tuple,
    kwargs: dict,
    strategy: str | Strategy,
    loss_fn: Callable[[Any], Tensor] | None,
    min_numel: int,
) -> Report:
    # Parameters are never written: a copy into one would break a backward
    # still pending on it (gradient accumulation, a measure inside a training
    # step).  The step's backward is autograd.grad: no .grad is touched.
    restore_buffers = buffer_restorer(model)
    engine = Engine(strategy, model=model, min_numel=min_numel, track_modules=True, track_ops=True)
    given = [*inputs, *kwargs.values()]
    device = next((t.device for t in given if isinstance(t, Tensor)), torch.device("cpu"))
    peak = baseline_peak = None
    try:
        # Dropout in this extra step must not advance the user's generators.
        with preserved_rng([*given, *model.parameters()]):
            if device.type == "cuda":
                baseline_peak, _ = _peak(
                    lambda: _step(model, inputs, kwargs, loss_fn, _null()), device
                )
                peak, graph = _peak(lambda: _step(model, inputs, kwargs, loss_fn, engine), device)
            else:
                graph = _step(model, inputs, kwargs, loss_fn, engine)
        if not graph:
            _warn_no_graph(model, given)
    finally:
        engine.close()
        restore_buffers()
    s = engine.stats
    return Report(
        strategy=repr(engine.strategy),
        baseline_bytes=s.baseline_bytes,
        compressed_bytes=s.compressed_bytes,
        tensors=s.tensors,
        baseline_elements=s.baseline_elements,
        weight_bytes=s.weight_bytes,
        leaf_bytes=s.leaf_bytes,
        modules={k: (v[0], v[1]) for k, v in s.by_module.items()},
        ops={k: (v[0], v[1]) for k, v in s.by_op.items()},
        passthrough=dict(s.passthrough),
        forms={k: (v[0], v[1]) for k, v in s.forms.items()},
        peak_bytes=peak,
        baseline_peak_bytes=baseline_peak,
    )


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _peak(fn: Callable[[], T], device: torch.device) -> tuple[int, T]:
    """(peak bytes allocated on ``device`` while ``fn`` runs, its result)."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device), result
