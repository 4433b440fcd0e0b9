"""DIVISION dual activation precision (Wang et al., ICML 2023)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from actpack.codecs.backend import division_encode
from actpack.codecs.encoded import Dual, Encoded
from actpack.policy.ops import CHANNEL_FIRST_OPS, ROW_NORM_OPS
from actpack.strategies.actnn import ActNN, check_bits
from actpack.strategies.base import SaveInfo, Strategy


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
        self.bits = check_bits(bits)
        self.sequence = sequence
        self.stochastic = bool(stochastic)
        self._fallback = ActNN(bits=bits, stochastic=stochastic, seed=self.seed + 1)

    def _layout(self, x: Tensor, info: SaveInfo) -> tuple[Tensor, tuple[int, ...] | None] | None:
        """View ``x`` as (N, C, *S); the permutation used, or None if no layout fits."""
        if info.op in ROW_NORM_OPS and x.dim() >= 2:
            # Blocks of features, one residual range per token (see ROW_NORM_OPS).
            return x.reshape(x.shape[0], -1, x.shape[-1]), None
        if x.dim() in (4, 5):
            return x, None
        if x.dim() == 3:
            if info.op in CHANNEL_FIRST_OPS or self.sequence == "features":
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
