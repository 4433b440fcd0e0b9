"""Running a model only to measure it: the loss it is reduced to, and no side effects
on its buffers or the RNG.

:func:`actpack.measure` and :func:`actpack.gradient_noise` run extra forward
and backward passes the user did not ask to train with; these helpers keep
those passes from changing what the user's training run does next.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import AbstractContextManager
from typing import Any, Callable

import torch
from torch import Tensor, nn

__all__ = [
    "buffer_restorer",
    "compile_wrappers",
    "default_loss",
    "eager_behind",
    "eager_calls",
    "preserved_rng",
]


def default_loss(output: Any) -> Tensor:
    """The scalar a model's ``output`` is reduced to when no ``loss_fn`` is given.

    * An object with a tensor ``loss`` (a HuggingFace ``ModelOutput`` called
      with ``labels=``, a dict with a ``"loss"`` key): that loss.  A
      ``ModelOutput`` is an ``OrderedDict``; summing its values would add the
      logits to the loss (GPT-2: -884.6 instead of 6.93).
    * A tensor: the sum of its elements in fp32.
    * A tuple, list or mapping: the sum of the above over its tensor items.

    Raises ``TypeError`` when nothing in ``output`` is a tensor.
    """
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    if isinstance(loss, Tensor):
        return loss
    if isinstance(output, Tensor):
        return output.float().sum()
    if isinstance(output, Mapping):
        items = list(output.values())
    else:
        items = list(output) if isinstance(output, (tuple, list)) else []
    parts = [o.float().sum() for o in items if isinstance(o, Tensor)]
    if parts:
        return sum(parts[1:], parts[0])
    raise TypeError(
        f"cannot reduce a model output of type {type(output).__name__} to a loss; "
        "pass loss_fn= (a function from the output to a scalar tensor)"
    )


def preserved_rng(tensors: Iterable[Any]) -> AbstractContextManager:
    """Context that restores the CPU and CUDA random states on exit.

    The CUDA devices are those of the tensors in ``tensors`` (the model's
    inputs and parameters), so dropout drawn inside does not advance the
    generators the user's training run draws from next.
    """
    devices = sorted(
        {
            t.device.index if t.device.index is not None else torch.cuda.current_device()
            for t in tensors
            if isinstance(t, Tensor) and t.device.type == "cuda"
        }
    )
    return torch.random.fork_rng(devices=devices)


def buffer_restorer(model: nn.Module) -> Callable[[], None]:
    """A function that puts back the values ``model``'s buffers hold now.

    Only buffers whose values changed (BatchNorm's running statistics after
    a training-mode step) are written, through ``.data``, whose version is
    its own, as BatchNorm's kernel updates them: a backward still pending
    on the model (whose BatchNorm holds its running statistics, unread in
    training mode) runs after the restore.  Parameters are never written, so
    their versions stay as they are.  A buffer's version is no guide to a
    change: BatchNorm's kernel does not bump it.  Costs one copy of the
    buffers, not of the weights.
    """
    saved = [(b, b.detach().clone()) for b in model.buffers()]

    def restore() -> None:
        with torch.no_grad():
            for buffer, value in saved:
                if not torch.equal(buffer, value):
                    buffer.data.copy_(value)

    return restore


def compile_wrappers(model: nn.Module) -> list[nn.Module]:
    """The ``torch.compile`` wrappers (``OptimizedModule``) among ``model``'s
    modules, ``model`` first if it is one."""
    return [m for m in model.modules() if type(m).__name__ == "OptimizedModule"]


def eager_behind(model: nn.Module) -> nn.Module | None:
    """The eager module a ``torch.compile`` wrapper runs (``model._orig_mod``),
    or None if ``model`` is not such a wrapper."""
    inner = getattr(model, "_orig_mod", None)
    if type(model).__name__ == "OptimizedModule" and isinstance(inner, nn.Module):
        return inner
    return None


@contextlib.contextmanager
def eager_calls(model: nn.Module, caller: str) -> Iterator[None]:
    """Run the modules of ``model`` compiled in place (``nn.Module.compile``)
    eagerly for the duration, with a warning; they are compiled again after.

    ``nn.Module.compile`` keeps the module's class and routes its calls
    through ``_compiled_call_impl``: saves inside its graphs are packed in the
    graphs, where :func:`actpack.measure`'s counters do not reach (it read 0
    bytes), and their codes draw rounding noise from torch's default
    generator, which :func:`actpack.gradient_noise` re-seeds for every draw
    (every draw repeated: variance 0).  The eager forward is what both can
    measure.  Not thread-safe: another thread calling the model meanwhile
    runs it eagerly too.
    """
    compiled = [m for m in model.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    if compiled:
        warnings.warn(
            f"{caller}: {len(compiled)} module(s) of the model are compiled in place "
            "(nn.Module.compile); measuring them eagerly (saves inside compiled graphs "
            "cannot be counted, and their rounding noise repeats across draws)",
            stacklevel=4,
        )
    saved = [(m, m._compiled_call_impl) for m in compiled]
    try:
        for m, _ in saved:
            m._compiled_call_impl = None
        yield
    finally:
        for m, impl in saved:
            m._compiled_call_impl = impl
