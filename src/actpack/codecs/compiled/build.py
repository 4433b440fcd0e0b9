"""Compile a codec body once per configuration; fall back to the reference.

A *body* is a plain PyTorch function (``x, seed, ...`` tensors in, tensors
out) whose configuration (bit width, dtypes, flags, block sizes) is bound in
a closure by a *factory*.  :func:`run` compiles ``factory(*key)`` with
TorchInductor on first use and calls it.

Three details keep compilations few and results exact:

* Every dimension of every tensor argument is marked dynamic, so one
  compilation serves every shape (sizes 0 and 1 aside), and the bodies take
  sizes as tensor dimensions, never as int arguments.  Everything else is
  static (``dynamic=False``): the closure's integers become constants, so
  Inductor's loops divide by constants, which it vectorises.  Dynamo's
  default would turn an integer dynamic once it changes, and it tracks that
  per function name and line, across configurations: a bit width then
  became symbolic, and Inductor miscompiled ``mask << (bits * i)``.
* Dynamo keeps its compiled graphs per code object and gives up (runs the
  function uncompiled) after ``recompile_limit`` graphs.  Every closure made
  by one factory shares a code object, so each configuration gets a copy of
  the body's code object of its own: its graphs then only vary with shape
  facts (a size of 1, a padded tail), a handful at most.
* ``emulate_precision_casts`` makes Inductor round every bfloat16/float16
  intermediate as eager PyTorch does; without it the outward rounding of the
  group ranges is skipped and lo/hi differ from the reference.

Calls whose arguments the guards of a standalone artifact accept skip
Dynamo altogether (:mod:`actpack.codecs.compiled.standalone`: ~15 us a
call); the ``torch.compile`` path serves every other call.

When a body cannot be compiled (no C++ compiler, an Inductor error) the
wrapper warns once with :class:`CompileFallbackWarning` and every later call
with that configuration runs the reference instead: never an error.
"""

from __future__ import annotations

import contextlib
import functools
import types
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

from actpack.codecs.compiled.standalone import MISS, Standalone

__all__ = ["MAX_NUMEL", "CompileFallbackWarning", "available", "run"]

# Larger tensors take the reference codecs: a bound kept from the first hash,
# which read 32-bit indices; nothing here has been run at that size.
MAX_NUMEL = 2**32

_OPTIONS = {"emulate_precision_casts": True}


class CompileFallbackWarning(RuntimeWarning):
    """A fused CPU codec could not be compiled; the reference codecs run instead."""


class _Compiled:
    """One configuration's compiled body; ``fn`` is None once compiling it failed."""

    def __init__(self, factory: Callable[..., Callable[..., Any]], key: tuple) -> None:
        self.name = f"{factory.__name__}{key}"
        self.warm = False  # compiled and run once
        body = factory(*key)
        code = body.__code__.replace()  # a distinct code object: graphs of its own
        fresh = types.FunctionType(code, body.__globals__, body.__name__, None, body.__closure__)
        self.standalone = Standalone(body, self.name, _OPTIONS)
        try:
            with _quiet_torch():  # torch.compile imports Inductor on first use
                self.fn: Callable[..., Any] | None = torch.compile(
                    fresh, dynamic=False, options=_OPTIONS
                )
        except Exception as exc:  # a torch without Inductor, a rejected option
            self.fn = None
            _warn(self.name, exc)


@functools.cache
def _compiled(factory: Callable[..., Callable[..., Any]], key: tuple) -> _Compiled:
    return _Compiled(factory, key)


def _warn(what: str, exc: BaseException) -> None:
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    warnings.warn(
        f"actpack could not compile the fused CPU codec {what} ({type(exc).__name__}: "
        f"{reason}); the reference codecs run instead, correct but slower. If no C++ "
        "compiler is installed, install gcc/g++ for TorchInductor; ACTPACK_BACKEND=reference "
        "silences this.",
        CompileFallbackWarning,
        stacklevel=4,
    )


@contextlib.contextmanager
def _quiet_torch() -> Iterator[None]:
    """Deprecation notices that torch's compiler stack emits while it imports
    and compiles (``torch.jit.script_method``, ...) are torch's business, not
    the user's: ignored, so that ``-W error`` does not turn them into a
    compile failure.  Used around ``torch.compile`` and the first call of
    each configuration only (when importing and compiling happen):
    ``catch_warnings`` swaps process-global filters, which a per-call use
    would race on in threaded training."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        # Inductor's note that a fused loop mixes bfloat16 and float16 (a
        # float16 input with bfloat16 group ranges): informational.
        warnings.filterwarnings("ignore", "bf16 and fp16 are mixed", UserWarning)
        yield


def _keep(x: Any) -> Any:
    return x


def run(factory: Callable[..., Callable[..., Any]], key: tuple, args: tuple) -> Any:
    """``factory(*key)(*args)`` compiled, or None if it cannot be compiled
    (then the caller runs the reference).

    Dynamo guards every compiled function on the innermost saved-tensor
    hooks when they are ``GraphModule``s (the pair AOTAutograd would inline),
    and the codecs run inside such a pair: each engine's, from its pack hook.
    A new ``compress()`` context per step would then recompile every codec
    (0.7 s a step) until Dynamo's recompile limit and run them uncompiled
    after it.  Under a plain-function pair (saving nothing: the codecs run
    without grad) the guard sees no inlineable hooks, whichever engine runs.
    """
    if torch.compiler.is_compiling():
        # Called while Dynamo traces a user's compiled region (a block compiled
        # inside a wrapped model): the reference traces into that graph, a
        # nested compiled call would not.  Not a failure: later eager calls
        # still use the compiled codec.
        return None
    if torch.get_default_dtype() is not torch.float32:
        # The bodies create their constants in the default dtype; the codes
        # are specified (and compiled, and tested) with float32 constants.
        return None
    compiled = _compiled(factory, key)
    if compiled.fn is None:
        return None
    out = compiled.standalone(args, _quiet_torch)
    if out is not MISS:
        return out
    try:
        with torch.autograd.graph.saved_tensors_hooks(_keep, _keep):
            if compiled.warm:
                return compiled.fn(*(_dynamic(a) for a in args))
            with _quiet_torch():
                out = compiled.fn(*(_dynamic(a) for a in args))
        compiled.warm = True
        return out
    except Exception as exc:  # compilation failed: any error type, never the caller's
        compiled.fn = None
        _warn(compiled.name, exc)
        return None


def _dynamic(arg: Any) -> Any:
    """A tensor argument as a fresh view with every dimension marked dynamic
    (the mark is an attribute: the caller's tensor stays untouched)."""
    if not isinstance(arg, torch.Tensor) or arg.dim() == 0:
        return arg
    view = arg.view(arg.shape)
    torch._dynamo.maybe_mark_dynamic(view, list(range(view.dim())))
    return view


def _probe_body(x: torch.Tensor) -> torch.Tensor:
    return (x * 3 + 1).to(torch.uint8)


@functools.cache
def available() -> bool:
    """Whether TorchInductor compiles and runs a small CPU function (checked once).

    Warns once (:class:`CompileFallbackWarning`) when it does not, e.g. when no
    C++ compiler is installed.
    """
    try:
        with _quiet_torch():
            fn = torch.compile(_probe_body, dynamic=True, options=_OPTIONS)
            x = torch.arange(37, dtype=torch.float32)
            ok = torch.equal(fn(x), _probe_body(x))
    except Exception as exc:  # any failure means: do not use the compiled codecs
        _warn("probe", exc)
        return False
    if not ok:
        warnings.warn(
            "actpack's compiled probe returned a wrong result; the reference codecs run instead",
            CompileFallbackWarning,
            stacklevel=2,
        )
    return ok
