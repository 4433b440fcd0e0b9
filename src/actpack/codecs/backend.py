"""Choose between the pure-PyTorch reference codecs and the fused Triton kernels.

The functions here have the reference signatures plus a keyword-only
``backend``.  The backend is, in order of precedence:

1. the ``backend=`` argument: ``"auto"``, ``"reference"`` or ``"triton"``;
2. the environment variable ``ACTPACK_BACKEND`` (same values, read at each call);
3. ``"auto"``: the Triton kernels for CUDA tensors when ``triton`` imports,
   the reference otherwise (CPU tensors, no Triton).

``"triton"`` forces the kernels; it needs a CUDA tensor, or Triton's
interpreter (``TRITON_INTERPRET=1`` set before the kernels are first
imported), which is how the kernels are tested on CPU.  Forcing it where it
cannot run raises ``RuntimeError`` instead of silently using the reference.
Inside the Triton backend, cases the kernels do not cover (see
:mod:`actpack.codecs.kernels`) still use the reference.

Both backends produce the same dataclasses, so a code encoded by one decodes
with the other.
"""

from __future__ import annotations

import functools
import importlib
import os

import torch
from torch import Tensor

from actpack.codecs import division as _ref_division
from actpack.codecs import groupquant as _ref_groupquant
from actpack.codecs import pack as _ref_pack
from actpack.codecs.division import DivisionCode
from actpack.codecs.groupquant import GroupCode

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "dequantize_groups",
    "division_decode",
    "division_encode",
    "pack_bits",
    "pack_mask",
    "quantize_groups",
    "resolve_backend",
    "triton_available",
    "unpack_bits",
    "unpack_mask",
]

BACKENDS = ("auto", "reference", "triton")
ENV_VAR = "ACTPACK_BACKEND"


@functools.cache
def triton_available() -> bool:
    """Whether ``import triton`` works (checked once)."""
    try:
        importlib.import_module("triton")
        importlib.import_module("triton.language")
    except Exception:  # ImportError, or a broken install raising anything else
        return False
    return True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def resolve_backend(t: Tensor, backend: str | None = None) -> str:
    """``"triton"`` or ``"reference"`` for an operation on tensor ``t``."""
    choice = backend if backend is not None else os.environ.get(ENV_VAR, "") or "auto"
    choice = choice.strip().lower()
    if choice not in BACKENDS:
        source = "backend" if backend is not None else ENV_VAR
        raise ValueError(f"{source} must be one of {', '.join(BACKENDS)}; got {choice!r}")
    if choice == "reference":
        return "reference"
    if choice == "auto":
        return "triton" if t.is_cuda and triton_available() else "reference"
    if not triton_available():
        raise RuntimeError("the triton backend was requested but triton cannot be imported")
    if not (t.is_cuda or _interpreting()):
        raise RuntimeError(
            f"the triton backend needs CUDA tensors (got a {t.device.type} tensor); "
            "set TRITON_INTERPRET=1 to run the kernels on CPU through Triton's interpreter"
        )
    return "triton"


def _kernels(name: str):
    return importlib.import_module(f"actpack.codecs.kernels.{name}")


def quantize_groups(
    x: Tensor,
    bits: int,
    group_size: int,
    *,
    stochastic: bool = True,
    generator: torch.Generator | None = None,
    zero_exact: bool = False,
    meta_dtype: torch.dtype = torch.bfloat16,
    backend: str | None = None,
) -> GroupCode:
    """:func:`actpack.codecs.quantize_groups` on the chosen backend."""
    impl = _ref_groupquant
    if resolve_backend(x, backend) == "triton":
        impl = _kernels("groupquant")
    return impl.quantize_groups(
        x,
        bits,
        group_size,
        stochastic=stochastic,
        generator=generator,
        zero_exact=zero_exact,
        meta_dtype=meta_dtype,
    )


def dequantize_groups(
    code: GroupCode, dtype: torch.dtype = torch.float32, *, backend: str | None = None
) -> Tensor:
    """:func:`actpack.codecs.dequantize_groups` on the chosen backend."""
    if resolve_backend(code.packed, backend) == "triton":
        return _kernels("groupquant").dequantize_groups(code, dtype)
    return _ref_groupquant.dequantize_groups(code, dtype)


def division_encode(
    x: Tensor,
    block: int = 8,
    bits: int = 2,
    *,
    stochastic: bool = True,
    generator: torch.Generator | None = None,
    backend: str | None = None,
) -> DivisionCode:
    """:func:`actpack.codecs.division_encode` on the chosen backend."""
    impl = _ref_division
    if resolve_backend(x, backend) == "triton":
        impl = _kernels("division")
    return impl.division_encode(x, block, bits, stochastic=stochastic, generator=generator)


def division_decode(
    code: DivisionCode, dtype: torch.dtype = torch.float32, *, backend: str | None = None
) -> Tensor:
    """:func:`actpack.codecs.division_decode` on the chosen backend."""
    if resolve_backend(code.hfc.packed, backend) == "triton":
        return _kernels("division").division_decode(code, dtype)
    return _ref_division.division_decode(code, dtype)


def pack_bits(codes: Tensor, bits: int, *, backend: str | None = None) -> Tensor:
    """:func:`actpack.codecs.pack_bits` on the chosen backend."""
    if resolve_backend(codes, backend) == "triton":
        return _kernels("bits").pack_bits(codes, bits)
    return _ref_pack.pack_bits(codes, bits)


def unpack_bits(packed: Tensor, bits: int, numel: int, *, backend: str | None = None) -> Tensor:
    """:func:`actpack.codecs.unpack_bits` on the chosen backend."""
    if resolve_backend(packed, backend) == "triton":
        return _kernels("bits").unpack_bits(packed, bits, numel)
    return _ref_pack.unpack_bits(packed, bits, numel)


def pack_mask(mask: Tensor, *, backend: str | None = None) -> Tensor:
    """A bool tensor packed 1 bit per element (the byte stream of ``pack_bits(., 1)``)."""
    if resolve_backend(mask, backend) == "triton":
        return _kernels("bits").pack_mask(mask)
    return _ref_pack.pack_bits(mask.reshape(-1).to(torch.uint8), 1)


def unpack_mask(packed: Tensor, shape: torch.Size, *, backend: str | None = None) -> Tensor:
    """Inverse of :func:`pack_mask`: a bool tensor of ``shape``."""
    shape = torch.Size(shape)
    if resolve_backend(packed, backend) == "triton":
        return _kernels("bits").unpack_mask(packed, shape)
    return _ref_pack.unpack_bits(packed, 1, shape.numel()).view(shape).bool()
