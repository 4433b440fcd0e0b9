"""Strategies by name: ``actpack.compress("actnn")`` and friends."""

from __future__ import annotations

from typing import Any

import torch

from actpack.strategies.actnn import ActNN, Int8
from actpack.strategies.base import Exact, Strategy
from actpack.strategies.cast import Cast16
from actpack.strategies.division import Division
from actpack.strategies.mixed import ActNNMixed
from actpack.strategies.rows import RowActNN

_NAMED: dict[str, Any] = {
    "none": Exact,
    "fp16": lambda: Cast16(torch.float16),
    "bf16": lambda: Cast16(torch.bfloat16),
    "int8": Int8,
    "actnn": ActNN,
    "division": Division,
    "actnn-l0": lambda: ActNN(level="L0"),
    "actnn-l1": lambda: ActNN(level="L1"),
    "actnn-l2": lambda: ActNN(level="L2"),
    "actnn-l3": lambda: ActNN(level="L3"),
    "actnn-l4": lambda: ActNN(level="L4"),
    "actnn-l5": lambda: ActNN(level="L5"),
    "actnn-mixed": ActNNMixed,
    "actnn-rows": RowActNN,
}

STRATEGY_NAMES: tuple[str, ...] = tuple(_NAMED)

#: The strategy of :func:`actpack.compress`, :func:`actpack.wrap`,
#: :func:`actpack.measure`, :func:`actpack.gradient_noise` and the CLI when
#: none is named: ActNN with token-row groups and 3-bit matmul, attention and
#: norm inputs.  On CNNs it codes as ``"actnn"``; on small transformers it
#: kept 50-step losses within 1% of exact training where ``"actnn"`` did not
#: (README, "Choosing a strategy"; BENCHMARKS.md, "Transformers").
DEFAULT_STRATEGY = "actnn-rows"


def resolve(strategy: str | Strategy) -> Strategy:
    """A strategy object from a name or an object (returned as is)."""
    if isinstance(strategy, Strategy):
        return strategy
    if isinstance(strategy, str):
        factory = _NAMED.get(strategy.lower())
        if factory is None:
            raise ValueError(
                f"unknown strategy {strategy!r}; valid names: {', '.join(STRATEGY_NAMES)} "
                "(or pass a Strategy object such as actpack.ActNN(bits=4))"
            )
        return factory()
    if isinstance(strategy, type) and issubclass(strategy, Strategy):
        raise TypeError(
            f"strategy must be a name or a Strategy object, got the class {strategy.__name__}; "
            f"pass an instance: actpack.{strategy.__name__}()"
        )
    raise TypeError(f"strategy must be a name or a Strategy, got {type(strategy).__name__}")
