"""Choose between the pure-PyTorch reference codecs and the fused ones.

The functions here have the reference signatures plus a keyword-only
``backend``.  The backend is, in order of precedence:

1. the ``backend=`` argument: ``"auto"``, ``"reference"``, ``"triton"`` or
   ``"compiled"``;
2. the environment variable ``ACTPACK_BACKEND`` (same values, read at each call);
3. ``"auto"``: the Triton kernels for CUDA tensors when ``triton`` imports;
   the compiled CPU codecs (:mod:`actpack.codecs.compiled`) for CPU tensors of
   at least :data:`COMPILED_MIN_NUMEL` elements when TorchInductor works
   there; the reference otherwise.

``"compiled"`` forces the TorchInductor-compiled codecs on CPU tensors (a
CUDA tensor raises ``RuntimeError``).  Where they cannot be compiled (no C++
compiler) they warn once and run the reference: never an error.

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
import sys

import torch
from torch import Tensor

from actpack.codecs import division as _ref_division
from actpack.codecs import groupquant as _ref_groupquant
from actpack.codecs import pack as _ref_pack
from actpack.codecs.division import DivisionCode
from actpack.codecs.groupquant import GroupCode

__all__ = [
    "BACKENDS",
    "COMPILED_MIN_NUMEL",
    "ENV_VAR",
    "compiled_available",
    "dequantize_groups",
    "division_decode",
    "division_encode",
    "hadamard_decode",
    "hadamard_encode",
    "pack_bits",
    "pack_mask",
    "quantize_groups",
    "resolve_backend",
    "triton_available",
    "unpack_bits",
    "unpack_mask",
]

BACKENDS = ("auto", "reference", "triton", "compiled")
ENV_VAR = "ACTPACK_BACKEND"

#: Under ``"auto"``, CPU tensors with fewer elements keep the reference codecs:
#: below this size a compiled call's fixed cost (guards, wrapper) outweighs
#: what fusing saves (``benchmarks/bench_codecs_cpu.py``), and small tensors
#: never set the peak memory.
COMPILED_MIN_NUMEL = 1 << 14


@functools.cache
def triton_available() -> bool:
    """Whether ``import triton`` works (checked once)."""
    try:
        importlib.import_module("triton")
        importlib.import_module("triton.language")
    except Exception:  # ImportError, or a broken install raising anything else
        return False
    return True


def _module(name: str):
    """``importlib.import_module(name)``, read from ``sys.modules`` once
    imported: the codecs' entry points run once per saved tensor, where the
    import system's lookup cost a few microseconds a call (the modules are
    imported lazily so that the reference path never imports Inductor or
    Triton).  While Dynamo traces a codec call in a user's compiled region,
    the import itself, as before this shortcut: Dynamo does not trace
    ``import_module`` (it runs it as a graph break), and a lookup it could
    trace led it into the ``functools.cache`` functions beyond (the compiled
    codecs' availability probe), each a warning."""
    module = None if torch.compiler.is_compiling() else sys.modules.get(name)
    return module if module is not None else importlib.import_module(name)


def compiled_available() -> bool:
    """Whether TorchInductor compiles CPU code here (probed once, warns once if not)."""
    return _module("actpack.codecs.compiled.build").available()


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def resolve_backend(t: Tensor, backend: str | None = None, numel: int | None = None) -> str:
    """``"triton"``, ``"compiled"`` or ``"reference"`` for an operation on tensor ``t``.

    ``numel``: the operation's size in elements when ``t`` is not the full
    tensor (a packed code); ``t.numel()`` otherwise.
    """
    choice = backend if backend is not None else os.environ.get(ENV_VAR, "") or "auto"
    choice = choice.strip().lower()
    if choice not in BACKENDS:
        source = "backend" if backend is not None else ENV_VAR
        raise ValueError(f"{source} must be one of {', '.join(BACKENDS)}; got {choice!r}")
    if choice == "reference":
        return "reference"
    if choice == "auto":
        if t.is_cuda:
            return "triton" if triton_available() else "reference"
        size = t.numel() if numel is None else numel
        if t.device.type == "cpu" and size >= COMPILED_MIN_NUMEL and compiled_available():
            return "compiled"
        return "reference"
    if choice == "compiled":
        if t.device.type != "cpu":
            raise RuntimeError(
                f"the compiled backend runs on CPU tensors (got a {t.device.type} tensor); "
                "use backend='triton' or 'auto' for CUDA tensors"
            )
        return "compiled" if compiled_available() else "reference"
    if not triton_available():
        raise RuntimeError("the triton backend was requested but triton cannot be imported")
    if not (t.is_cuda or _interpreting()):
        raise RuntimeError(
            f"the triton backend needs CUDA tensors (got a {t.device.type} tensor); "
            "set TRITON_INTERPRET=1 to run the kernels on CPU through Triton's interpreter"
        )
    return "triton"


def _kernels(name: str):
    return _module(f"actpack.codecs.kernels.{name}")


def _impl(choice: str, name: str, reference):
    """The module implementing ``name`` codecs for a resolved backend ``choice``."""
    if choice == "triton":
        return _kernels(name)
    if choice == "compiled":
        return _module(f"actpack.codecs.compiled.{name}")
    return reference


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
    # A tensor with a pending negation (the neg bit: ``z.conj().imag``) holds
    # -x in memory; TorchInductor and Triton read the memory as x.
    x = x.resolve_neg()
    impl = _impl(resolve_backend(x, backend), "groupquant", _ref_groupquant)
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
    choice = resolve_backend(code.packed, backend, code.rows * code.cols)
    return _impl(choice, "groupquant", _ref_groupquant).dequantize_groups(code, dtype)


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
    x = x.resolve_neg()  # a pending negation: fused code reads the stored values
    impl = _impl(resolve_backend(x, backend), "division", _ref_division)
    return impl.division_encode(x, block, bits, stochastic=stochastic, generator=generator)


def division_decode(
    code: DivisionCode, dtype: torch.dtype = torch.float32, *, backend: str | None = None
) -> Tensor:
    """:func:`actpack.codecs.division_decode` on the chosen backend."""
    numel = code.hfc.rows * code.hfc.cols
    choice = resolve_backend(code.hfc.packed, backend, numel)
    return _impl(choice, "division", _ref_division).division_decode(code, dtype)


def hadamard_encode(
    x: Tensor,
    bits: int,
    block: int = 64,
    group_size: int | None = None,
    *,
    adaptive: bool = False,
    stochastic: bool = True,
    generator: torch.Generator | None = None,
    meta_dtype: torch.dtype = torch.bfloat16,
    backend: str | None = None,
):
    """:func:`actpack.codecs.hadamard.hadamard_encode` on the chosen backend:
    the compiled row selection (:mod:`actpack.codecs.compiled.hadamard`) for
    ``"compiled"``, else the reference, whose quantization then runs on the
    backend ``ACTPACK_BACKEND`` selects (there are no Triton kernels of the
    rotation).  Imported at the call: the Hadamard codec quantizes through
    this module."""
    # (A pending negation: the compiled encode resolves it, the reference reads values.)
    compiled = resolve_backend(x, backend) == "compiled"
    impl = _module("actpack.codecs.compiled.hadamard" if compiled else "actpack.codecs.hadamard")
    return impl.hadamard_encode(x, bits, block, group_size, adaptive=adaptive,
                                stochastic=stochastic, generator=generator,
                                meta_dtype=meta_dtype)  # fmt: skip


def hadamard_decode(code, dtype: torch.dtype = torch.float32, *, backend: str | None = None):
    """:func:`actpack.codecs.hadamard.hadamard_decode` on the chosen backend
    (see :func:`hadamard_encode`)."""
    compiled = resolve_backend(code.inner.packed, backend, code.rows * code.cols) == "compiled"
    impl = _module("actpack.codecs.compiled.hadamard" if compiled else "actpack.codecs.hadamard")
    return impl.hadamard_decode(code, dtype)


def pack_bits(codes: Tensor, bits: int, *, backend: str | None = None) -> Tensor:
    """:func:`actpack.codecs.pack_bits` on the chosen backend."""
    choice = resolve_backend(codes, backend)
    if choice == "reference":
        return _ref_pack.pack_bits(codes, bits)
    return _impl(choice, "bits", _ref_pack).pack_bits(codes, bits)


def unpack_bits(packed: Tensor, bits: int, numel: int, *, backend: str | None = None) -> Tensor:
    """:func:`actpack.codecs.unpack_bits` on the chosen backend."""
    choice = resolve_backend(packed, backend, numel)
    return _impl(choice, "bits", _ref_pack).unpack_bits(packed, bits, numel)


def pack_mask(mask: Tensor, *, backend: str | None = None) -> Tensor:
    """A bool tensor packed 1 bit per element (the byte stream of ``pack_bits(., 1)``);
    another dtype is read as ``mask != 0``."""
    mask = mask if mask.dtype == torch.bool else mask != 0
    choice = resolve_backend(mask, backend)
    if choice == "reference":
        return _ref_pack.pack_mask(mask)
    return _impl(choice, "bits", _ref_pack).pack_mask(mask)


def unpack_mask(packed: Tensor, shape: torch.Size, *, backend: str | None = None) -> Tensor:
    """Inverse of :func:`pack_mask`: a bool tensor of ``shape``."""
    shape = torch.Size(shape)
    choice = resolve_backend(packed, backend, shape.numel())
    if choice == "reference":
        return _ref_pack.unpack_mask(packed, shape)
    return _impl(choice, "bits", _ref_pack).unpack_mask(packed, shape)
