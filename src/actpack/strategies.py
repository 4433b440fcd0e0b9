"""Strategies decide how each saved floating-point tensor is encoded.

A strategy is a small object with validated knobs.  It never sees autograd:
the engine hands it a tensor plus a :class:`SaveInfo` and keeps whatever
:class:`~actpack.encoded.Encoded` it returns.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from actpack.codec.backend import division_encode, quantize_groups
from actpack.encoded import Cast, Dual, Encoded, Groups
from actpack.exactness import ReluOutput

# Ops whose 3-D inputs are (N, C, L) maps rather than (N, L, D) sequences.
_CHANNEL_FIRST_OPS = frozenset(
    {
        "conv1d", "conv_transpose1d", "conv2d", "conv_transpose2d", "conv3d",
        "conv_transpose3d", "max_pool1d", "avg_pool1d", "batch_norm", "instance_norm",
        "group_norm", "adaptive_avg_pool1d", "adaptive_max_pool1d",
    }
)  # fmt: skip

# Ops normalizing each row of the last dimension (per token).  Their backward
# multiplies a row's input error by that row's 1/std, so one quantization
# range must not span rows of different scale (a cls token among patches).
_ROW_NORM_OPS = frozenset({"layer_norm", "native_layer_norm", "rms_norm", "_fused_rms_norm"})

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

    def __init__(self, seed: int | None = None) -> None:
        if seed is None:
            seed = (torch.initial_seed() * 1_000_003 + next(_instances)) % (2**63)
        self.seed = int(seed)
        self._generators: dict[torch.device, torch.Generator] = {}

    def generator(self, device: torch.device) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed)
            self._generators[device] = gen
        return gen

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
        self.seed = int(state["seed"])
        self._generators.clear()

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Exact(Strategy):
    """Keeps every tensor as autograd would; only accounts bytes."""

    name = "none"
    lossless = True

    def encode(self, x: Tensor, info: SaveInfo) -> Encoded:
        raise AssertionError("the engine never encodes under a lossless strategy")


class Cast16(Strategy):
    """Stores fp32 tensors in a 16-bit float type; narrower inputs pass unchanged.

    fp16 overflows to inf above 65504: such values become non-finite, never
    silently finite, so an AMP step that overflows is still skipped.
    """

    def __init__(self, dtype: torch.dtype = torch.bfloat16, seed: int | None = None) -> None:
        super().__init__(seed)
        if dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"Cast16 dtype must be torch.float16 or torch.bfloat16, got {dtype}")
        self.dtype = dtype
        self.name = "fp16" if dtype == torch.float16 else "bf16"

    def skip_reason(self, x: Tensor) -> str | None:
        return "already 16-bit" if x.element_size() <= 2 else None

    def encode(self, x: Tensor, info: SaveInfo) -> Encoded:
        return Cast(x.to(self.dtype), x.dtype)

    def __repr__(self) -> str:
        return f"Cast16(dtype={self.dtype})"


def _check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 1..8, got {bits!r}")
    return bits


def _rows(x: Tensor) -> int:
    return x.shape[0] if x.dim() >= 2 and x.shape[0] > 0 else 1


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
    levels instead (:class:`~actpack.mixed.ActNNPreset` for L0-L2,
    :class:`~actpack.mixed.ActNNMixed` for L3-L5; other keywords go to them).

    Example::

        with actpack.compress(actpack.ActNN(bits=2)):
            loss = model(x).sum()
        loss.backward()
    """

    name = "actnn"
    keeps_relu_exact = True

    def __new__(cls, *args: Any, level: str | None = None, **kwargs: Any) -> ActNN:
        # ActNN(level="L0".."L5"): optimization-level presets (actpack.mixed).
        if level is None or cls is not ActNN:
            return super().__new__(cls)
        from actpack.mixed import level_class  # lazy: actpack.mixed imports this module

        return super().__new__(level_class(level))

    def __init__(
        self,
        bits: int = 2,
        group_size: int = 256,
        stochastic: bool = True,
        seed: int | None = None,
    ) -> None:
        super().__init__(seed)
        self.bits = _check_bits(bits)
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
        self.group_size = group_size
        self.stochastic = bool(stochastic)
        if self.bits == 1:
            self.keeps_relu_exact = False  # zero-exact codes need at least 2 bits

    def _grouping(self, x: Tensor, info: SaveInfo) -> tuple[int, int]:
        """(rows, group size): groups never span two samples, nor two
        normalized rows of a LayerNorm/RMSNorm input."""
        g = self.group_size
        d = x.shape[-1] if x.dim() >= 2 else 0
        if info.op in _ROW_NORM_OPS and d and d % g:
            return x.numel() // d, -(-d // -(-d // g))
        rows = _rows(x)
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


class Division(Strategy):
    """DIVISION dual precision: block means in bf16, the residual in ``bits`` bits.

    Maps (N, C, *S) are split into non-overlapping ``block_size`` blocks along
    each spatial dimension (partial edge blocks are averaged exactly).  The
    block means (low-frequency component) are kept in bf16; the residual
    (high-frequency component) is quantized per (sample, channel) with
    unbiased stochastic rounding.  Sequences (N, L, D) use blocks of tokens
    (``sequence="tokens"``, the paper's T5 variant) or of features
    (``sequence="features"``, its MLP variant); (N, D) inputs use features.
    Tensors of other ranks fall back to per-group quantization at ``bits``.

    Example::

        model = actpack.wrap(model, actpack.Division(block_size=8, bits=2))
    """

    name = "division"

    def __init__(
        self,
        block_size: int = 8,
        bits: int = 2,
        sequence: str = "tokens",
        stochastic: bool = True,
        seed: int | None = None,
    ) -> None:
        super().__init__(seed)
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
        if sequence not in ("tokens", "features"):
            raise ValueError(f"sequence must be 'tokens' or 'features', got {sequence!r}")
        self.block_size = block_size
        self.bits = _check_bits(bits)
        self.sequence = sequence
        self.stochastic = bool(stochastic)
        self._fallback = ActNN(bits=bits, stochastic=stochastic, seed=self.seed + 1)

    def _layout(self, x: Tensor, info: SaveInfo) -> tuple[Tensor, tuple[int, ...] | None] | None:
        """View ``x`` as (N, C, *S); the permutation used, or None if no layout fits."""
        if info.op in _ROW_NORM_OPS and x.dim() >= 2:
            # Blocks of features, one residual range per token (see _ROW_NORM_OPS).
            return x.reshape(x.shape[0], -1, x.shape[-1]), None
        if x.dim() in (4, 5):
            return x, None
        if x.dim() == 3:
            if info.op in _CHANNEL_FIRST_OPS or self.sequence == "features":
                return x, None
            return x.permute(0, 2, 1), (0, 2, 1)  # blocks of tokens, one range per feature
        if x.dim() == 2:
            return x.unsqueeze(1), None
        return None

    def encode(self, x: Tensor, info: SaveInfo) -> Encoded:
        layout = self._layout(x, info)
        if layout is None:
            return self._fallback.encode(x, SaveInfo(info.op, info.module))
        view, perm = layout
        code = division_encode(
            view,
            self.block_size,
            self.bits,
            stochastic=self.stochastic,
            generator=self.generator(x.device) if self.stochastic else None,
        )
        return Dual(code, perm, x.shape, x.dtype)

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._fallback.load_state_dict({"seed": self.seed + 1})

    def __repr__(self) -> str:
        return (
            f"Division(block_size={self.block_size}, bits={self.bits}, "
            f"sequence={self.sequence!r}, stochastic={self.stochastic})"
        )


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
    "actnn-mixed": lambda: _mixed(),
}

STRATEGY_NAMES: tuple[str, ...] = tuple(_NAMED)


def _mixed() -> Strategy:
    from actpack.mixed import ActNNMixed  # lazy: actpack.mixed imports this module

    return ActNNMixed()


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
    raise TypeError(f"strategy must be a name or a Strategy, got {type(strategy).__name__}")
