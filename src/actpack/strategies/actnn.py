"""ActNN per-group stochastic quantization (Chen et al., ICML 2021)."""

from __future__ import annotations

import inspect
import numbers
import operator
from typing import Any

import torch
from torch import Tensor

from actpack.codecs.backend import quantize_groups
from actpack.codecs.encoded import Encoded, Groups
from actpack.policy.ops import ROW_NORM_OPS
from actpack.policy.rules import ReluOutput
from actpack.strategies.base import SaveInfo, Strategy


def as_int(value: Any) -> int | None:
    """``value`` as a plain ``int`` if it is an integer: an ``int``, a NumPy
    integer or a 0-d integer tensor (what ``operator.index`` takes); None for
    anything else, bools (``True`` is no width) and floats (``2.0`` included)
    among them."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return None
    if isinstance(value, Tensor) and (
        value.dim() != 0 or value.dtype.is_floating_point or value.dtype == torch.bool
    ):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def check_int(name: str, value: Any, low: int = 1, high: int | None = None) -> int:
    """``value`` as a plain ``int`` in ``low..high`` (see :func:`as_int`), or
    ValueError naming ``name``."""
    n = as_int(value)
    if n is None or n < low or (high is not None and n > high):
        if high is not None:
            want = f"an integer in {low}..{high}"
        else:
            want = {0: "a non-negative integer", 1: "a positive integer"}.get(
                low, f"an integer >= {low}"
            )
        raise ValueError(f"{name} must be {want}, got {value!r}")
    return n


def check_real(name: str, value: Any) -> float:
    """``value`` as a plain ``float`` if it is a real number (``int``,
    ``float``, a NumPy number, a 0-d tensor); ValueError naming ``name`` for
    anything else (bools, strings such as ``"0.5"``).  The range is the
    caller's to check (NaN fails every range test)."""
    if isinstance(value, Tensor):
        ok = value.dim() == 0 and not value.dtype.is_complex and value.dtype != torch.bool
        if ok:
            return float(value.item())
    elif isinstance(value, numbers.Real) and not (
        isinstance(value, bool) or type(value).__name__ == "bool_"
    ):
        return float(value)
    raise ValueError(f"{name} must be a real number, got {value!r}")


def check_bits(bits: Any, name: str = "bits") -> int:
    """``bits`` as a plain ``int`` in 1..8 (NumPy integers and 0-d integer
    tensors included), or ValueError."""
    return check_int(name, bits, 1, 8)


def check_stochastic(stochastic: bool) -> bool:
    """``stochastic`` if it is a bool; ValueError otherwise ('no' or 0.5 would read as True)."""
    if not isinstance(stochastic, bool):
        raise ValueError(f"stochastic must be True or False, got {stochastic!r}")
    return stochastic


def rows_of(x: Tensor) -> int:
    return x.shape[0] if x.dim() >= 2 and x.shape[0] > 0 else 1


def parse_level(level: Any) -> int:
    """0..5 from ``"L3"``, ``"l3"``, ``"actnn-L3"`` or ``3`` (also a NumPy
    integer or a 0-d integer tensor); ValueError otherwise."""
    number = None if isinstance(level, str) else as_int(level)
    text = str(level if number is None else number).strip().upper()
    if text.startswith("ACTNN-"):
        text = text[6:]
    if text.startswith("L"):
        text = text[1:]
    if not (text.isdigit() and 0 <= int(text) <= 5) or isinstance(level, bool):
        raise ValueError(f"level must be one of L0..L5, got {level!r}")
    return int(text)


def _check_level_knobs(sub: type, level: Any, kwargs: dict[str, Any], positional: int = 0) -> None:
    """Raise TypeError, naming ``ActNN(level=...)`` rather than the class it
    builds, for keywords the level's strategy does not take (``positional``:
    how many of them were ActNN's positional arguments)."""
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
            + (
                "; ActNN's positional arguments are bits, group_size, stochastic, seed: pass "
                "a level's knobs by keyword"
                if positional
                else ""
            )
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

    Integer knobs also take NumPy integers and 0-d integer tensors (stored as
    ``int``); bools and floats (``2.0`` included) raise ValueError.

    ``ActNN(level="L0")`` .. ``ActNN(level="L5")`` build ActNN's optimization
    levels instead (:class:`~actpack.strategies.mixed.ActNNPreset` for L0-L2,
    :class:`~actpack.strategies.mixed.ActNNMixed` for L3-L5; other keywords go to them,
    by keyword: positional arguments are ``bits, group_size, stochastic, seed``,
    and the level sets ``bits``, so a TypeError).  ``ActNN(level=None)`` is ``ActNN()``.

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
        if args:
            # Positional arguments are ActNN's (bits, group_size, stochastic,
            # seed): ActNN(4, level="L3") is ActNN(bits=4, level="L3"), refused
            # below as that is (it read as the level's first knob, budget=4,
            # or clashed with ActNNPreset's level).
            names = list(inspect.signature(ActNN.__init__).parameters)[1:]
            if len(args) > 4:
                raise TypeError(
                    f"ActNN() takes at most 4 positional arguments ({', '.join(names[:4])}), "
                    f"{len(args)} were given"
                )
            kwargs = {**dict(zip(names, args)), **kwargs}
        stack = list(ActNN.__subclasses__())
        while stack:
            sub = stack.pop()
            if wanted in getattr(sub, "levels", ()):
                _check_level_knobs(sub, level, kwargs, len(args))
                return super().__new__(sub)
            stack.extend(sub.__subclasses__())
        raise ValueError(f"no strategy implements ActNN level L{wanted}; import actpack first")

    def __init__(
        self,
        bits: int = 2,
        group_size: int = 256,
        stochastic: bool = True,
        seed: int | None = None,
        *,
        level: None = None,
    ) -> None:
        # level: ActNN(level=None) is ActNN() (other levels are dispatched by
        # __new__ to the subclass that implements them).
        if level is not None:
            raise TypeError(f"{type(self).__name__}() takes no level; use actpack.ActNN(level=...)")
        super().__init__(seed)
        self.bits = check_bits(bits)
        self.group_size = check_int("group_size", group_size, 1)
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
