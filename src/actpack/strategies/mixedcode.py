"""Containers :class:`~actpack.ActNNMixed` and the ActNN levels keep for saved tensors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from actpack.codecs.backend import dequantize_groups
from actpack.codecs.encoded import Encoded, tensor_bytes
from actpack.codecs.groupquant import GroupCode

__all__ = ["Kept", "MixedGroups"]


@dataclass
class MixedGroups(Encoded):
    """Rows of a tensor quantized at several widths.

    ``parts`` holds ``(rows, code)`` pairs: ``rows`` an int32 tensor of the
    row indices the code covers (None: all rows).  When the packed data were
    swapped to host memory, ``parts`` is None and ``swap`` restores them.
    """

    parts: list | None
    rows: int
    cols: int
    shape: torch.Size
    dtype: torch.dtype
    layout: list | None = None  # (has_rows, bits, zero_exact, rows, cols, group_size) per part
    swap: Any = None  # SwapItem holding the packed tensors in host memory
    bytes_: int = 0
    key: str | None = None  # the strategy's statistics entry
    swap_ref: Any = None  # (SwapList, index) for prefetching

    @property
    def nbytes(self) -> int:
        if self.parts is None:
            return self.bytes_
        return sum(c.nbytes + (tensor_bytes(i) if i is not None else 0) for i, c in self.parts)

    @property
    def bits(self) -> list[tuple[int, int]]:
        """(bits, rows) of each part."""
        if self.layout is not None:
            return [(p[1], p[3]) for p in self.layout]
        return [(c.bits, c.rows) for _, c in self.parts]

    def tensors(self) -> list[Tensor]:
        out = []
        for idx, code in self.parts:
            if idx is not None:
                out.append(idx)
            out += [code.packed, code.lo, code.hi]
        return out

    def detach_parts(self) -> list[Tensor]:
        """Hand the packed tensors over (for swapping) and keep only their layout."""
        self.bytes_ = self.nbytes
        self.layout = [
            (i is not None, c.bits, c.zero_exact, c.rows, c.cols, c.group_size)
            for i, c in self.parts
        ]
        tensors = self.tensors()
        self.parts = None
        return tensors

    def _rebuild(self, tensors: list[Tensor]) -> list:
        parts, it = [], iter(tensors)
        for has_rows, bits, zex, rows, cols, gs in self.layout:
            idx = next(it) if has_rows else None
            packed, lo, hi = next(it), next(it), next(it)
            parts.append((idx, GroupCode(packed, lo, hi, rows, cols, gs, bits, zex)))
        return parts

    def decode(self) -> Tensor:
        parts = self.parts if self.swap is None else self._rebuild(self.swap.fetch())
        if len(parts) == 1 and parts[0][0] is None:
            return dequantize_groups(parts[0][1], self.dtype).reshape(self.shape)
        code0 = parts[0][1]
        out = torch.empty(self.rows, self.cols, dtype=self.dtype, device=code0.lo.device)
        for idx, code in parts:
            out.index_copy_(0, idx.long(), dequantize_groups(code, self.dtype))
        return out.reshape(self.shape)


@dataclass
class Kept(Encoded):
    """The saved tensor itself, unchanged (what autograd would have kept).

    Like autograd, restoring it after an in-place change raises.
    """

    data: Tensor
    version: int

    @property
    def nbytes(self) -> int:
        return tensor_bytes(self.data)

    def decode(self) -> Tensor:
        if self.data._version != self.version:
            raise RuntimeError(
                "actpack: a tensor saved for backward (kept exact) was modified by an "
                "in-place operation"
            )
        return self.data
