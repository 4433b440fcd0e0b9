"""ActNN per-group stochastic quantization (Chen et al., ICML 2021)."""

from __future__ import annotations

import inspect
from typing import Any

from torch import Tensor

from actpack.codecs.backend import quantize_groups
from actpack.codecs.encoded import Encoded, Groups
from actpack.policy.ops import ROW_NORM_OPS
from actpack.policy.rules import ReluOutput
from actpack.strategies.base import SaveInfo, Strategy


def check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 1..8, got {bits!r}")
    return bits


def check_stochastic(stochastic: bool) -> bool:
    """``stochastic`` if it is a bool; ValueError otherwise ('no' or 0.5 would read as True)."""
    if not isinstance(stochastic, bool):
        raise ValueError(f"stochastic must be True or False, got {stochastic!r}")
    return stochastic


def rows_of(x: Tensor) -> int:
    return x.shape[0] if x.dim() >= 2 and x.shape[0] > 0 else 1


def parse_level(level: Any) -> int:
    """0..5 from ``"L3"``, ``"l3"``, ``"actnn-L3"`` or ``3``; ValueError otherwise."""
    text = str(level).strip().upper()
    if text.startswith("ACTNN-"):
        text = text[6:]
    if text.startswith("L"):
        text = text[1:]
    if not (text.isdigit() and 0 <= int(text) <= 5) or isinstance(level, bool):
        raise ValueError(f"level must be one of L0..L5, got {level!r}")
    return int(text)


def _check_level_knobs(sub: type, level: Any, kwargs: dict[str, Any]) -> None:
    """Raise TypeError, naming ``ActNN(level=...)`` rather than the class it
    builds, for keywords the level's strategy does not take."""
    params = inspect.signature(sub.__init__).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    skip = ("self", "level")
    knobs = [n for n, p in params.items() if n not in skip and p.kind is not p.VAR_POSITIONAL]
    unknown = [k for k in kwargs if k not in params or k in skip]
    if unknown:
        raise TypeError(
            f"ActNN(level={level!r}) does not take {', '.join(map(repr, unknown))}: the level "
            f"sets it; its knobs are {', '.join(knobs)} (or use ActNN(bits=...) without a level)"
        )


class ActNN(Strategy):
    """ActNN: per-group stochastic quantization of every saved tensor.

    Each sample (first dimension) is flattened and split into groups of
    ``group_size`` elements; each group stores its min and max in 16 bits
    and every element in ``bits`` bits, rounded stochastically so the decoded
    tensor is unbiased.  ReLU outputs keep zeros exact at no extra bit.

    Args:
        bits: bits per element, 1..8.
        group_size: elements per quantization group (>= 1).
        stochastic: unbiased stochastic rounding (``False``: round to nearest).
        seed: seed of this strategy's own random generators.

    ``ActNN(level="L0")`` .. ``ActNN(level="L5")`` build ActNN's optimization
    levels instead (:class:`~actpack.strategies.mixed.ActNNPreset` for L0-L2,
    :class:`~actpack.strategies.mixed.ActNNMixed` for L3-L5; other keywords go to them).

    Example::

        with actpack.compress(actpack.ActNN(bits=2)):
            loss = model(x).sum()
        loss.backward()
    """

    name = "actnn"
    keeps_relu_exact = True
    bounded_codes = True

    def __new__(cls, *args: Any, level: str | None = None, **kwargs: Any) -> ActNN:
        # ActNN(level="L0".."L5") builds the subclass that declares that level
        # (levels.ActNNPreset, mixed.ActNNMixed).  Looking the subclasses up
        # instead of importing them keeps this module free of import cycles.
        if level is None or cls is not ActNN:
            return super().__new__(cls)
        wanted = parse_level(level)
        stack = list(ActNN.__subclasses__())
        while stack:
            sub = stack.pop()
            if wanted in getattr(sub, "levels", ()):
                _check_level_knobs(sub, level, kwargs)
                return super().__new__(sub)
            stack.extend(sub.__subclasses__())
        raise ValueError(f"no strategy implements ActNN level L{wanted}; import actpack first")

    def __init__(
        self,
        bits: int = 2,
        group_size: int = 256,
        stochastic: bool = True,
        seed: int | None = None,
    ) -> None:
        super().__init__(seed)
        self.bits = check_bits(bits)
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
        self.group_size = group_size
        self.stochastic = check_stochastic(stochastic)
        if self.bits == 1:
            self.keeps_relu_exact = False  # zero-exact codes need at least 2 bits

    def _grouping(self, x: Tensor, info: SaveInfo) -> tuple[int, int]:
        """(rows, group size): groups never span two samples, nor two
        normalized rows of a LayerNorm/RMSNorm input."""
        g = self.group_size
        d = x.shape[-1] if x.dim() >= 2 else 0
        if info.op in ROW_NORM_OPS and d and d % g:
            return x.numel() // d, -(-d // -(-d // g))
        rows = rows_of(x)
        if (x.numel() // rows) % g and rows > 1:
            # Samples shorter than a group (F.linear's (tokens, features) view)
            # would each pad their last group: quantize them as one row.
            return 1, g
        return rows, g

    def quantize(self, x: Tensor, info: SaveInfo, bits: int) -> Groups:
        rows, group_size = self._grouping(x, info)
        zero_exact = isinstance(info.rule, ReluOutput) and bits >= 2
        code = quantize_groups(
            x.reshape(rows, -1),
            bits,
            group_size,
            stochastic=self.stochastic,
            generator=self.generator(x.device) if self.stochastic else None,
            zero_exact=zero_exact,
        )
        return Groups(code, x.shape, x.dtype)

    def encode(self, x: Tensor, info: SaveInfo) -> Encoded:
        return self.quantize(x, info, self.bits)

    def __repr__(self) -> str:
        return (
            f"ActNN(bits={self.bits}, group_size={self.group_size}, stochastic={self.stochastic})"
        )


class Int8(ActNN):
    """8-bit per-group quantization (a near-lossless baseline)."""

    name = "int8"

    def __init__(self, group_size: int = 256, stochastic: bool = True, seed: int | None = None):
        super().__init__(bits=8, group_size=group_size, stochastic=stochastic, seed=seed)

    def __repr__(self) -> str:
        return f"Int8(group_size={self.group_size}, stochastic={self.stochastic})"
