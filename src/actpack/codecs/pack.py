"""Dense bit packing of small unsigned codes into uint8 storage.

Codes are packed little-endian: element ``i`` occupies bits
``[i*bits, (i+1)*bits)`` of the byte stream, least significant bit first.
All output sizes follow from ``numel`` and ``bits`` alone, so nothing here
synchronises with the device.
"""

from __future__ import annotations

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
