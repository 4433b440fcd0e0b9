"""Lossless compact forms of integer tensors autograd saves.

Max-pool indices become the offset of the maximum inside its pooling window
(log2(window) bits instead of 64); index tensors whose range an op bounds
(embedding ids, gather/index_select indices) are narrowed to the smallest
integer type that holds that range.  Both are exact by construction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from actpack.codecs import pack_bits, unpack_bits
from actpack.codecs.encoded import Cast, Encoded
from actpack.policy.rules import same_tensor

_POOL_PARAMS = ("kernel_size", "stride", "padding", "dilation")


def _tuple(value: object, n: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    values = tuple(int(v) for v in value)  # type: ignore[union-attr]
    return values * n if len(values) == 1 else values


def _param(args: tuple, kwargs: dict, index: int, name: str, default: object) -> object:
    if name in kwargs and kwargs[name] is not None:
        return kwargs[name]
    if len(args) > index and args[index] is not None:
        return args[index]
    return default


@dataclass(frozen=True)
class Window:
    """Geometry of a max-pool: input/output spatial sizes, kernel, stride, padding, dilation."""

    inp: tuple[int, ...]
    out: tuple[int, ...]
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]

    def _starts(self, d: int, device: torch.device) -> Tensor:
        n = len(self.out)
        shape = [1] * n
        shape[d] = self.out[d]
        o = torch.arange(self.out[d], device=device).view(shape)
        return o * self.stride[d] - self.padding[d]

    def to_offset(self, idx: Tensor) -> Tensor:
        n, offset = len(self.out), torch.zeros_like(idx)
        for d in range(n):
            inner = math.prod(self.inp[d + 1 :])
            coord = (idx // inner) % self.inp[d]
            k = (coord - self._starts(d, idx.device)) // self.dilation[d]
            offset = offset * self.kernel[d] + k
        return offset

    def to_index(self, offset: Tensor) -> Tensor:
        n, idx = len(self.out), torch.zeros_like(offset)
        for d in range(n):
            k = (offset // math.prod(self.kernel[d + 1 :])) % self.kernel[d]
            coord = self._starts(d, offset.device) + k * self.dilation[d]
            idx = idx * self.inp[d] + coord
        return idx


@dataclass
class PoolIndices(Encoded):
    packed: Tensor
    bits: int
    shape: torch.Size
    window: Window

    @property
    def nbytes(self) -> int:
        return self.packed.numel()

    def decode(self) -> Tensor:
        n = len(self.window.out)
        offset = unpack_bits(self.packed, self.bits, self.shape.numel()).view(self.shape)
        return self.window.to_index(offset.long().view(-1, *self.shape[-n:])).view(self.shape)


def _pool_indices(t: Tensor, op: str, args: tuple, kwargs: dict) -> Encoded | None:
    n = int(op[len("max_pool")])
    inp = args[0] if args else None
    if not isinstance(inp, Tensor) or inp.dim() < n + 1:
        return None
    kernel = _tuple(_param(args, kwargs, 1, "kernel_size", None), n)
    stride = _param(args, kwargs, 2, "stride", None)
    stride = _tuple(stride, n) if stride not in (None, ()) else kernel
    padding = _tuple(_param(args, kwargs, 3, "padding", 0), n)
    dilation = _tuple(_param(args, kwargs, 4, "dilation", 1), n)
    in_shape = tuple(inp.shape)
    if n == 1 and t.dim() == inp.dim() + 1:
        # max_pool1d runs as max_pool2d over a (1, L) plane
        n, in_shape = 2, in_shape[:-1] + (1, in_shape[-1])
        kernel, stride, padding, dilation = (
            (1, *kernel), (1, *stride), (0, *padding), (1, *dilation)
        )  # fmt: skip
    if t.shape[:-n] != in_shape[:-n]:
        return None
    window = Window(in_shape[-n:], tuple(t.shape[-n:]), kernel, stride, padding, dilation)
    size = math.prod(window.kernel)
    if size > 256:
        return None
    bits = max(1, math.ceil(math.log2(size)))
    offset = window.to_offset(t.reshape(-1, *window.out))
    return PoolIndices(pack_bits(offset.to(torch.uint8), bits), bits, t.shape, window)


def _narrow_dtype(bound: int) -> torch.dtype | None:
    for dtype in (torch.uint8, torch.int16, torch.int32):
        if bound - 1 <= torch.iinfo(dtype).max:
            return dtype
    return None


def _index_bound(t: Tensor, op: str, args: tuple, kwargs: dict) -> int | None:
    """An exclusive upper bound the op enforces on the values of index ``t``."""
    if op == "embedding" and len(args) >= 2 and same_tensor(args[0], t):
        return int(args[1].shape[0])
    if op in ("gather", "index_select") and len(args) >= 3 and same_tensor(args[2], t):
        dim = int(args[1])
        return int(args[0].shape[dim]) if isinstance(args[0], Tensor) else None
    return None


def compact_integer(t: Tensor, op: str | None, args: tuple, kwargs: dict) -> Encoded | None:
    """A lossless compact form of integer ``t`` saved by ``op``, or None."""
    if op is None or t.dtype != torch.int64:
        return None
    base = op.replace("_with_indices", "")
    if base in ("max_pool1d", "max_pool2d", "max_pool3d"):
        return _pool_indices(t, base, args, kwargs)
    bound = _index_bound(t, op, args, kwargs)
    dtype = _narrow_dtype(bound) if bound is not None else None
    return Cast(t.to(dtype), t.dtype) if dtype is not None else None
