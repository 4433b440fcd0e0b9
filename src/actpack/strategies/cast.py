"""Casts to a 16-bit float type."""

from __future__ import annotations

import torch
from torch import Tensor

from actpack.codecs.encoded import Cast, Encoded
from actpack.strategies.base import SaveInfo, Strategy


class Cast16(Strategy):
    """Stores fp32 tensors in a 16-bit float type; narrower inputs pass unchanged.

    fp16 overflows to inf above 65504: such values become non-finite, never
    silently finite, so an AMP step that overflows is still skipped.
    """

    bounded_codes = True  # rounding to nearest never leaves the range

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
