"""Containers for what the engine keeps instead of a saved tensor.

Each holds the compressed form plus what is needed to rebuild a tensor of
the original dtype and shape; ``nbytes`` is computed from shapes only, so
accounting never synchronises with the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from actpack.codecs import DivisionCode, GroupCode
from actpack.codecs.backend import (
    dequantize_groups,
    division_decode,
    pack_mask,
    unpack_mask,
)
from actpack.codecs.hadamard import RotatedCode, hadamard_decode


def tensor_bytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


class Encoded:
    """A saved tensor in compressed form."""

    nbytes: int

    def decode(self) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError


@dataclass
class Cast(Encoded):
    data: Tensor
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return tensor_bytes(self.data)

    def decode(self) -> Tensor:
        return self.data.to(self.dtype)


@dataclass
class Copy(Encoded):
    """An exact copy (of a small view whose storage is large)."""

    data: Tensor

    @property
    def nbytes(self) -> int:
        return tensor_bytes(self.data)

    def decode(self) -> Tensor:
        return self.data


@dataclass
class Bits(Encoded):
    """A bool tensor, one bit per element, lossless."""

    packed: Tensor
    shape: torch.Size

    @classmethod
    def encode(cls, mask: Tensor) -> Bits:
        return cls(pack_mask(mask), mask.shape)

    @property
    def nbytes(self) -> int:
        return tensor_bytes(self.packed)

    def decode(self) -> Tensor:
        return unpack_mask(self.packed, self.shape)


@dataclass
class Groups(Encoded):
    """Per-group quantized tensor; ``shape`` is the logical shape to restore."""

    code: GroupCode
    shape: torch.Size
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return self.code.nbytes

    def decode(self) -> Tensor:
        return dequantize_groups(self.code, self.dtype).reshape(self.shape)


@dataclass
class Dual(Encoded):
    """DIVISION code of a tensor viewed as (N, C, *S) after ``permute``."""

    code: DivisionCode
    permute: tuple[int, ...] | None
    shape: torch.Size
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return self.code.nbytes

    def decode(self) -> Tensor:
        x = division_decode(self.code, self.dtype)
        if self.permute is not None:
            inverse = [0] * len(self.permute)
            for i, p in enumerate(self.permute):
                inverse[p] = i
            x = x.permute(inverse)
        return x.reshape(self.shape)


@dataclass
class Rotated(Encoded):
    """Hadamard-rotated per-group code of a tensor viewed as (rows, last dim)."""

    code: RotatedCode
    shape: torch.Size
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return self.code.nbytes

    def decode(self) -> Tensor:
        return hadamard_decode(self.code, self.dtype).reshape(self.shape)


@dataclass
class Region(Encoded):
    """Only the exact region of each element (see exactness), restored as a
    representative value inside it: all an activation's backward reads."""

    mask: Bits
    rule: object
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return self.mask.nbytes

    def decode(self) -> Tensor:
        m = self.mask.decode()
        return self.rule.restore(torch.zeros(m.shape, dtype=self.dtype, device=m.device), m)


@dataclass
class LogOf(Encoded):
    """Code of ``exp(x)`` restored as ``log``: for log_softmax outputs."""

    inner: Encoded

    @property
    def nbytes(self) -> int:
        return self.inner.nbytes

    def decode(self) -> Tensor:
        p = self.inner.decode()
        return p.clamp_min(torch.finfo(p.dtype).tiny).log()


@dataclass
class TwoValued(Encoded):
    """A tensor whose elements are 0 or one value ``scale`` (dropout's noise):
    1 bit per element plus the value, lossless."""

    mask: Bits
    scale: Tensor  # 0-d, the tensor's dtype and device

    @classmethod
    def encode(cls, x: Tensor, check: bool = False) -> TwoValued | None:
        """The code of ``x``; with ``check``, None unless ``x`` really holds
        only 0 and one other value (a host read: for CPU tensors)."""
        # amax, not a host read: the value stays on the device (no synchronisation).
        scale = x.amax() if x.numel() else x.new_zeros(())
        nonzero = x != 0
        code = cls(Bits.encode(nonzero), scale)
        if check and not torch.equal(torch.where(nonzero, scale, x.new_zeros(())), x):
            return None  # the decode would differ: not two-valued
        return code

    @property
    def nbytes(self) -> int:
        return self.mask.nbytes + tensor_bytes(self.scale)

    def decode(self) -> Tensor:
        m = self.mask.decode()
        return torch.where(m, self.scale, torch.zeros((), dtype=self.scale.dtype, device=m.device))
