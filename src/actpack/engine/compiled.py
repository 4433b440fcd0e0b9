"""Saved-tensor hooks that AOTAutograd inlines into ``torch.compile``'s graphs.

When the innermost saved-tensor hooks are ``torch.fx.GraphModule`` s, AOTAutograd
(torch >= 2.8, ``maybe_inline_graph_saved_tensors_hooks`` in
``torch/_functorch/_aot_autograd/graph_compile.py``) traces the pack hook into
the end of the forward graph and the unpack hook into the start of the
backward graph, once per saved node, and Inductor compiles them with the rest
(its memory-aware scheduling then packs each save right after its producer).
While it traces, ``_get_saved_tensor_hook_context()`` hands the hook the saved
FX node and both graphs: the decision for each save is made from the graph
(:mod:`actpack.engine.graphfacts`) by the same :func:`~actpack.policy.decide.decide`
as in eager mode, and the codes are plain tensor ops
(:mod:`actpack.engine.graphcodes`).

One pair of GraphModules serves both worlds: called by autograd for an eager
save (no hook context) they hand the tensor to the eager engine's pack hook
for the running forward and, in backward, the result to its ``unpack``;
traced by AOTAutograd they return tensors and constants only.

Private torch API used here (pinned by ``tests/test_compiled.py``):
``_get_saved_tensor_hook_context`` and its keys ``_node``/``_fw_graph``/``_bw_graph``,
the node meta ``is_wrapped``/``user_cache_hash`` that AOTAutograd's cache
reads, and ``prims.inductor_seeds``.
"""

from __future__ import annotations

import contextvars
import functools
import hashlib
import importlib
import inspect
import operator
import os
import pathlib
import sys
import warnings
import weakref
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
from torch import Tensor, fx

from actpack.engine import graphcodes
from actpack.engine.graphfacts import graph_facts, history_free
from actpack.engine.graphreads import BackwardReads, backward_reads
from actpack.engine.saved import Held, unpack
from actpack.engine.untraced import eager_only
from actpack.policy.decide import Kind, decide
from actpack.strategies.seeds import process_rank

__all__ = ["Decision", "GraphHooks", "available", "compiled_hooks", "op_caller"]

# Marks a pack result made inside a graph (as opposed to an eager save).
_TAG = "actpack-graph-code/1"


# The installation whose pair is innermost, as torch's own hook stack is: the
# hook functions must be module-level (AOTAutograd's cache pickles them by
# name), so this is how they find their engine.  Set and reset only by the
# context manager GraphHooks.installed() returns, per thread and per context.
_ACTIVE: contextvars.ContextVar[_Installed | None] = contextvars.ContextVar(
    "actpack_graph_hooks", default=None
)


# Imported by torch.compile: looked up, never imported here (importing it
# pulls in Inductor and Triton, which some programs configure first).
_GRAPH_COMPILE = "torch._functorch._aot_autograd.graph_compile"


@functools.cache
def available() -> bool:
    """Whether this torch inlines GraphModule saved-tensor hooks into compiled graphs.

    torch >= 2.8.  With an older torch the pair would be called at run time
    after a compiled forward, like plain hooks; the engine keeps those saves
    exact (origin ``"compiled"``).
    """
    return torch.torch_version.TorchVersion(torch.__version__) >= (2, 8)


def _trace_state() -> dict | None:
    """The saved node and graphs while AOTAutograd traces the hooks, else None."""
    module = sys.modules.get(_GRAPH_COMPILE)
    get = getattr(module, "_get_saved_tensor_hook_context", None)
    return get() if get is not None else None


@dataclass(frozen=True)
class Decision:
    """What the inlined pack hook chose for one saved node of a compiled graph."""

    node: str
    producer: str
    op: str | None
    readers: tuple[str, ...]
    kind: Kind
    reason: str
    form: str
    #: Bytes of the value autograd would hold, and of what the graph holds instead.
    before: int
    after: int


def _nbytes(t: Tensor) -> int:
    """Bytes of ``t`` at its example sizes (never a guard: dynamic shapes stay dynamic)."""
    from torch.fx.experimental import symbolic_shapes

    # The same guard-free hint under three names: optimization_hint (torch
    # 2.13), size_hint (2.11, where hint_int is deprecated and warns: a
    # FutureWarning inside a backend compile fails it under -W error), hint_int
    # (back to 2.4).  The newest name first.
    for name in ("optimization_hint", "size_hint", "hint_int"):
        hint = getattr(symbolic_shapes, name, None)
        if hint is not None:
            return hint(t.numel()) * t.element_size()
    raise RuntimeError(
        "actpack: torch.fx.experimental.symbolic_shapes has none of optimization_hint, "
        f"size_hint, hint_int (torch {torch.__version__}); cannot size a compiled graph's saves"
    )


@functools.lru_cache(maxsize=64)
def _source_digest(strategy_module: str) -> bytes:
    """The code the inlined hooks run: every source file of the actpack
    package, and the module of a strategy defined outside it, read once per
    process (~1 ms; every ``compress()`` makes an engine).  The whole package
    rather than a list of modules: a list missed modules that decide what
    compiled graphs compute (the product rule of ``graphreads``, the fill
    rule, the rank seeds), and a graph compiled by an older actpack, served
    from AOTAutograd's cache after an upgrade, kept the bias a later version
    fixed."""
    h = hashlib.sha256(package_digest())
    if not strategy_module.startswith("actpack."):
        h.update(inspect.getsource(importlib.import_module(strategy_module)).encode())
    return h.digest()


def package_files(root: pathlib.Path | None = None) -> list[pathlib.Path]:
    """The ``.py`` files of the package at ``root`` (default: the installed
    ``actpack``), sorted."""
    root = root or pathlib.Path(__file__).resolve().parent.parent  # .../actpack
    return sorted(root.rglob("*.py"))


def package_digest(root: pathlib.Path | None = None) -> bytes:
    """SHA-256 over the relative path and bytes of each of
    :func:`package_files` (not cached: tests compare packages)."""
    root = root or pathlib.Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for path in package_files(root):
        h.update(str(path.relative_to(root)).encode())
        h.update(b"\0")
        h.update(path.read_bytes())
        h.update(b"\0")
    return h.digest()


def _cache_hash(engine: Any, rank: int) -> str:
    """What the inlined code depends on: torch, the strategy's knobs, actpack's
    code, and the process's rank (traced into the noise key: ranks sharing a
    cache directory must not load each other's graphs)."""
    strategy = engine.strategy
    kind = type(strategy)
    return _hash_of(repr(strategy), kind.__module__, kind.__qualname__, engine._settings(), rank)


@functools.lru_cache(maxsize=256)
def _hash_of(knobs: str, module: str, qualname: str, settings: Any, rank: int) -> str:
    # Memoised: every ``compress()`` of a training loop makes an engine.
    h = hashlib.sha256(torch.__version__.encode())
    h.update(repr((knobs, module, qualname, settings, rank)).encode())
    h.update(_source_digest(module))
    return h.hexdigest()


# Frames between an op and the eager engine's pack when it is called through
# the GraphModule pair: nn.Module.__call__, fx's wrapper, the generated
# forward and this module's hook function.
_HOOK_FILES = (
    os.path.join("torch", "fx", ""),
    os.path.join("torch", "nn", "modules", "module.py"),
    "<eval_with_key>",
    __file__,
)


def op_caller(frame: Any) -> Any:
    """The first frame from ``frame`` up that is not one of the GraphModule hooks' own.

    The eager engine reads who is saving from the frame that called the op
    (a custom ``autograd.Function``'s ``apply``, a checkpoint): called through
    the GraphModule pair, its pack hook sees these frames in between.
    """
    while frame is not None and _is_hook_file(frame.f_code.co_filename):
        frame = frame.f_back
    return frame


# By file name: a str caches its hash (a code object's is recomputed per call).
@functools.lru_cache(maxsize=4096)
def _is_hook_file(filename: str) -> bool:
    return any(part in filename for part in _HOOK_FILES)


@eager_only
def _pack_hook(x: Tensor) -> Any:
    active = _ACTIVE.get()
    if type(x) is Tensor and active is not None:
        # An eager save (the hot path): AOTAutograd traces the hook on fake
        # tensors, never on plain ones.
        return active.eager_pack(x)
    state = _trace_state()
    if active is None:
        # Hooks propagated to a thread that never entered (autograd's worker
        # threads): keep the tensor, as autograd would.
        return Held(x) if state is None else x
    if state is None:
        return active.eager_pack(x)
    return active.hooks.pack_graph(x, state)


@eager_only
def _unpack_hook(packed: Any) -> Tensor:
    if type(packed) is Held:  # the common eager case first (hot path)
        return packed.restore()
    if type(packed) is tuple and len(packed) == 4 and packed[0] == _TAG:
        return graphcodes.decode(*packed[1:])
    return unpack(packed)  # an eager save, or a graph save kept as it is


class _HookModule(fx.GraphModule):
    """A GraphModule whose call is its hook function itself, skipping
    ``nn.Module.__call__``: autograd calls the pack hook for every eager save,
    and Module dispatch (even one more Python frame) costs a noticeable part
    of a small save.  AOTAutograd calls and traces it like any other."""


def _module(fn: Any, arg: str, cache_hash: str) -> fx.GraphModule:
    # One call of ``fn`` marked as an fx.wrap-ped leaf carrying a cache hash:
    # AOTAutograd re-traces through it, and its autograd cache accepts the
    # hook graphs (keyed by that hash) instead of bypassing the cache.
    graph = fx.Graph()
    node = graph.call_function(fn, (graph.placeholder(arg),))
    node.meta["is_wrapped"] = True
    node.meta["user_cache_hash"] = cache_hash
    graph.output(node)
    module = _HookModule(torch.nn.Module(), graph)
    # GraphModule.recompile() installs fx's call wrapper on the instance's own
    # class (one class per instance): calling the module calls ``fn``.
    type(module).__call__ = staticmethod(fn)
    return module


@functools.lru_cache(maxsize=64)
def _hook_pair(cache_hash: str) -> tuple[fx.GraphModule, fx.GraphModule]:
    """The GraphModule pair for one inlined-code configuration, shared by every
    engine with that configuration.  Dynamo guards compiled code on the
    identity of the innermost hook pair: a pair per engine would recompile a
    compiled model (and each fused CPU codec) under every new ``compress()``
    context, a new one per training step in the usual loop, and after 8 of
    them Dynamo runs the model uncompiled.  The hooks are stateless (they
    dispatch to the engine active in this context, ``_ACTIVE``), so sharing
    them shares nothing else."""
    return _module(_pack_hook, "x", cache_hash), _module(_unpack_hook, "packed", cache_hash)


class _Installed:
    """One entry of the pair: the graph hooks and this forward's eager pack hook."""

    __slots__ = ("hooks", "eager_pack", "token", "torch_hooks")

    def __init__(self, hooks: GraphHooks, eager_pack: Callable[[Tensor], Any]) -> None:
        self.hooks = hooks
        self.eager_pack = eager_pack
        self.token: contextvars.Token | None = None
        self.torch_hooks = torch.autograd.graph.saved_tensors_hooks(hooks.pack_gm, hooks.unpack_gm)

    def __enter__(self) -> GraphHooks:
        self.torch_hooks.__enter__()
        self.token = _ACTIVE.set(self)
        return self.hooks

    def __exit__(self, *exc: object) -> None:
        _ACTIVE.reset(self.token)
        self.torch_hooks.__exit__(*exc)


class GraphHooks:
    """An engine's hooks as a compile-native GraphModule pair.

    ``installed(pack)`` is a context manager to enter where the engine would
    enter ``torch.autograd.graph.saved_tensors_hooks(pack, unpack)``; eager
    saves still go to ``pack`` and :func:`actpack.engine.saved.unpack`
    (:func:`op_caller` skips the frames in between).  Dynamo guards compiled
    code on the identity of ``pack_gm``/``unpack_gm``: engines with the same
    strategy and settings share one pair (:func:`_hook_pair`), so a new
    engine per step recompiles nothing.

    ``decisions`` holds what the inlined hooks chose, one entry per saved node
    of every graph compiled under this engine (for reports and tests).  A
    graph served by AOTAutograd's or Inductor's cache is not traced, so it
    adds none (``TORCHINDUCTOR_FORCE_DISABLE_CACHES=1`` lists them again).
    """

    def __init__(self, engine: Any) -> None:
        # Weak: the engine keeps its hooks, and a cycle between the two would
        # leave every ``compress()`` of a training loop to the garbage
        # collector (whose full passes then cost more than the step).  An
        # engine is alive while its hooks are installed.
        self._engine = weakref.ref(engine)
        self.decisions: dict[tuple[int, str], Decision] = {}
        # Per forward graph being compiled, the names of its nodes without
        # autograd history (one pass over the graph, not one per save); weak:
        # a compiled graph's FX graph is freed after compilation.
        # (Made on the first traced save: most engines never see a graph.)
        self._history_free: weakref.WeakKeyDictionary[fx.Graph, frozenset[str]] | None = None
        # Per backward graph, how it reads its saves (one pass): products, smooth reads.
        self._reads: weakref.WeakKeyDictionary[fx.Graph, BackwardReads] | None = None
        # The rank the traced keys mix in (strategies/seeds.py), read once so
        # that the cache hash and the traced code agree.
        self.rank = process_rank()
        self.pack_gm, self.unpack_gm = _hook_pair(_cache_hash(engine, self.rank))

    @property
    def engine(self) -> Any:
        return self._engine()

    def installed(self, eager_pack: Callable[[Tensor], Any]) -> _Installed:
        """A context manager installing the pair (one per entry: threads may nest).

        ``eager_pack`` receives the saves of eager code while it is installed
        (the engine's pack hook for this forward; it may hold the forward's
        state, which ends when the context exits)."""
        return _Installed(self, eager_pack)

    def pack_graph(self, x: Tensor, state: dict) -> Any:
        """The pack hook while AOTAutograd traces it for saved node ``state["_node"]``."""
        node = state["_node"]
        strategy = self.engine.strategy
        fw_graph = state["_fw_graph"]
        if self._history_free is None:
            self._history_free = weakref.WeakKeyDictionary()
        free = self._history_free.get(fw_graph)
        if free is None:
            free = self._history_free[fw_graph] = history_free(fw_graph)
            _name_generator_states(fw_graph, state["_bw_graph"])
        if _generator_state(node):
            # The generator state a checkpointed region's random ops replay
            # from in backward: not an activation, kept as it is.
            self.decisions[(id(fw_graph), node.name)] = Decision(
                node.name, "run_and_save_rng_state", None, (), Kind.EXACT, "generator state",
                "exact", _nbytes(x), _nbytes(x),
            )  # fmt: skip
            return x
        bw_graph = state["_bw_graph"]
        if self._reads is None:
            self._reads = weakref.WeakKeyDictionary()
        reads = self._reads.get(bw_graph)
        if reads is None:
            reads = self._reads[bw_graph] = backward_reads(bw_graph)
        gf = graph_facts(node, bw_graph, x, free, reads)
        attention = gf.facts.logits or gf.facts.values
        if x.is_floating_point() and gf.facts.history and not attention:
            # (Attention's query, key, value and output take the policy's
            # fp16 form whatever the strategy would skip, as in eager mode.)
            declined = gf.facts.declined or strategy.skip_reason(x)
            gf = replace(gf, facts=gf.facts._replace(declined=declined))
        plan = decide(gf.facts, self.engine._settings())
        if plan.kind == Kind.LOSSY and plan.reason.startswith("checkpoint input"):
            strategy = self.engine._checkpoint_coder()  # opted in: bf16, fp16 or int8
        if plan.kind == Kind.LOSSY and not graphcodes.traceable_strategy(strategy):
            warnings.warn(
                f"actpack: {strategy!r} has no traceable code yet; tensors saved inside "
                "torch.compile graphs are kept exact (eager regions are compressed as usual).",
                UserWarning,
                stacklevel=2,
            )
        form, meta, tensors = graphcodes.encode(strategy, plan, gf, x, self.rank)
        after = sum(_nbytes(t) for t in tensors) if form != "exact" else _nbytes(x)
        # AOTAutograd calls the hook twice per node (value, then tracing): one entry.
        self.decisions[(id(state["_fw_graph"]), node.name)] = Decision(
            node.name, gf.producer, gf.op, gf.readers, plan.kind, plan.reason, form,
            _nbytes(x), after,
        )  # fmt: skip
        if form == "exact":
            return x
        return (_TAG, form, meta, tensors)


def _generator_state(node: fx.Node) -> bool:
    """Whether forward node ``node`` is the generator state AOTAutograd saves
    for a random op that backward recomputes (``run_and_save_rng_state``'s
    first output: dropout, or attention in training, inside a checkpointed
    region of a compiled graph)."""
    if node.op != "call_function" or node.target is not operator.getitem:
        return False
    source, index = node.args[0], node.args[1]
    rng_prims = getattr(getattr(torch, "_prims", None), "rng_prims", None)
    return (
        index == 0
        and isinstance(source, fx.Node)
        and rng_prims is not None
        and source.target is getattr(rng_prims, "run_and_save_rng_state", None)
    )


def _name_generator_states(fw_graph: fx.Graph, bw_graph: fx.Graph) -> None:
    """Give saved generator states in the forward graph the names their
    backward inputs have, as every other saved value has.

    AOTAutograd's partitioner saves each such state as forward node
    ``getitem_<n>`` but names its backward input ``rng_state_output_<k>``,
    and its inlining of saved-tensor hooks looks each saved node up by name
    among the backward inputs: any compiled graph holding a checkpointed
    region with a random op (HF Llama and GPT-2 after
    ``gradient_checkpointing_enable()``: attention is seeded in training)
    failed to compile with "could not find saved tensor getitem_<n> in
    bw_g_inputs", whatever the hooks do.  Renamed, the states no longer match
    the names AOTAutograd selected for the hooks, so it passes them through
    untouched.  Both lists are in the same order (forward outputs, backward
    inputs, which graphs read by position): the names change nothing else.
    Called when AOTAutograd traces the first hook of ``fw_graph``."""
    saved = [n for n in fw_graph.output_node().args[0] if isinstance(n, fx.Node)]
    states = [n for n in saved if _generator_state(n)]
    if not states:
        return
    inputs = bw_graph.find_nodes(op="placeholder")
    replays = [p for p in inputs if str(p.target).startswith("rng_state_output_")]
    if len(replays) != len(states):
        return  # not the layout this was written for: leave torch's names
    for state, replay in zip(states, replays):
        state._rename(replay.name)


def compiled_hooks(engine: Any) -> GraphHooks | None:
    """``engine``'s :class:`GraphHooks` (made once), or None if torch cannot inline hooks.

    ``engine`` needs ``strategy`` and ``_settings()`` (the decision's
    :class:`~actpack.policy.decide.Settings`).  On
    None, install the engine's plain hooks: compiled graphs then save after
    their forward, where the engine keeps what they save exact.  Strategies
    without a traceable code (mixed precision, DIVISION) keep compiled saves
    exact, with a warning when a graph is compiled.
    """
    if not available():
        return None
    hooks = getattr(engine, "_graph_hooks", None)
    if hooks is None:
        hooks = GraphHooks(engine)
        engine._graph_hooks = hooks
    return hooks
