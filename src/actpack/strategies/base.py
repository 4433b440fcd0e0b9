"""The strategy interface: encode floating-point tensors saved for backward.

A strategy is a small object with validated knobs.  It never sees autograd:
the engine hands it a tensor plus a :class:`SaveInfo` and keeps whatever
:class:`~actpack.codecs.encoded.Encoded` it returns.
"""

from __future__ import annotations

import itertools
import operator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from actpack.codecs.encoded import Encoded

# Distinct default seeds for strategies made in one process (never shared state:
# each strategy owns its generators).
_instances = itertools.count()


@dataclass(frozen=True)
class SaveInfo:
    """What the engine knows about a tensor being saved."""

    op: str | None = None
    module: str | None = None
    rule: object | None = None
    #: Stable name of this save within a forward ("module/op#n"), for
    #: strategies that keep per-tensor statistics across steps.
    key: str | None = None


def check_seed(seed: object) -> int:
    """``seed`` as an int, or ValueError: an integer (``int``, a NumPy
    integer, a 0-d integer tensor) in [-2**63, 2**64), the range
    ``torch.Generator.manual_seed`` takes (negative seeds as their 64-bit
    two's complement)."""
    try:
        value = None if isinstance(seed, bool) else operator.index(seed)
    except TypeError:
        value = None
    if value is None or not -(2**63) <= value < 2**64:
        raise ValueError(
            "seed must be an integer in [-2**63, 2**64) (torch.Generator.manual_seed's "
            f"range), got {seed!r}"
        )
    return value


def derived_seed(seed: int, offset: int) -> int:
    """The seed of a strategy's inner strategy number ``offset``: ``seed +
    offset`` as ``manual_seed`` reads it (modulo 2**64), so that every valid
    ``seed`` gives valid derived ones."""
    return (seed + offset) % 2**64


class Strategy:
    """Base class: encode floating-point tensors saved for backward.

    Subclasses set ``name`` and implement :meth:`encode`.  ``seed`` makes the
    stochastic rounding reproducible; each strategy owns its generators, so two
    models with their own strategies never share random state.
    """

    name: ClassVar[str] = "base"
    lossless: ClassVar[bool] = False
    #: Whether ``encode`` already keeps ReLU-output zeros exact (no mask bit).
    keeps_relu_exact: ClassVar[bool] = False
    #: Decoded values never leave the range of the values coded (per group,
    #: rounded outward to values exactly representable, as -3 and 3 are):
    #: true of per-group quantization and of casts, not of DIVISION (block
    #: mean plus a residual code).  Hardswish inputs are coded only then.
    bounded_codes: ClassVar[bool] = False
    #: Whether forwards in several threads may use this strategy at once
    #: (False for strategies keeping per-forward statistics).
    thread_safe: ClassVar[bool] = True

    def __init__(self, seed: int | None = None) -> None:
        if seed is None:
            seed = (torch.initial_seed() * 1_000_003 + next(_instances)) % (2**63)
        self.seed = check_seed(seed)
        self._generators: dict[torch.device, torch.Generator] = {}

    def generator(self, device: torch.device) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed)
            self._generators[device] = gen
        return gen

    def __getstate__(self) -> dict[str, Any]:
        # Generators are not picklable; a copy restarts its stream from ``seed``.
        state = dict(self.__dict__)
        state["_generators"] = {}
        return state

    def encode(self, x: Tensor, info: SaveInfo) -> Encoded:  # pragma: no cover - interface
        raise NotImplementedError

    def skip_reason(self, x: Tensor) -> str | None:
        """Why this strategy leaves ``x`` as it is (None: it encodes ``x``)."""
        return None

    def saved_again(self, encoded: Encoded, info: SaveInfo) -> None:
        """Called when ``info.op`` saves a tensor this forward already encoded.

        The engine shares the first encoding (``encoded``, possibly wrapped);
        strategies that track which ops read a tensor (mixed precision) use it.
        """

    def begin_forward(self) -> None:
        """Called when a compressed forward starts (before any save)."""

    def end_forward(self) -> None:
        """Called when a compressed forward ends."""

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed = check_seed(state["seed"])
        self._generators.clear()

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Exact(Strategy):
    """Keeps every tensor as autograd would; only accounts bytes."""

    name = "none"
    lossless = True

    def encode(self, x: Tensor, info: SaveInfo) -> Encoded:
        raise AssertionError("the engine never encodes under a lossless strategy")
