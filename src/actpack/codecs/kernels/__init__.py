"""Fused Triton kernels for the codecs in :mod:`actpack.codecs`.

Every public function here has the signature and the output of its pure
PyTorch reference in :mod:`actpack.codecs` (same dataclasses, same packed
bytes, lo and hi for round-to-nearest; statistically equivalent stochastic
rounding).  Cases a kernel does not cover fall back to the reference inside
the wrapper, so callers never need to check.

Importing a submodule imports Triton; use :mod:`actpack.codecs.backend` to
choose between these kernels and the reference.  On a machine without a GPU
the kernels run through Triton's interpreter when ``TRITON_INTERPRET=1`` is
set *before* the submodules are first imported.

The interpreter runs the kernels as Python and accepts things the compiler
rejects (e.g. reading a plain Python global: kernel globals must be
``tl.constexpr``).  ``python benchmarks/bench_kernels.py --compile-only``
compiles every kernel for a CUDA architecture without a GPU (Triton's bundled
ptxas) to catch those.

Save path: one launch per tensor (plus a one-element ``torch.randint`` for the
stochastic seed, drawn on the device from the strategy's generator), nothing
read back to the host, so no synchronisation.
"""

from __future__ import annotations

__all__ = ["SUBMODULES"]

SUBMODULES = (
    "actpack.codecs.kernels.bits",
    "actpack.codecs.kernels.groupquant",
    "actpack.codecs.kernels.division",
)
