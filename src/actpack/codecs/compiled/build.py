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
* No result depends on how Inductor rounds a bfloat16/float16
  intermediate: the outward rounding of the group ranges is exact float32
  and int32 arithmetic (:func:`~actpack.codecs.compiled.arith.round_out`).
  ``emulate_precision_casts`` is still set; torch 2.13 honours it in its C++
  backend, torch 2.11 does not (it dropped the ``.to(bfloat16).float()``
  round trip the rounding once relied on, and lo/hi differed).
* Each configuration is checked once per process against the reference on
  a probe (``check``; :func:`_verify`): a torch whose Inductor computes
  other codes falls back to the reference, with one warning, instead of
  silently departing from the specification.

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
import logging
import threading
import types
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

from actpack.codecs.compiled.standalone import MISS, Standalone

__all__ = ["MAX_NUMEL", "CompileFallbackWarning", "NumericsFallbackWarning", "available", "run"]

log = logging.getLogger(__name__)

# Larger tensors take the reference codecs: a bound kept from the first hash,
# which read 32-bit indices; nothing here has been run at that size.
MAX_NUMEL = 2**32

# Inductor options for every codec compile.  The arithmetic of the bodies is
# written so that it needs none of them to equal the reference (no low-precision
# round trip, no product added to a sum: see arith.py), but the C++ flags are
# pinned anyway against environment overrides (TORCHINDUCTOR_CPP_ENABLE_*):
# contraction into FMA and unsafe-math reassociation change float32 results.
_OPTIONS = {
    "emulate_precision_casts": True,
    "cpp.enable_floating_point_contract_flag": "off",
    "cpp.enable_unsafe_math_opt_flag": False,
}


class CompileFallbackWarning(RuntimeWarning):
    """A fused CPU codec could not be compiled; the reference codecs run instead."""


class NumericsFallbackWarning(CompileFallbackWarning):
    """A fused CPU codec compiled, but its codes differ from the reference's on
    the verification probe (this torch's Inductor rounds otherwise): the
    reference codecs run instead."""


class _Compiled:
    """One configuration's compiled body; ``fn`` is None once compiling it failed
    or its results failed verification."""

    def __init__(self, factory: Callable[..., Callable[..., Any]], key: tuple) -> None:
        self.name = f"{factory.__name__}{key}"
        self.warm = False  # compiled and run once
        self.verified = False  # its check passed (see _verify)
        self.lock = threading.Lock()
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


def run(
    factory: Callable[..., Callable[..., Any]],
    key: tuple,
    args: tuple,
    check: Callable[[], bool] | None = None,
) -> Any:
    """``factory(*key)(*args)`` compiled, or None if it cannot be compiled or
    fails verification (then the caller runs the reference).

    ``check``: run once per configuration and process before its first
    result is used (:func:`_verify`); it returns whether the compiled codec
    gives the reference's codes on a probe of that configuration.

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
    if check is not None and not compiled.verified and not _verify(compiled, check):
        return None
    if compiled.fn is None:  # the check's call found the body cannot compile (warned then)
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


# The configurations whose check this thread is running: the check's own calls
# of the codec (on its probe) must run the compiled body, unverified.
_checking = threading.local()
_numerics_warned = False


def _verify(compiled: _Compiled, check: Callable[[], bool]) -> bool:
    """Whether ``compiled`` may serve calls: ``check()`` passed, run once.

    The specification is the reference codecs, and Inductor's numerics are
    not (torch 2.11 elided a bfloat16 round trip that 2.13 keeps): each
    configuration's codes are compared with the reference's, bit for bit, on
    a small probe holding the hard cases (ties, meta rounding, subnormals,
    saturation, non-finite values, tail groups) before its first result is
    used.  A mismatch, or an error in the check, leaves the configuration on
    the reference for good, with one :class:`NumericsFallbackWarning` per
    process.  Other threads wait on the configuration's lock meanwhile.
    """
    global _numerics_warned
    active = getattr(_checking, "active", ())
    if compiled in active:  # the check's own call
        return True
    with compiled.lock:
        if compiled.verified or compiled.fn is None:
            return compiled.verified
        _checking.active = (*active, compiled)
        try:
            ok, why = bool(check()), "codes differ from the reference's on the probe"
        except Exception as exc:  # a failing check must not make the codec trusted
            ok, why = False, f"the check failed: {type(exc).__name__}: {exc}"
        finally:
            _checking.active = active
        if not ok:
            compiled.fn = None
            log.debug("actpack: compiled codec %s not used: %s", compiled.name, why)
            if not _numerics_warned:
                _numerics_warned = True
                warnings.warn(
                    f"actpack's fused CPU codec {compiled.name} does not reproduce the reference "
                    f"codecs under torch {torch.__version__} ({why[:300]}); it and every "
                    "configuration that fails the same check run the reference codecs instead, "
                    "correct but slower. ACTPACK_BACKEND=reference silences this.",
                    NumericsFallbackWarning,
                    stacklevel=5,
                )
        compiled.verified = ok
    return ok


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
