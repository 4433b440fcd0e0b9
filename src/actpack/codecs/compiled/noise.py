"""Uniform noise for stochastic rounding inside a compiled codec.

``torch.rand`` cannot take the strategy's generator inside a compiled graph
(Inductor replaces it with its own seeds), so the fused codecs draw one seed
from the caller's generator outside the graph and hash it with each element's
flat index.  The hash is Chris Wellons' ``lowbias32`` (a 32-bit integer
finaliser with full avalanche), written with int64 tensor operations whose
products stay within int64 so that no step relies on signed overflow.

``u`` lies on the 2**-24 grid of [0, 1), like ``torch.rand``.  Each element's
``u`` is exactly uniform over the seed (the hash is a bijection of
``index ^ seed``), which is what unbiased rounding needs; neighbouring
elements are decorrelated by the avalanche.  Indices are taken modulo 2**32:
the fused codecs are only used for tensors with fewer elements.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["MAX_NUMEL", "draw_seed", "uniform"]

MAX_NUMEL = 2**32  # distinct counters; larger tensors use the reference
_M32 = 0xFFFFFFFF


def draw_seed(device: torch.device, generator: torch.Generator | None) -> Tensor:
    """A one-element int64 seed in [0, 2**32) drawn from ``generator``."""
    return torch.randint(0, 2**32, (1,), generator=generator, device=device, dtype=torch.int64)


def _mul32(h: Tensor, c: int) -> Tensor:
    """``h * c mod 2**32`` for ``h`` in [0, 2**32): ``c`` as a signed 32-bit
    constant (``c - 2**32`` when ``c >= 2**31``, the same modulo 2**32), so the
    product's magnitude stays below 2**63."""
    return (h * (c - (1 << 32) if c >= 1 << 31 else c)) & _M32


def _lowbias32(h: Tensor) -> Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, 0x7FEB352D)
    h = h ^ (h >> 15)
    h = _mul32(h, 0x846CA68B)
    return h ^ (h >> 16)


def uniform(index: Tensor, seed: Tensor) -> Tensor:
    """float32 U[0, 1) per int64 ``index`` (any shape) for a one-element ``seed``."""
    h = _lowbias32((index & _M32) ^ seed)
    return (h >> 8).to(torch.float32) * (1.0 / 16777216.0)
