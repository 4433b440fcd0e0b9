"""Keep Dynamo out of the eager engine's hooks.

While a ``torch.compile``'d function runs, Dynamo's frame callback stays
installed for the code it leaves to eager mode (after a graph break, a frame
it skipped, ``torch.utils.checkpoint`` it could not trace: HF T5 under
``Trainer(torch_compile=True, gradient_checkpointing=True)``).  An op there
calls the saved-tensor hooks and the ``TorchFunctionMode`` that names ops
from C++, and each of their Python frames reached that callback: Dynamo
compiled the eager engine's pack hook frame by frame on fake tensors
(graph breaks at ``sys._getframe``, ``functools.lru_cache`` ignored,
``StorageWeakRef`` objects made on fakes dying with "Exception ignored in
StorageWeakRef.__del__" tracebacks, a recompilation per shape and op until
``recompile_limit``; under ``"none"`` a weak reference to the forward's
state stored as the state itself, and backward failed with "'_Forward'
object is not callable"), and compiled each op of those regions alone
through the op tracker's frame.

:func:`eager_only` marks a function's code so that Dynamo's callback runs it,
and everything it calls, as plain Python (what ``torch.compiler.disable``
does, set on the code itself: no wrapper call per save, and nothing at all
when no compiled code is running).  A
``torch.compile``'d function called inside (the fused CPU codecs) still runs
compiled: it installs its own callback.  Dynamo *tracing* a compiled region
inlines what it calls and never consults this mark; the hooks AOTAutograd
inlines are traced by ``make_fx``, not by Dynamo.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

try:  # torch >= 2.6 (a C module: importing it imports neither Dynamo nor Triton)
    from torch._C._dynamo.eval_frame import (
        _FrameAction,
        _FrameExecStrategy,
        set_code_exec_strategy,
    )
except ImportError:  # older torch: its Dynamo may trace the hooks (slower, not wrong)
    set_code_exec_strategy = None


def eager_only(fn: F) -> F:
    """Mark ``fn`` (a function, or a method's function) never to be compiled
    by Dynamo, nor anything it calls; returns ``fn`` itself."""
    if set_code_exec_strategy is not None:
        skip = _FrameAction.SKIP
        set_code_exec_strategy(fn.__code__, _FrameExecStrategy(skip, skip))
    return fn
