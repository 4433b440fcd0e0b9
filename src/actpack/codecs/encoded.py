"""Containers for what the engine keeps instead of a saved tensor.

Each holds the compressed form plus what is needed to rebuild a tensor of
the original dtype and shape; ``nbytes`` is computed from shapes only, so
accounting never synchronises with the device.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from actpack.codecs import DivisionCode, GroupCode
from actpack.codecs.backend import (
    dequantize_groups,
    division_decode,
    hadamard_decode,
    pack_mask,
    unpack_mask,
)
from actpack.codecs.hadamard import RotatedCode
from actpack.codecs.traceable import half_scaled_on_host, half_unscaled


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
class ScaledHalf(Encoded):
    """An fp32 tensor as fp16 values times one power-of-two scale (see
    :func:`actpack.codecs.traceable.half_scaled`): per element
    ``|decoded - x| <= 2^-11 |x| + 2^-25 scale``, never an overflow to inf,
    non-finite values kept.  2 bytes per element plus 4."""

    data: Tensor
    scale: Tensor  # 0-d fp32, a power of two
    dtype: torch.dtype

    @classmethod
    def encode(cls, x: Tensor) -> ScaledHalf:
        data, scale = half_scaled_on_host(x)  # half_scaled's result, fewer ops on a CPU
        return cls(data, scale, x.dtype)

    @property
    def nbytes(self) -> int:
        return tensor_bytes(self.data) + tensor_bytes(self.scale)

    def decode(self) -> Tensor:
        return half_unscaled(self.data, self.scale, self.dtype)


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
        return self.rule.values(self.mask.decode(), self.dtype)


@functools.cache
def hardswish_edges(device_type: str) -> tuple[bool, bool]:
    """Whether this torch's hardswish backward treats x = -3 and x = 3 as
    outside the middle (derivative 0 and 1; the CPU kernel does), read once
    per device type from the kernel itself."""
    x = torch.tensor([-3.0, 3.0], device=device_type)
    d = torch.ops.aten.hardswish_backward(torch.ones_like(x), x)
    return bool(d[0] == 0), bool(d[1] == 1)


@dataclass
class HardswishInput(Encoded):
    """A hardswish input as its backward reads it: which of below -3, the
    middle, above 3 each element is in (two exact bit masks; the edges -3
    and 3 fall where this torch's kernel puts them, see
    :func:`hardswish_edges`), and in the middle the strategy's code of x
    (``middle``: a code of ``x.clamp(-3, 3)`` whose decoded values stay in
    [-3, 3], as codes with ``Strategy.bounded_codes`` do).  The backward,
    ``x / 3 + 1/2`` in the middle and 0 or 1 outside, is then linear in an
    unbiased code with the region exact.  Decoded middle values on an edge
    that the kernel counts as outside move one step of their dtype inward (a
    change of the derivative by that step / 3).  Outside elements decode to
    -4 and 4."""

    below: Bits
    above: Bits
    middle: Encoded
    edges_outside: tuple[bool, bool]

    @classmethod
    def encode(cls, x: Tensor, code: Callable[[Tensor], Encoded]) -> HardswishInput:
        edges = hardswish_edges(x.device.type)
        below = x <= -3 if edges[0] else x < -3
        above = x >= 3 if edges[1] else x > 3
        return cls(Bits.encode(below), Bits.encode(above), code(x.clamp(-3, 3)), edges)

    @property
    def nbytes(self) -> int:
        return self.below.nbytes + self.above.nbytes + self.middle.nbytes

    def decode(self) -> Tensor:
        v = self.middle.decode()
        # Also removes float rounding past +-3 (lo + levels * step).
        lo = torch.tensor(-3.0, dtype=v.dtype, device=v.device)
        hi = -lo
        if self.edges_outside[0]:
            lo = torch.nextafter(lo, torch.zeros_like(lo))
        if self.edges_outside[1]:
            hi = torch.nextafter(hi, torch.zeros_like(hi))
        v = v.clamp(lo, hi)
        v = v.masked_fill(self.below.decode(), -4.0)
        return v.masked_fill(self.above.decode(), 4.0)


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
