"""Dense bit packing (1-bit masks first of all) as Triton kernels.

Same stream as :mod:`actpack.codecs.pack`: element ``i`` occupies bits
``[i*bits, (i+1)*bits)``, least significant bit first.  ``pack_bits`` handles
``bits`` 1, 2, 4, 8 (others fall back to the reference); ``unpack_bits``
handles every ``bits`` 1..8.  ``pack_mask``/``unpack_mask`` read and write bool
tensors directly (through a uint8 view), with no intermediate uint8 copy.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from actpack.codecs import pack as ref
from actpack.codecs.kernels.groupquant import _load_code
from actpack.codecs.pack import _check_bits, packed_numel

__all__ = ["pack_bits", "pack_mask", "unpack_bits", "unpack_mask"]

_PACK_BYTES = 1024  # output bytes per program
_UNPACK_BLOCK = 4096  # output codes per program


@triton.jit
def _pack_kernel(src_ptr, dst_ptr, numel, nbytes, BITS: tl.constexpr, PER: tl.constexpr,
                 BLOCK: tl.constexpr):  # fmt: skip
    b = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    lane = tl.arange(0, PER)
    e = b[:, None] * PER + lane[None, :]
    v = tl.load(src_ptr + e, mask=e < numel, other=0).to(tl.int32)
    # Out-of-range codes bleed into their neighbours' bits modulo 256, as in the reference.
    byte = tl.sum(v << (lane * BITS)[None, :], axis=1)
    tl.store(dst_ptr + b, byte.to(tl.uint8), mask=b < nbytes)


@triton.jit
def _unpack_kernel(src_ptr, dst_ptr, numel, nbytes, BITS: tl.constexpr, BLOCK: tl.constexpr):
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = e < numel
    q = _load_code(src_ptr, e, nbytes, mask, BITS)
    tl.store(dst_ptr + e, q.to(tl.uint8), mask=mask)


def _flat_u8(t: Tensor) -> Tensor:
    flat = t.detach().reshape(-1)
    if flat.dtype == torch.bool:
        return flat.view(torch.uint8)  # bools are stored as 0/1 bytes
    return flat if flat.dtype == torch.uint8 else flat.to(torch.uint8)


def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """Fused :func:`actpack.codecs.pack_bits` (bool inputs are read as 0/1)."""
    _check_bits(bits)
    if bits not in (1, 2, 4, 8) or codes.numel() == 0:
        return ref.pack_bits(codes, bits)
    flat = _flat_u8(codes)
    if bits == 8:
        return flat.clone()
    numel = flat.numel()
    nbytes = packed_numel(numel, bits)
    out = torch.empty(nbytes, dtype=torch.uint8, device=flat.device)
    block = min(_PACK_BYTES, max(16, 1 << (nbytes - 1).bit_length()))
    _pack_kernel[(-(-nbytes // block),)](
        flat, out, numel, nbytes, BITS=bits, PER=8 // bits, BLOCK=block, num_warps=4
    )
    return out


def unpack_bits(packed: Tensor, bits: int, numel: int) -> Tensor:
    """Fused :func:`actpack.codecs.unpack_bits` (any ``bits`` 1..8)."""
    _check_bits(bits)
    need = packed_numel(numel, bits)
    if packed.numel() < need:
        raise ValueError(f"packed holds {packed.numel()} bytes, {need} needed for {numel} codes")
    flat = packed.detach().reshape(-1)
    if bits == 8:
        return flat[:need].clone()
    out = torch.empty(numel, dtype=torch.uint8, device=flat.device)
    if numel == 0:
        return out
    block = min(_UNPACK_BLOCK, max(16, 1 << (numel - 1).bit_length()))
    _unpack_kernel[(-(-numel // block),)](
        flat, out, numel, need, BITS=bits, BLOCK=block, num_warps=4
    )
    return out


def pack_mask(mask: Tensor) -> Tensor:
    """Pack a bool tensor to 1 bit per element (no uint8 copy of the mask)."""
    return pack_bits(mask, 1)


def unpack_mask(packed: Tensor, shape: torch.Size) -> Tensor:
    """Inverse of :func:`pack_mask`: a bool tensor of ``shape``."""
    return unpack_bits(packed, 1, shape.numel()).view(torch.bool).view(shape)
