"""Dense bit packing of small unsigned codes into uint8 storage.

Codes are packed little-endian: element ``i`` occupies bits
``[i*bits, (i+1)*bits)`` of the byte stream, least significant bit first.
All output sizes follow from ``numel`` and ``bits`` alone, so nothing here
synchronises with the device.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

_VALID = "an integer in 1..8"


def _check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be {_VALID}, got {bits!r}")
    return bits


def packed_numel(numel: int, bits: int) -> int:
    """Bytes needed to hold ``numel`` codes of ``bits`` bits each."""
    _check_bits(bits)
    return (numel * bits + 7) // 8


def _shifts(n: int, step: int, device: torch.device) -> Tensor:
    return torch.arange(0, n * step, step, dtype=torch.uint8, device=device)


def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """Pack uint8 ``codes`` (any shape, values in ``[0, 2**bits)``) into 1-D uint8.

    The caller guarantees the value range; larger values would bleed into
    their neighbours' bits.
    """
    _check_bits(bits)
    flat = codes.detach().reshape(-1).to(torch.uint8)
    numel = flat.numel()
    out_len = packed_numel(numel, bits)
    if bits == 8:
        return flat.clone()
    if 8 % bits == 0:
        per = 8 // bits
        pad = out_len * per - numel
        if pad:
            flat = torch.cat([flat, flat.new_zeros(pad)])
        # Fields are disjoint, so a uint8 sum is a bitwise OR without overflow.
        fields = flat.view(out_len, per) << _shifts(per, bits, flat.device)
        return fields.sum(dim=1, dtype=torch.uint8)
    # Generic path for 3, 5, 6, 7 bits: spell out the bit stream, then regroup by 8.
    planes = (flat.unsqueeze(1) >> _shifts(bits, 1, flat.device)) & 1
    stream = planes.reshape(-1)
    pad = out_len * 8 - stream.numel()
    if pad:
        stream = torch.cat([stream, stream.new_zeros(pad)])
    return (stream.view(out_len, 8) << _shifts(8, 1, flat.device)).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, bits: int, numel: int) -> Tensor:
    """Inverse of :func:`pack_bits`: 1-D uint8 codes of length ``numel``."""
    _check_bits(bits)
    need = packed_numel(numel, bits)
    if packed.numel() < need:
        raise ValueError(f"packed holds {packed.numel()} bytes, {need} needed for {numel} codes")
    flat = packed.detach().reshape(-1)[:need]
    if bits == 8:
        return flat.clone()
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        per = 8 // bits
        fields = (flat.unsqueeze(1) >> _shifts(per, bits, flat.device)) & mask
        return fields.reshape(-1)[:numel]
    stream = (flat.unsqueeze(1) >> _shifts(8, 1, flat.device)) & 1
    planes = stream.reshape(-1)[: numel * bits].view(numel, bits)
    return (planes << _shifts(bits, 1, flat.device)).sum(dim=1, dtype=torch.uint8)


@functools.lru_cache(maxsize=8)
def _bit_values(device: torch.device) -> Tensor:
    # Cached, never written: a mask of a small model's layer costs a few eager
    # ops, and allocating this each time was one of them.
    with torch.inference_mode(False):
        return torch.tensor([1 << i for i in range(8)], dtype=torch.uint8, device=device)


def pack_mask(mask: Tensor) -> Tensor:
    """A bool tensor (any shape) packed 1 bit per element: 1-D uint8 of
    ``ceil(numel / 8)`` bytes, the stream of ``pack_bits(mask, 1)`` (element
    ``i`` at bit ``i % 8`` of byte ``i // 8``; the last byte's unused bits 0).

    Three eager ops (the bools' bytes clamped to 1, a multiply by each
    bit's value, a uint8 sum): masks are saved per layer, and a small layer's mask
    cost more in the generic packer's ops than in its bytes.
    """
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor, got {mask.dtype}")
    # Bools are the bytes 0 and 1, but a bool view of other bytes is nonzero
    # True too: clamped to 1, or the uint8 sum below would carry.
    flat = mask.detach().reshape(-1).view(torch.uint8).clamp_max(1)
    pad = -flat.numel() % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    # Disjoint bits: the uint8 sum of the products is their bitwise OR.
    return (flat.view(-1, 8) * _bit_values(flat.device)).sum(dim=1, dtype=torch.uint8)


def unpack_mask(packed: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """Inverse of :func:`pack_mask`: a bool tensor of ``shape``.

    Raises ValueError when ``packed`` holds fewer than ``ceil(numel / 8)`` bytes.
    """
    shape = torch.Size(shape)
    numel = shape.numel()
    need = (numel + 7) // 8
    if packed.numel() < need:
        raise ValueError(f"packed holds {packed.numel()} bytes, {need} needed for {numel} bits")
    flat = packed.detach().reshape(-1)[:need]
    bits = (flat.unsqueeze(1) & _bit_values(flat.device)).ne(0).view(-1)
    return (bits if bits.numel() == numel else bits[:numel]).view(shape)
