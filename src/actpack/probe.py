"""Running a model only to measure it: the loss it is reduced to, and no side effects on RNG.

:func:`actpack.measure` and :func:`actpack.gradient_noise` run extra forward
and backward passes the user did not ask to train with; these helpers keep
those passes from changing what the user's training run does next.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor

__all__ = ["default_loss", "preserved_rng"]


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
