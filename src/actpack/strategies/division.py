"""DIVISION dual activation precision (Wang et al., ICML 2023)."""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from actpack.codecs.backend import division_encode
from actpack.codecs.encoded import Dual, Encoded
from actpack.policy.ops import CHANNEL_FIRST_OPS, ROW_NORM_OPS
from actpack.strategies.actnn import ActNN, check_bits, check_int, check_stochastic
from actpack.strategies.base import SaveInfo, Strategy
from actpack.strategies.rows import ATTENTION_OPS, LINEAR_OPS, RowActNN
from actpack.strategies.seeds import check_seed, derived_seed


class Division(Strategy):
    """DIVISION dual precision: block means in bf16, the residual in ``bits`` bits.

    Maps (N, C, *S) are split into non-overlapping ``block_size`` blocks along
    each spatial dimension (partial edge blocks are averaged exactly).  The
    block means (low-frequency component) are kept in bf16; the residual
    (high-frequency component) is quantized per (sample, channel) with
    unbiased stochastic rounding.  Per row that costs a bfloat16 mean per
    block and a bfloat16 range (16 bits each); maps where that metadata
    would exceed 8 bits per element (1x1 and 2x2 maps, 1-D maps of under 6
    elements for one block) are coded with per-group ActNN at ``bits``.

    Raises ValueError for a ``block_size`` that is not a positive integer,
    ``bits`` outside 1..8, an unknown ``sequence``, a non-bool
    ``stochastic`` or a ``seed`` that ``torch.Generator.manual_seed``
    cannot take.

    Inputs that are not spatial maps (sequences (N, L, D), (N, D) rows,
    attention's (N, heads, L, d) tensors) are coded by default
    (``sequence="rows"``) with :class:`~actpack.strategies.rows.RowActNN` at
    ``bits`` (``bits + 1`` for matmul, attention and norm inputs): one range per
    token row, Linear inputs Hadamard-rotated.  The
    block-mean model fails there: on small Llama/GPT-2/``nn.TransformerEncoder``
    language models, blocks of 8 tokens gave gradient variances of 600-74000
    times the squared gradient norm (BENCHMARKS.md, "Transformers").  The
    paper's variants remain: ``sequence="tokens"`` (blocks of tokens, its T5
    variant) and ``"features"`` (blocks of features, its MLP variant), with
    (N, D) inputs in blocks of features and other ranks per-group quantized.

    Example::

        model = actpack.wrap(model, actpack.Division(block_size=8, bits=2))
    """

    name = "division"

    def __init__(
        self,
        block_size: int = 8,
        bits: int = 2,
        sequence: str = "rows",
        stochastic: bool = True,
        seed: int | None = None,
    ) -> None:
        super().__init__(seed)
        block_size = check_int("block_size", block_size, 1)
        if sequence not in ("rows", "tokens", "features"):
            raise ValueError(f"sequence must be 'rows', 'tokens' or 'features', got {sequence!r}")
        self.block_size = block_size
        self.bits = check_bits(bits)
        self.sequence = sequence
        self.stochastic = check_stochastic(stochastic)
        self._fallback = ActNN(bits=bits, stochastic=stochastic, seed=derived_seed(self.seed, 1))
        # Non-spatial inputs: actnn-rows, with its extra bit for sensitive inputs
        # (at 2 bits everywhere the ViT's short-run loss was +2.3% off exact).
        self._rows = RowActNN(
            bits=bits,
            sensitive_bits=min(bits + 1, 8),
            stochastic=stochastic,
            seed=derived_seed(self.seed, 2),
        )

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

    def _spatial(self, x: Tensor, info: SaveInfo) -> bool:
        """Whether ``x`` is a map DIVISION's block means model: (N, C, *S) of a
        channel-first op (convolution, pooling, BatchNorm) or of any op but
        matmuls, attention and row normalizations at rank 4-5."""
        if info.op in CHANNEL_FIRST_OPS:
            return x.dim() >= 3
        if info.op in LINEAR_OPS or info.op in ATTENTION_OPS or info.op in ROW_NORM_OPS:
            return False
        return x.dim() in (4, 5)

    def encode(self, x: Tensor, info: SaveInfo) -> Encoded:
        if self.sequence == "rows" and not self._spatial(x, info):
            return self._rows.encode(x, info)
        layout = self._layout(x, info)
        if layout is None:
            return self._fallback.encode(x, SaveInfo(info.op, info.module))
        view, perm = layout
        if not self._light_metadata(view.shape[2:]):
            return self._fallback.encode(x, SaveInfo(info.op, info.module))
        code = division_encode(
            view,
            self.block_size,
            self.bits,
            stochastic=self.stochastic,
            generator=self.generator(x.device) if self.stochastic else None,
        )
        return Dual(code, perm, x.shape, x.dtype)

    def _light_metadata(self, spatial: tuple[int, ...]) -> bool:
        """Whether a (sample, channel) row of a map of ``spatial`` sizes holds
        at most 8 bits of metadata per element (a bfloat16 mean per block and
        a bfloat16 range, 16 bits each).  Smaller rows (1x1 maps of
        squeeze-and-excitation blocks and of heads after global pooling, 2x2
        maps, 1-D maps of under 6 elements) are coded with per-group ActNN
        instead (``bits`` per element and 32 bits per group of 256): under
        DIVISION a 1x1 map cost 50 bits per element, more than float32."""
        elements = math.prod(spatial)
        blocks = math.prod(-(-s // self.block_size) for s in spatial)
        return 16 * (blocks + 2) <= 8 * elements

    def state_dict(self) -> dict[str, Any]:
        """As :meth:`Strategy.state_dict`, with the inner ActNN codes' states
        (``fallback``: maps of heavy metadata, ``rows``: token rows)."""
        return {
            **super().state_dict(),
            "fallback": self._fallback.state_dict(),
            "rows": self._rows.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        # Inner seeds follow the seed (a state of an older version, or one a
        # fork gave a new seed, holds no inner states).
        for inner, offset, key in ((self._fallback, 1, "fallback"), (self._rows, 2, "rows")):
            derived = {"seed": derived_seed(self.seed, offset)}
            given = state.get(key)
            fits = (
                isinstance(given, dict)
                and "seed" in given
                and check_seed(given["seed"]) == derived["seed"]
            )
            inner.load_state_dict(given if fits else derived)

    def __repr__(self) -> str:
        return (
            f"Division(block_size={self.block_size}, bits={self.bits}, "
            f"sequence={self.sequence!r}, stochastic={self.stochastic})"
        )
