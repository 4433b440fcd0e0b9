"""Pure tensor codecs: no autograd, no module knowledge.

Every function here takes and returns plain tensors (or small frozen
dataclasses of tensors) and works on any device.  These are the reference
implementations; fused Triton kernels in :mod:`actpack.kernels` have the same
signatures and are tested against them.  :mod:`actpack.codec.backend` has the
same functions dispatching to either (``ACTPACK_BACKEND=auto|reference|triton``).
"""

from actpack.codec.backend import resolve_backend
from actpack.codec.division import DivisionCode, division_decode, division_encode
from actpack.codec.groupquant import GroupCode, dequantize_groups, quantize_groups
from actpack.codec.pack import pack_bits, packed_numel, unpack_bits

__all__ = [
    "DivisionCode",
    "GroupCode",
    "dequantize_groups",
    "division_decode",
    "division_encode",
    "pack_bits",
    "packed_numel",
    "quantize_groups",
    "resolve_backend",
    "unpack_bits",
]
