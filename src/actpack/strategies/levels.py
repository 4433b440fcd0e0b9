"""ActNN optimization levels L0-L2 (L3-L5 are :class:`~actpack.ActNNMixed`)."""

from __future__ import annotations

from torch import Tensor

from actpack.codecs.encoded import Encoded
from actpack.strategies.actnn import ActNN, parse_level
from actpack.strategies.base import SaveInfo
from actpack.strategies.mixedcode import Kept

__all__ = ["LEVELS", "NORM_OPS", "ActNNPreset", "parse_level"]

#: Optimization levels of the reference implementation, as actpack runs them.
LEVELS: dict[str, str] = {
    "L0": "no lossy compression: floats kept exact, bool masks in 1 bit",
    "L1": "4-bit per-group quantization; inputs of normalization layers kept exact",
    "L2": "4-bit per-group quantization of every saved float tensor",
    "L3": "mixed precision, 2 bits per element on average",
    "L4": "L3 + packed data swapped to pinned CPU memory (CUDA), prefetched for backward",
    "L5": "L4 + pinned host arena reused across steps + expandable CUDA segments",
}

#: Normalization ops whose inputs L1 keeps exact.
NORM_OPS = frozenset(
    {"batch_norm", "layer_norm", "group_norm", "instance_norm", "rms_norm",
     "local_response_norm"}
)  # fmt: skip


class ActNNPreset(ActNN):
    """ActNN optimization levels L0-L2 (built by ``actpack.ActNN(level="L1")``).

    * ``L0``: nothing lossy: float tensors are kept exactly as autograd keeps
      them (bool masks are still stored in 1 bit, losslessly); gradients are
      bit-identical to plain autograd.
    * ``L1``: 4-bit per-group quantization, but tensors saved by
      normalization ops (:data:`NORM_OPS`, matched on ``SaveInfo.op``) kept
      exact.
    * ``L2``: 4-bit per-group quantization of every saved float tensor.
    """

    levels = (0, 1, 2)  # what ActNN(level=...) builds with this class

    def __init__(
        self,
        level: str = "L2",
        group_size: int = 256,
        stochastic: bool = True,
        seed: int | None = None,
    ) -> None:
        n = parse_level(level)
        if n > 2:
            raise ValueError(f"ActNNPreset covers L0-L2; use actpack.ActNN(level='L{n}')")
        super().__init__(bits=4, group_size=group_size, stochastic=stochastic, seed=seed)
        self.level = f"L{n}"
        self.name = f"actnn-l{n}"
        self.lossless = n == 0
        self.keep_ops = NORM_OPS if n == 1 else frozenset()

    def encode(self, x: Tensor, info: SaveInfo) -> Encoded:
        if info.op in self.keep_ops:
            return Kept(x, x._version)
        return super().encode(x, info)

    def __repr__(self) -> str:
        return (
            f"ActNN(level={self.level!r}, group_size={self.group_size}, "
            f"stochastic={self.stochastic})"
        )
