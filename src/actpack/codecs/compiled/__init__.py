"""Fused CPU codecs: the reference codecs' arithmetic compiled by TorchInductor.

Every public function has the signature and the result of its reference in
:mod:`actpack.codecs` (same dataclasses; same packed bytes, lo, hi and LFC
for round-to-nearest; the same distribution for stochastic rounding, drawn
from the counter hash of :mod:`actpack.codecs.counter_noise` keyed by the
caller's generator).  Each codec is a few fused loops over the tensor with no
float32 temporary of its size, compiled
once per configuration with dynamic shapes and cached (in memory, and on
disk by Inductor).

* :mod:`~actpack.codecs.compiled.groupquant`: ActNN per-group quantization;
* :mod:`~actpack.codecs.compiled.division`: DIVISION block means + residual;
* :mod:`~actpack.codecs.compiled.bits`: bit packing, 1-bit masks;
* :mod:`~actpack.codecs.compiled.arith`: the arithmetic they share;
* :mod:`~actpack.codecs.compiled.build`: compiling, caching, and the fallback
  to the reference (one :class:`~actpack.codecs.compiled.build.CompileFallbackWarning`)
  where no C++ compiler is available.

Use :mod:`actpack.codecs.backend` (``backend="compiled"`` or ``"auto"``) to
choose between these and the reference; importing this package compiles
nothing.
"""
