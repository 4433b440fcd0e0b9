"""The strategy interface: encode floating-point tensors saved for backward.

A strategy is a small object with validated knobs.  It never sees autograd:
the engine hands it a tensor plus a :class:`SaveInfo` and keeps whatever
:class:`~actpack.codecs.encoded.Encoded` it returns.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from actpack.codecs.encoded import Encoded
from actpack.strategies.seeds import check_seed, process_rank, rank_seed

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


def seed_of(strategy: object, state: object) -> int:
    """The checked ``seed`` of a state dict given to ``strategy.load_state_dict``;
    TypeError for a state that is not a mapping, ValueError for one without a
    valid ``seed``."""
    name = type(strategy).__name__
    if not isinstance(state, Mapping):
        raise TypeError(
            f"{name}.load_state_dict expects a dict from state_dict(), got {type(state).__name__}"
        )
    if "seed" not in state:
        raise ValueError(
            f"{name}.load_state_dict: the state has no 'seed' (keys: {sorted(state)}); pass "
            "what strategy.state_dict() returned"
        )
    return check_seed(state["seed"])


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
        #: Generator states loaded by load_state_dict, by device name, set on
        #: each device's generator when it is made.
        self._rng_pending: dict[str, Tensor] = {}

    def generator(self, device: torch.device) -> torch.Generator:
        """The generator of the rounding noise on ``device`` (made on first use)."""
        gen = self._generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            # Each rank of a distributed job its own stream (rank 0: the seed
            # itself), though every rank was seeded alike: see seeds.rank_seed.
            gen.manual_seed(rank_seed(self.seed, process_rank()))
            state = self._rng_pending.pop(str(device), None)
            if state is not None:
                gen.set_state(state)
            self._generators[device] = gen
        return gen

    def __getstate__(self) -> dict[str, Any]:
        # Generators are not picklable: a copy (or an unpickled strategy)
        # holds their states and continues their streams, as a deep copy of
        # a torch.Generator (and ActNNMixed's copies) do.
        state = dict(self.__dict__)
        state["_generators"] = {}
        state["_rng_pending"] = self._generator_states()
        state.pop("_wrapped_by", None)  # a copy serves no wrapped model yet
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state.setdefault("_rng_pending", {})  # pickled before the field existed
        self.__dict__.update(state)

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
        """``seed``, and the state of each device's generator (``rng``, CPU
        uint8 tensors by device name) with the rank that drew it
        (``rng_rank``): a run resumed from it continues the noise stream
        instead of replaying its first steps' noise."""
        return {"seed": self.seed, "rng": self._generator_states(), "rng_rank": process_rank()}

    def _generator_states(self) -> dict[str, Tensor]:
        """Each device's generator state by device name: the live generators',
        and the loaded states of devices not drawn on yet."""
        return {**self._rng_pending, **{str(d): g.get_state() for d, g in self._generators.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load a :meth:`state_dict`: the seed, and the generators' states if
        the state was saved on this rank (rank 0's checkpoint loaded on every
        rank: the other ranks start from their rank seeds, see
        :mod:`actpack.strategies.seeds`).  A state without ``rng`` (saved
        before 2026-12-03) starts the streams from the seed."""
        self.seed = seed_of(self, state)
        self._generators.clear()
        self._rng_pending = {}
        if int(state.get("rng_rank", 0)) == process_rank():
            self._rng_pending = {d: s.clone() for d, s in state.get("rng", {}).items()}

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Exact(Strategy):
    """Keeps every tensor as autograd would; only accounts bytes."""

    name = "none"
    lossless = True

    def encode(self, x: Tensor, info: SaveInfo) -> Encoded:
        raise AssertionError("the engine never encodes under a lossless strategy")
