"""ActNN with token-row groups, wider codes where noise matters most, Hadamard rotation.

Why: on small transformers, 2-bit ActNN with groups of 256 contiguous
elements moves the loss of 50-step runs by 0.7-3.9% where int8 stays within
0.05% (``benchmarks/transformer_parity.py``; figures in BENCHMARKS.md,
"Transformers").  The causes, each measured there:

* groups straddle tokens whose scales differ (a 352-wide MLP row shares
  groups with its neighbours), so a large token sets the range of a small
  one.  Groups here follow the rows of the last dimension (tokens of a
  (…, L, D) sequence): one range per row, or per ``~group_size`` slice of a
  wide row, or per ``k`` whole rows when a row is shorter than
  ``min_group`` (a head's 16-32 features), so the 32 bits of range per group
  stay below ~0.25 bits per element;
* the inputs of matmuls (Linear, attention) carry most of the gradient
  noise (their weight gradient ``dY^T X`` reads them directly), and the
  inputs of LayerNorm/RMSNorm spread theirs to every earlier layer (the
  input gradient reads ``x_hat``): these get ``sensitive_bits`` (3 by
  default: 5.4x less variance than 2 bits);
* outlier features set a whole row's range: ``rotate="hadamard"`` rotates
  Linear inputs by a randomized Hadamard transform first
  (:mod:`actpack.codecs.hadamard`), row by row, only where that shrinks the
  row's range;
* per-token statistics computed in Python (the ``rsqrt`` of HF Llama's
  RMSNorm, shape (…, L, 1)) shared one range per 256 tokens: they are kept
  exact, at 1/width of the activations' size.

Tensors of convolutional maps (4-D/5-D, or saved by a channel-first op)
keep ActNN's contiguous groups, so CNNs are coded as by :class:`ActNN`.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import ClassVar

from torch import Tensor

from actpack.codecs.backend import hadamard_encode, quantize_groups
from actpack.codecs.encoded import Copy, Encoded, Groups, Rotated
from actpack.policy.ops import CHANNEL_FIRST_OPS, ROW_NORM_OPS
from actpack.policy.rules import ReluOutput
from actpack.strategies.actnn import ActNN, as_int, check_bits, check_int
from actpack.strategies.base import SaveInfo

__all__ = ["ATTENTION_OPS", "LINEAR_OPS", "SENSITIVE_OPS", "RowActNN", "row_groups"]

#: Ops whose saved inputs enter backward linearly, as a matmul operand
#: (``dW = dY^T X``): unbiased codes of them give unbiased weight gradients.
LINEAR_OPS = frozenset({"linear", "addmm", "mm", "matmul", "bmm", "baddbmm", "addbmm", "einsum"})
#: Fused attention ops: they save q, k, v (matmul operands) and, on some
#: paths (CPU with dropout, ``nn.MultiheadAttention``), the attention
#: probabilities, which must keep exact zeros and stay non-negative: codes
#: without rotation (zeros at a group's minimum are coded exactly).
ATTENTION_OPS = frozenset(
    {"scaled_dot_product_attention", "multi_head_attention_forward",
     # aten names the compile-native path reports
     "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
     "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention"}
)  # fmt: skip
#: Ops whose saved inputs get ``sensitive_bits``.
SENSITIVE_OPS = LINEAR_OPS | ATTENTION_OPS | ROW_NORM_OPS


def row_groups(rows: int, cols: int, group_size: int, min_group: int) -> tuple[int, int]:
    """(rows merged per group row, group size) for a (rows, cols) matrix.

    A row of at least ``min_group`` elements is cut into ``ceil(cols /
    group_size)`` near-equal groups.  Shorter rows are merged ``k`` at a
    time (``k`` the largest power of two with ``k * cols <= group_size``
    that divides ``rows``), one group per ``k`` rows.
    """
    if cols >= min_group or rows <= 1:
        n = -(-cols // group_size)
        return 1, -(-cols // n)
    k = 1
    while k * 2 * cols <= group_size and rows % (k * 2) == 0:
        k *= 2
    return k, k * cols


class RowActNN(ActNN):
    """Per-group stochastic quantization with groups along token rows.

    Args:
        bits: code width of the other tensors, 1..8.
        sensitive_bits: code width of tensors saved by matmul-like ops
            (:data:`LINEAR_OPS`), fused attention (:data:`ATTENTION_OPS`) and
            row normalizations (LayerNorm, RMSNorm).
        rotate: ``"hadamard"`` rotates the inputs of :data:`LINEAR_OPS` by a
            randomized Hadamard transform before quantizing (rows whose range
            it does not shrink stay unrotated); ``None`` never rotates.
        block: Hadamard block, a power of two.
        group_size: most elements per group along a row.
        min_group: rows shorter than this are merged into groups.
        stochastic, seed: as for :class:`ActNN`.

    Raises ValueError for an invalid knob.

    Example::

        with actpack.compress(actpack.RowActNN(bits=2, sensitive_bits=3)):
            loss = model(x).sum()
    """

    name = "actnn-rows"
    #: Ops whose rows never share a range.  A normalization's backward scales
    #: each row's error by that row's own 1/std: a small-scale row (a ViT's
    #: cls token among patches) sharing a range with larger ones made the
    #: ViT's gradient variance ~3000x the squared gradient (BENCHMARKS.md).
    alone_ops: ClassVar[Collection[str]] = ROW_NORM_OPS
    #: Ops whose inputs may be Hadamard-rotated: matmul operands only.  A
    #: rotated code leaves the value range (a rotated probability can decode
    #: negative, and cross-entropy's log of it is clamped: biased).
    rotate_ops: ClassVar[Collection[str]] = LINEAR_OPS

    def __init__(
        self,
        bits: int = 2,
        sensitive_bits: int = 3,
        rotate: str | None = "hadamard",
        block: int = 64,
        group_size: int = 256,
        min_group: int = 128,
        stochastic: bool = True,
        seed: int | None = None,
    ) -> None:
        super().__init__(bits=bits, group_size=group_size, stochastic=stochastic, seed=seed)
        self.sensitive_bits = check_bits(sensitive_bits, "sensitive_bits")
        if rotate not in (None, "hadamard"):
            raise ValueError(f"rotate must be None or 'hadamard', got {rotate!r}")
        self.rotate = rotate
        n = as_int(block)
        if n is None or n < 1 or n & (n - 1):
            raise ValueError(f"block must be a power of two >= 1, got {block!r}")
        self.block = n
        self.min_group = check_int("min_group", min_group, 1)
        if min(bits, sensitive_bits) < 2:
            self.keeps_relu_exact = False  # zero-exact codes need at least 2 bits

    def _rowwise(self, x: Tensor, info: SaveInfo) -> bool:
        if x.dim() < 2 or x.shape[-1] == 0 or info.op in CHANNEL_FIRST_OPS:
            return False
        return x.dim() <= 3 or info.op in LINEAR_OPS or info.op in ATTENTION_OPS

    def bits_for(self, info: SaveInfo) -> int:
        """The code width of a tensor saved by ``info.op``."""
        return self.sensitive_bits if info.op in SENSITIVE_OPS else self.bits

    def row_layout(self, x: Tensor, info: SaveInfo) -> tuple[int, int] | None:
        """(group rows, group size) of ``x``'s row code: ``x`` is coded as the
        (group rows, numel / group rows) matrix; None where ``x`` is not coded
        by rows (conv maps, 1-D and per-row statistics: see :meth:`encode`).
        The compile-native path (:mod:`actpack.engine.graphcodes`) codes by
        the same layout."""
        if not self._rowwise(x, info) or x.shape[-1] == 1:
            return None
        cols = x.shape[-1]
        rows = x.numel() // cols
        alone = info.op in self.alone_ops
        k, group = row_groups(rows, cols, self.group_size, 1 if alone else self.min_group)
        return rows // k, group

    def encode(self, x: Tensor, info: SaveInfo) -> Encoded:
        bits = self.bits_for(info)
        if not self._rowwise(x, info):
            return self.quantize(x, info, bits)
        if x.shape[-1] == 1:
            # One number per row: a per-token statistic such as the rsqrt of a
            # Python RMSNorm (HF Llama), whose backward reads it cubed.  Coded
            # in groups of 256 tokens it shifted a Llama run's loss (ablation
            # "actnn-rows-grouped-stats" in BENCHMARKS.md).  A copy, not the
            # tensor: a (..., 1) slice may view a much larger storage.
            return Copy(x.clone())
        layout = self.row_layout(x, info)
        assert layout is not None
        group_rows, group = layout
        x2 = x.reshape(group_rows, -1)
        gen = self.generator(x.device)  # the rotation's signs even when rounding to nearest
        relu = isinstance(info.rule, ReluOutput)
        if self.rotate and info.op in self.rotate_ops and not relu:
            code = hadamard_encode(
                x2,
                bits,
                self.block,
                group,
                adaptive=True,
                stochastic=self.stochastic,
                generator=gen,
            )
            return Rotated(code, x.shape, x.dtype)
        code = quantize_groups(
            x2,
            bits,
            group,
            stochastic=self.stochastic,
            generator=gen,
            zero_exact=relu and bits >= 2,
        )
        return Groups(code, x.shape, x.dtype)

    def __repr__(self) -> str:
        return (
            f"RowActNN(bits={self.bits}, sensitive_bits={self.sensitive_bits}, "
            f"rotate={self.rotate!r}, "
            f"block={self.block}, group_size={self.group_size}, min_group={self.min_group}, "
            f"stochastic={self.stochastic})"
        )
