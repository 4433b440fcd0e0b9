"""A codec body's Inductor code called without Dynamo, behind explicit guards.

Entering a ``torch.compile``\\ d function costs ~15-20 us per call on a small
CPU (Dynamo's frame entry, its guards, marking sizes dynamic, the hooks
context of :func:`~actpack.codecs.compiled.build.run`); a small model makes
~70 codec calls per step.  An artifact of
:func:`torch._inductor.standalone_compile` is called directly, but it has no
guards: it is only the same computation for arguments that satisfy every
assumption the trace made.  So each artifact carries, and each call checks:

* the shape guards of the trace's ``ShapeEnv`` (sizes 0/1, equal sizes,
  divisibility, the branch a size comparison took, every stride and storage
  offset, static ones included), produced *after* compiling, since Inductor
  adds guards of its own while it lowers the graph;
* what the shape guards do not cover: each argument's dtype, device, rank,
  dispatch keys (layout, subclass, conj/neg views, functorch wrappers) and
  ``requires_grad``; the default dtype and deterministic mode.

Each artifact is compiled afresh, never loaded from Inductor's FX graph
cache: that cache guards an entry on the graph's SymInt inputs only, and a
graph of ``make_fx`` has none (its sizes live in the tensors' shapes), so an
entry is stored with no guards and served to every later trace of the same
graph code, whatever its sizes.  The guards Inductor adds while it lowers
(a size the indexing of a view was simplified for, e.g. a padded row width
of exactly 16) are then neither checked by the cache nor put in the
``ShapeEnv``: the artifact's shape guards miss them, and it silently
computed other values for sizes the cached code was not compiled for (codes
of rows that are not whole groups, a fuzz of 2026-11-30).  Inductor's C++
build cache still serves the compiled kernels (keyed on their source).

Tracing and compiling hold Dynamo's own compile lock: ``make_fx`` sets
process-global state (FX's tracing flag, its patcher) that a second trace in
another thread, Dynamo's included, would clobber; Dynamo serialises its
compiles (and the ``make_fx`` inside them) under that lock.

Only plain calls take this path: every argument a plain tensor, grad and
inference mode off, no autocast, no torch function or dispatch mode, no
functorch transform (see :func:`_plain`).  Everything else, a guard that does
not hold once :data:`MAX_ARTIFACTS` are compiled, and any failure to trace or
compile answer :data:`MISS`: the caller then runs the ``torch.compile`` path,
which guards itself.  So does every call on a torch without the private
internals used here (:func:`supported`); ``standalone_compile``'s
``donate_graph_module`` is passed only where it exists (torch 2.13, not 2.11).

An artifact is itself three wrappers (Dynamo's disable context, AOTAutograd's
``forward`` and its runtime wrapper) around Inductor's compiled graph.  For
the codec bodies (no grad, no mutation, no randomness, no output aliasing an
argument) they add nothing but marks for Dynamo on the outputs, and cost
~10-15 us a call on a small CPU, where a 64 KiB encode's kernels take ~25 us:
where a check at compile time finds the graph's outputs to be the wrapped
call's (:func:`_direct`), calls made while Dynamo's frame callback is not
installed (no compiled function running, or one running the engine's hooks,
which Dynamo runs as plain Python with its callback cleared) call the graph
directly.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import re
from collections.abc import Callable, Iterator
from typing import Any

import torch

try:  # private internals: a torch without them keeps the torch.compile path alone
    from torch.fx.experimental import _config as fx_config
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.fx.experimental.symbolic_shapes import SYMPY_INTERP
except ImportError:  # pragma: no cover - depends on the torch version
    fx_config = make_fx = SYMPY_INTERP = None
try:  # the direct call of an artifact's Inductor graph (see _direct); optional
    from torch._C._dynamo.eval_frame import get_eval_frame_callback
    from torch._inductor.output_code import CompiledFxGraph
except ImportError:  # pragma: no cover - depends on the torch version
    get_eval_frame_callback = CompiledFxGraph = None

__all__ = ["MAX_ARTIFACTS", "MISS", "Standalone"]

log = logging.getLogger(__name__)

#: Returned when no artifact may serve a call.
MISS: Any = object()

#: Artifacts per configuration (one per distinct guard outcome: a size of 1,
#: a padded tail, ...); beyond them the torch.compile path serves the call.
MAX_ARTIFACTS = 4

#: Argument layouts remembered per configuration with the artifact that
#: serves them (or that none does): a training step repeats a few layouts,
#: and a dictionary lookup costs ~1 us where evaluating the guards costs
#: several (see Standalone.__call__).
MAX_LAYOUTS = 256

_dispatch_keys = torch._C._dispatch_keys

# Remembered for a layout no artifact serves once no more may be compiled.
_NONE: Any = object()

# The FX graph cache stores an entry's guards over the graph's SymInt inputs
# alone, and a graph of make_fx has none: a hit would be served with none of
# the guards Inductor added when it compiled the entry (see the module's notes).
_NO_FX_GRAPH_CACHE = {"fx_graph_cache": False}


def _donate_kwargs() -> dict[str, Any]:
    """``donate_graph_module=True`` where ``standalone_compile`` takes it (torch
    2.13): the traced graph is used once, so Inductor may lower it in place.
    torch 2.11's has no such argument and deep-copies the graph instead (the
    copy shares the nodes' fake values, so the ShapeEnv, and its guards, are
    the trace's either way)."""
    compile_fn = getattr(getattr(torch, "_inductor", None), "standalone_compile", None)
    try:
        params = inspect.signature(compile_fn).parameters if compile_fn else {}
    except (TypeError, ValueError):  # pragma: no cover - not introspectable
        params = {}
    return {"donate_graph_module": True} if "donate_graph_module" in params else {}


def supported() -> bool:
    """Whether this torch has the internals the artifacts need (else every
    call takes the ``torch.compile`` path, which guards itself)."""
    return (
        make_fx is not None
        and callable(getattr(getattr(torch, "_inductor", None), "standalone_compile", None))
        and hasattr(getattr(torch._dynamo, "convert_frame", None), "compile_lock")
    )


class _DropArtifactWarning(logging.Filter):
    """standalone_compile warns that it saved no cache artifacts, which it
    cannot without the FX graph cache; artifacts here are never saved."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "artifact generation failed" not in record.getMessage()


_ARTIFACT_WARNING = _DropArtifactWarning()


@contextlib.contextmanager
def _no_artifact_warning() -> Iterator[None]:
    # Under Dynamo's compile lock (see Standalone.__call__): no other
    # standalone compile adds or removes the filter meanwhile.
    logger = logging.getLogger("torch._inductor.standalone_compile")
    logger.addFilter(_ARTIFACT_WARNING)
    try:
        yield
    finally:
        logger.removeFilter(_ARTIFACT_WARNING)


# ``L['t0'].size()`` and its kin in ShapeEnv's guard expressions.
_ACCESS = re.compile(r"L\['t(\d+)'\]\.(size|stride|storage_offset)\(\)")
_LOCAL = {"size": "s", "stride": "d", "storage_offset": "o"}


def _plain() -> bool:
    """Whether the global state is the one artifacts are traced and called
    under: every one of these changes what the body computes or what its
    arguments are, and Dynamo guards each of them."""
    return not (
        torch.is_grad_enabled()
        or torch.is_inference_mode_enabled()
        or torch._C._is_any_autocast_enabled()
        or torch._C._len_torch_function_stack()
        or torch._C._len_torch_dispatch_stack()
        or torch._C._functorch.peek_interpreter_stack() is not None
    )


def _seen(args: tuple) -> tuple | None:
    """What a call's artifact depends on, as one hashable key: the global
    state Dynamo guards (default dtype, deterministic mode), then per
    argument its dtype, device, sizes, strides, storage offset, dispatch
    keys (layout, subclass, conj/neg views, functorch wrappers: the key
    set's bits) and ``requires_grad``; None unless every argument is a
    plain tensor.  The single reader of these: :func:`_facts` is derived."""
    seen: list[Any] = [torch.get_default_dtype(), torch.are_deterministic_algorithms_enabled()]
    for a in args:
        if type(a) is not torch.Tensor:
            return None
        seen += (a.dtype, a.device, a.shape, a.stride(), a.storage_offset(),
                 _dispatch_keys(a).raw_repr(), a.requires_grad)  # fmt: skip
    return tuple(seen)


#: Entries of :func:`_seen` per argument, after its two global ones.
_PER_ARGUMENT = 7


def _facts_of(seen: tuple) -> tuple:
    """What the shape guards do not say about a call, from its :func:`_seen`
    key: everything but the sizes, strides and offsets (the rank stays)."""
    facts = list(seen[:2])
    for i in range(2, len(seen), _PER_ARGUMENT):
        dtype, device, shape, _stride, _offset, keys, grad = seen[i : i + _PER_ARGUMENT]
        facts += (dtype, device, len(shape), keys, grad)
    return tuple(facts)


def _facts(args: tuple) -> tuple | None:
    """What shape guards do not say about the call (hashable); None unless
    every argument is a plain tensor."""
    seen = _seen(args)
    return None if seen is None else _facts_of(seen)


def _guard_function(expr: str | None, n: int) -> Callable[..., bool]:
    """ShapeEnv's guard expression as a compiled function of the ``n``
    arguments.  Each ``L['ti'].size()`` (``stride()``, ``storage_offset()``)
    is read once into a local: the expression repeats them dozens of times,
    and evaluated as printed it costs ~8 us a call."""
    names = [f"t{i}" for i in range(n)]
    if expr is None:
        return lambda *args: True
    used = sorted(set(_ACCESS.findall(expr)))
    body = _ACCESS.sub(lambda m: f"{_LOCAL[m.group(2)]}{m.group(1)}", expr)
    lines = [f"def guard({', '.join(names)}):"]
    lines += [f"    {_LOCAL[what]}{i} = t{i}.{what}()" for i, what in used]
    if "L[" in body:  # an access not rewritten above: keep the name it reads
        lines.append(f"    L = {{{', '.join(f'{k!r}: {k}' for k in names)}}}")
    lines.append(f"    return bool({body})")
    namespace = dict(SYMPY_INTERP)
    exec(compile("\n".join(lines), "<actpack shape guards>", "exec"), namespace)
    return namespace["guard"]


_SUPPORTED = supported()
_DONATE = _donate_kwargs()


def _inductor_graph(fn: Any) -> Any:
    """The one ``CompiledFxGraph`` inside a standalone artifact's wrappers
    (found through their closures: Dynamo's disable context, AOTAutograd's
    ``forward`` and runtime wrapper); None if there is not exactly one."""
    found: list[Any] = []
    stack, seen = [getattr(fn, "_compiled_fn", None)], set()
    while stack and len(seen) < 64:
        f = stack.pop()
        if f is None or id(f) in seen:
            continue
        seen.add(id(f))
        if isinstance(f, CompiledFxGraph):
            found.append(f)
            continue
        for cell in getattr(f, "__closure__", None) or ():
            try:
                value = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            if callable(value) and not isinstance(value, type):
                stack.append(value)
    return found[0] if len(found) == 1 else None


def _storages(outs: Any) -> list[int] | None:
    """Each output's storage address; None unless ``outs`` is a tuple or list
    of plain dense tensors."""
    if not isinstance(outs, (tuple, list)):
        return None
    if any(type(o) is not torch.Tensor or o.layout is not torch.strided for o in outs):
        return None
    return [o.untyped_storage().data_ptr() for o in outs]


def _same_outputs(wrapped: Any, direct: Any, args: tuple) -> bool:
    """Whether ``direct`` holds ``wrapped``'s tensors: as many, each of the same
    dtype, sizes, strides and offset, bit for bit equal, sharing storage
    with each other as ``wrapped``'s do and with no argument."""
    a, b = _storages(wrapped), _storages(direct)
    if a is None or b is None or len(a) != len(b):
        return False
    inputs = {t.untyped_storage().data_ptr() for t in args if t.untyped_storage().nbytes()}
    for i, (w, d) in enumerate(zip(wrapped, direct)):
        if (w.dtype, w.shape, w.stride(), w.storage_offset()) != (
            d.dtype,
            d.shape,
            d.stride(),
            d.storage_offset(),
        ):
            return False
        if d.numel() and (b[i] in inputs or not torch.equal(_bits(w), _bits(d))):
            return False
    share = [[x == y for y in a] for x in a]
    return share == [[x == y for y in b] for x in b]


def _bits(t: torch.Tensor) -> torch.Tensor:
    """``t``'s bytes (NaNs compare equal as bits, unlike values)."""
    flat = t.contiguous().reshape(-1)
    return flat.view(torch.uint8) if flat.dtype != torch.bool else flat


def _direct(fn: Any, args: tuple) -> Callable[[list], Any] | None:
    """The Inductor graph inside artifact ``fn``, to be called on a list of
    the arguments (its single output unwrapped where ``fn`` returns one
    tensor), where that is the same computation as calling ``fn``; else None.

    ``fn`` is Dynamo's disable context around AOTAutograd's ``forward``
    around its runtime wrapper around Inductor's graph: ~10-15 us a call
    on a small CPU, a tenth of a small tensor's encode.  For a body
    without grad, mutation, randomness or aliased outputs the wrappers add
    nothing but Dynamo's dynamic-dimension marks on the outputs (unused:
    build.run marks its arguments itself).  That is checked on the traced
    arguments: the graph mutates no input (Inductor's own record, and no
    argument's version moves), and its outputs are the wrapped call's,
    bit for bit, aliasing nothing the wrapped ones do not.  A body whose
    wrapper regenerates an output as a view of an input fails the check
    (another count, or storage shared with an argument).  Dynamo's disable
    context matters only while a compiled function runs (its frame callback
    would reach Inductor's Python frames), so :meth:`Standalone.__call__`
    calls the graph directly only when no callback is installed."""
    if CompiledFxGraph is None or get_eval_frame_callback is None:
        return None
    graph = _inductor_graph(fn)
    if (
        graph is None
        or getattr(graph, "mutated_inputs", True)
        or not getattr(graph, "_boxed_call", False)
    ):
        return None
    try:
        versions = [a._version for a in args]
        wrapped = fn(*args)
        direct = graph(list(args))
        kind = type(wrapped)  # AOTAutograd returns a list, Inductor's graph a tuple
        if kind is torch.Tensor:  # a body returning one tensor
            wrapped = [wrapped]
        same = type(direct) in (tuple, list) and _same_outputs(list(wrapped), list(direct), args)
        same = same and [a._version for a in args] == versions
    except Exception as exc:  # the wrapped call serves: it is what was checked before
        log.debug("actpack: no direct call of %r (%r)", fn, exc)
        return None
    if not same or kind not in (torch.Tensor, tuple, list):
        return None
    if kind is torch.Tensor:
        return lambda args: graph(args)[0]
    return graph if type(direct) is kind else lambda args: kind(graph(args))


class _Artifact:
    def __init__(
        self, fn: Callable[..., Any], facts: tuple, guard: Callable[..., bool], direct: Any = None
    ) -> None:
        # direct: the Inductor graph inside fn, called with a list (see _direct).
        self.fn, self.facts, self.guard, self.direct = fn, facts, guard, direct


class Standalone:
    """One configuration's standalone artifacts (at most :data:`MAX_ARTIFACTS`)."""

    def __init__(self, body: Callable[..., Any], name: str, options: dict[str, Any]) -> None:
        self.body, self.name, self.options = body, name, options
        self.artifacts: tuple[_Artifact, ...] = ()  # replaced whole: readers need no lock
        self.broken = False  # tracing or compiling failed once: the torch.compile path only
        # _seen(args) (facts and layout) -> the artifact that serves it, or _NONE.  The shape
        # guards are a function of the layout alone (sizes, strides, storage
        # offsets), so a layout they accepted once they accept again.  Dict
        # reads and writes are atomic; a full dict is replaced, not cleared.
        self.layouts: dict[tuple, Any] = {}

    def __call__(self, args: tuple, quiet: Callable[[], Any]) -> Any:
        """The body's result from an artifact whose guards hold for ``args``
        (compiling one if there is room), or :data:`MISS`."""
        if self.broken or not _SUPPORTED or not _plain():
            return MISS
        seen = _seen(args)
        if seen is None:
            return MISS
        artifact = self.layouts.get(seen)
        if artifact is _NONE:
            return MISS
        if artifact is None:
            artifact = self._serving(_facts_of(seen), args, quiet)
            if artifact is not None or len(self.artifacts) >= MAX_ARTIFACTS:
                self._remember(seen, _NONE if artifact is None else artifact)
        if artifact is None:
            return MISS
        try:
            if artifact.direct is not None and get_eval_frame_callback() is None:
                return artifact.direct(list(args))
            return artifact.fn(*args)
        except Exception as exc:  # pragma: no cover - the torch.compile path decides
            log.debug("actpack: standalone %s failed (%r); using torch.compile", self.name, exc)
            self.broken = True
            return MISS

    def _remember(self, seen: tuple, artifact: Any) -> None:
        if len(self.layouts) >= MAX_LAYOUTS:
            self.layouts = {}
        self.layouts[seen] = artifact

    def _serving(self, facts: tuple, args: tuple, quiet: Callable[[], Any]) -> _Artifact | None:
        """An artifact whose guards hold for ``args``, compiled if none does
        and there is room; None if none may serve."""
        artifact = self._find(facts, args)
        if artifact is None:
            lock = getattr(getattr(torch._dynamo, "convert_frame", None), "compile_lock", None)
            if lock is None:  # a torch without it: tracing could race, so never trace
                return None
            with lock:
                artifact = self._find(facts, args)  # another thread may have compiled it
                if artifact is None and len(self.artifacts) < MAX_ARTIFACTS and not self.broken:
                    with quiet():
                        artifact = self._compile(facts, args)
        return artifact

    def _find(self, facts: tuple, args: tuple) -> _Artifact | None:
        for artifact in self.artifacts:
            if artifact.facts == facts:
                try:
                    if artifact.guard(*args):
                        return artifact
                except Exception:  # an expression this call cannot evaluate: no match
                    continue
        return None

    def _compile(self, facts: tuple, args: tuple) -> _Artifact | None:
        try:
            # Sizes that happen to be equal stay distinct symbols, as the
            # dimensions build.run marks dynamic do under Dynamo: duck sizing
            # would guard on the equality, and a batch of 4 rows with 4
            # blocks per row would then serve no other batch size.
            with fx_config.patch(use_duck_shape=False):
                gm = make_fx(self.body, tracing_mode="symbolic")(*args)
            fakes = [n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder"]
            # standalone_compile's "from_graph" takes the fake mode (and so the
            # ShapeEnv holding the trace's guards) from the outputs' example
            # values, as Dynamo's graphs carry them; make_fx writes "val".
            output = next(iter(reversed(gm.graph.nodes)))
            outs = output.args[0]
            for node in [outs] if isinstance(outs, torch.fx.Node) else outs:
                node.meta["example_value"] = node.meta["val"]
            shape_env = fakes[0].fake_mode.shape_env
            with _no_artifact_warning():  # nothing to save: the FX graph cache is off
                fn = torch._inductor.standalone_compile(
                    gm,
                    fakes,
                    dynamic_shapes="from_graph",
                    options={"config_patches": {**self.options, **_NO_FX_GRAPH_CACHE}},
                    **_DONATE,
                )
            # After compiling: Inductor's own guards are in the ShapeEnv now.
            expr = shape_env.produce_guards_expression(fakes, ignore_static=False)
            guard = _guard_function(expr, len(args))
            if not guard(*args):  # the trace's own arguments must pass
                raise RuntimeError(f"shape guards reject the traced arguments: {expr}")
            direct = _direct(fn, args)
        except Exception as exc:  # any failure: the torch.compile path serves this configuration
            log.debug("actpack: no standalone %s (%r); using torch.compile", self.name, exc)
            self.broken = True
            return None
        artifact = _Artifact(fn, facts, guard, direct)
        self.artifacts = (*self.artifacts, artifact)
        return artifact
