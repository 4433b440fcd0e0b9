"""Pure tensor codecs: no autograd, no module knowledge.

Every function here takes and returns plain tensors (or small frozen
dataclasses of tensors) and works on any device.  These are the reference
implementations; fused Triton kernels in :mod:`actpack.codecs.kernels` and
TorchInductor-compiled CPU codecs in :mod:`actpack.codecs.compiled` have the
same signatures and are tested against them.  :mod:`actpack.codecs.backend`
has the same functions dispatching to one of them
(``ACTPACK_BACKEND=auto|reference|triton|compiled``).
"""

from actpack.codecs.backend import resolve_backend
from actpack.codecs.division import DivisionCode, division_decode, division_encode
from actpack.codecs.groupquant import GroupCode, dequantize_groups, quantize_groups
from actpack.codecs.pack import pack_bits, packed_numel, unpack_bits

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
