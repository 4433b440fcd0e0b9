"""Checks of a fused codec implementation against the pure-PyTorch reference.

Shared by ``test_kernels.py`` (Triton) and ``test_compiled_codecs.py``
(TorchInductor on the CPU).  ``fused`` is a module with the reference's
functions (``quantize_groups``/``dequantize_groups`` or
``division_encode``/``division_decode``).

Round to nearest must give the reference's codes bit for bit (packed bytes,
lo and hi up to the sign of a zero bound (see same_bound), LFC) and decodes
must agree bit for bit in every direction (fused /
reference encode x fused / reference decode).  Stochastic rounding uses
another random stream, so it is checked statistically with the tolerance of
test_codec_groupquant: the mean of n independent decodes of a value lies
within 3 step / sqrt(n) of it (Hoeffding, failure <= 3e-8 per value), every
decode lies within one step, and the spread matches the variance of unbiased
rounding; a two-sample z-test compares the fused and reference distributions.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from actpack.codecs import division as rdiv
from actpack.codecs import groupquant as rgq

#: The input and output dtypes every fused codec takes.
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def compiled_codecs_only() -> pytest.MarkDecorator:
    """For a test module of the compiled CPU codecs (``pytestmark = ...``):
    skips the module where TorchInductor cannot compile CPU code, and
    returns the mark that turns a fall back to the reference into a failure."""
    from actpack.codecs.compiled import build

    if not build.available():
        pytest.skip(
            "TorchInductor cannot compile CPU code here (no C++ compiler?)",
            allow_module_level=True,
        )
    return pytest.mark.filterwarnings("error::actpack.codecs.compiled.build.CompileFallbackWarning")


_INT_OF = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}


def same(a: torch.Tensor, b: torch.Tensor) -> None:
    """Bit-identical tensors (NaN payloads and signed zeros included)."""
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    ia = a.contiguous().view(_INT_OF[a.element_size()])
    ib = b.contiguous().view(_INT_OF[b.element_size()])
    bad = (ia != ib).nonzero()
    assert bad.numel() == 0, f"{bad.shape[0]} differ, first at {bad[:4].tolist()}"


def same_bound(a: torch.Tensor, b: torch.Tensor) -> None:
    """Bit-identical group bounds, but for the sign of a zero bound.

    The minimum or maximum of a group holding both +0 and -0 may be either
    (IEEE 754 leaves it to the implementation; ATen's and Inductor's
    reduction orders differ, and Inductor compiles with -fno-signed-zeros).
    Either sign decodes to the same values, which the decode checks compare
    bit for bit.
    """
    same(a + 0.0, b + 0.0)  # eager IEEE addition: -0 + 0 = +0, NaN stays NaN


def same_code(a: rgq.GroupCode, b: rgq.GroupCode) -> None:
    assert (a.rows, a.cols, a.group_size, a.bits, a.zero_exact) == (
        b.rows,
        b.cols,
        b.group_size,
        b.bits,
        b.zero_exact,
    )
    same(a.packed, b.packed)
    same_bound(a.lo, b.lo)
    same_bound(a.hi, b.hi)


def same_division(a: rdiv.DivisionCode, b: rdiv.DivisionCode) -> None:
    assert a.shape == b.shape and a.block == b.block
    same(a.lfc, b.lfc)
    same_code(a.hfc, b.hfc)


def check_groups(fused, x, bits, gs, *, zero_exact=False, meta=torch.bfloat16, out_dtypes=None):
    """RTN encode identical; every encode x decode pairing identical."""
    kw = {"stochastic": False, "zero_exact": zero_exact, "meta_dtype": meta}
    ref = rgq.quantize_groups(x, bits, gs, **kw)
    got = fused.quantize_groups(x, bits, gs, **kw)
    same_code(ref, got)
    for dtype in out_dtypes or [x.dtype]:
        want = rgq.dequantize_groups(ref, dtype)
        same(fused.dequantize_groups(ref, dtype), want)
        same(rgq.dequantize_groups(got, dtype), want)
    return ref, got


def check_division(fused, x, block=8, bits=2, out_dtypes=None):
    """RTN DIVISION encode identical; every encode x decode pairing identical."""
    ref = rdiv.division_encode(x, block, bits, stochastic=False)
    got = fused.division_encode(x, block, bits, stochastic=False)
    same_division(ref, got)
    for dtype in out_dtypes or [x.dtype]:
        want = rdiv.division_decode(ref, dtype)
        same(fused.division_decode(ref, dtype), want)
        same(rdiv.division_decode(got, dtype), want)
    return got


def order_sensitive_map(shape: tuple[int, ...], block: int, seed: int = 0) -> torch.Tensor:
    """float32 randn plus +2**20 at the first and -2**20 at the last element
    of every block's segment along the innermost dim: the large terms cancel
    within each block, and the small ones, added to partial sums holding them
    (float32 ulp 0.125 there), are rounded according to when each is added.  So
    the bf16 block means depend on the summation order, and a fused codec
    that sums blocks otherwise than the reference (``block_sums``) gives
    other means (a 1-D map has a single order: row-major is the reference's)."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    width = shape[-1]
    starts = torch.arange(0, width, min(block, width))
    ends = (starts + min(block, width)).clamp(max=width) - 1
    x[..., starts] += 2.0**20
    x[..., ends] -= 2.0**20
    return x


def assert_order_matters(x: torch.Tensor, block: int) -> None:
    """That ``x``'s block means in ATen's ``avg_pool`` order (row-major, one
    chain) differ from the reference's somewhere (maps of 2 or 3 spatial
    dims): the check of a fused codec on ``x`` can then fail when it sums in
    another order."""
    pool = {3: F.avg_pool1d, 4: F.avg_pool2d, 5: F.avg_pool3d}[x.dim()]
    eff = tuple(min(block, s) for s in x.shape[2:])
    aten = pool(x.float(), eff, eff, 0, True, False).to(torch.bfloat16)
    assert not torch.equal(aten, rdiv.block_means(x.float(), eff))


def draws(values: torch.Tensor, copies: int) -> torch.Tensor:
    """(8, len(values) * copies / 8), every group holding ``values`` (so one grid)."""
    return values.repeat(8, copies // 8)


def two_sample_z(a: torch.Tensor, b: torch.Tensor, var: torch.Tensor, step: float):
    """z-scores of the difference of the means over dim 0 of two draws ``a`` and ``b``
    (n decodes each) of values whose single-draw variance is ``var``; the variance
    gets a floor of (step / 1000)^2 so values exactly on the grid (var 0) give z = 0."""
    n = a.shape[0]
    var = var.clamp_min((step / 1000) ** 2)
    return (a.mean(0) - b.mean(0)) / torch.sqrt(2 * var / n)


def assert_groups_unbiased(fused, bits, zero_exact, dtype, device):
    """n = 256 stochastic decodes of 64 values: within one step, mean within
    3 step / sqrt(n), spread within 25% of step^2 p (1 - p)."""
    gs, n = 64, 256
    base = torch.linspace(-1.0, 1.0, gs, device=device) + 0.013
    if zero_exact:
        base = torch.relu(base)
    base = base.to(dtype)
    x = draws(base, n)
    gen = torch.Generator(device).manual_seed(1)
    code = fused.quantize_groups(x, bits, gs, generator=gen, zero_exact=zero_exact)
    assert torch.equal(code.lo, code.lo[:1, :1].expand_as(code.lo))  # one grid for all copies
    y = fused.dequantize_groups(code, torch.float32).double()
    levels = 2**bits - 1 - int(zero_exact)
    step = (code.hi[0, 0].double() - code.lo[0, 0].double()) / levels
    xd = base.double()
    samples = y.view(8, n // 8, gs).reshape(n, gs)
    assert ((samples - xd).abs() <= step * (1 + 1e-5)).all()
    mean = samples.mean(0)
    assert ((mean - xd).abs() <= 3 * step / math.sqrt(n) + 1e-6).all()
    # Spread of unbiased rounding: Var = step^2 p (1 - p), p the fractional position.
    p = ((xd - code.lo[0, 0].double()) / step) % 1.0
    if zero_exact:
        p = torch.where(xd > 0, ((xd - code.lo[0, 0].double()) / step) % 1.0, torch.zeros_like(p))
    expect = (step**2 * p * (1 - p)).sum()
    got = samples.var(0).sum()
    assert 0.75 * expect <= got <= 1.25 * expect
    if zero_exact:
        assert torch.equal(samples == 0, (xd == 0).expand_as(samples))


def assert_groups_match_reference(fused, bits, dtype, device):
    """Fused and reference (torch.rand) rounding are the same distribution:
    two-sample z-test per value on the decoded means (fixed seeds, so deterministic),
    max |z| < 5 and the mean of z^2 (about chi^2_64 / 64, sd 0.18) within [0.5, 1.6]."""
    gs, n = 64, 256
    base = (torch.linspace(-1.0, 1.0, gs, device=device) * 1.7 + 0.029).to(dtype)
    x = draws(base, n)
    got = fused.quantize_groups(x, bits, gs, generator=torch.Generator(device).manual_seed(11))
    ref = rgq.quantize_groups(x, bits, gs, generator=torch.Generator(device).manual_seed(12))
    same(got.lo, ref.lo)
    same(got.hi, ref.hi)
    lo = ref.lo[0, 0].double()
    step = (ref.hi[0, 0].double() - lo) / (2**bits - 1)
    p = ((base.double() - lo) / step) % 1.0
    yk = fused.dequantize_groups(got, torch.float32).double().view(8, n // 8, gs).reshape(n, gs)
    yr = rgq.dequantize_groups(ref, torch.float32).double().view(8, n // 8, gs).reshape(n, gs)
    z = two_sample_z(yk, yr, step**2 * p * (1 - p), float(step))
    assert z.abs().max() < 5, z
    assert 0.5 <= z.square().mean() <= 1.6, z.square().mean()


def assert_generator_semantics(fused, device):
    """Reproducible from the generator's state, advancing it, and not RTN."""
    x = torch.randn(4, 512, device=device)
    a = fused.quantize_groups(x, 2, 256, generator=torch.Generator(device).manual_seed(5))
    b = fused.quantize_groups(x, 2, 256, generator=torch.Generator(device).manual_seed(5))
    gen = torch.Generator(device).manual_seed(6)
    c = fused.quantize_groups(x, 2, 256, generator=gen)
    d = fused.quantize_groups(x, 2, 256, generator=gen)
    rtn = fused.quantize_groups(x, 2, 256, stochastic=False)
    same_code(a, b)  # reproducible from the generator's state
    assert not torch.equal(c.packed, d.packed)  # the generator advances
    assert not torch.equal(a.packed, c.packed)
    assert not torch.equal(a.packed, rtn.packed)
    same(a.lo, rtn.lo)  # ranges do not depend on the rounding


def assert_division_unbiased(fused, device):
    """64 decodes of a 7x7 map: within one step, mean within 3 step / sqrt(n)."""
    n = 64
    base = torch.randn(7, 7, device=device)
    x = base.expand(1, n, 7, 7).contiguous()
    code = fused.division_encode(x, 8, 2, generator=torch.Generator(device).manual_seed(3))
    assert torch.equal(code.hfc.lo, code.hfc.lo[:1].expand_as(code.hfc.lo))
    y = fused.division_decode(code).double()[0]
    step = (code.hfc.hi[0, 0].double() - code.hfc.lo[0, 0].double()) / 3
    xd = base.double()
    assert ((y - xd).abs() <= step * (1 + 1e-5) + 1e-5).all()
    assert ((y.mean(0) - xd).abs() <= 3 * step / math.sqrt(n) + 1e-5).all()
    same(fused.division_decode(code), rdiv.division_decode(code))


def assert_division_matches_reference(fused, device):
    """Same two-sample z-test as for groups, on the DIVISION residual of a 7x7 map."""
    n = 256
    base = torch.randn(7, 7, device=device, generator=torch.Generator(device).manual_seed(4))
    x = base.expand(1, n, 7, 7).contiguous()
    got = fused.division_encode(x, 8, 2, generator=torch.Generator(device).manual_seed(21))
    ref = rdiv.division_encode(x, 8, 2, generator=torch.Generator(device).manual_seed(22))
    same(got.lfc, ref.lfc)
    same(got.hfc.lo, ref.hfc.lo)
    same(got.hfc.hi, ref.hfc.hi)
    lo = ref.hfc.lo[0, 0].double()
    step = (ref.hfc.hi[0, 0].double() - lo) / 3
    resid = base.double() - ref.lfc[0, 0].double()  # one 7x7 block: one mean
    p = ((resid - lo) / step) % 1.0
    yk = fused.division_decode(got).double()[0].reshape(n, 49)
    yr = rdiv.division_decode(ref).double()[0].reshape(n, 49)
    z = two_sample_z(yk, yr, (step**2 * p * (1 - p)).reshape(49), float(step))
    assert z.abs().max() < 5, z
    assert 0.45 <= z.square().mean() <= 1.7, z.square().mean()  # chi^2_49 / 49, sd 0.2


def perturbed(factory):
    """``factory`` whose bodies return the first output (the codes) with one
    bit flipped in its first element: what an Inductor that rounds otherwise
    would compute."""

    def make(*key):
        body = factory(*key)

        def flipped_body(*args):
            out = body(*args)
            first = out[0]
            flat = (
                first.view(torch.uint8).view(-1) if first.dtype != torch.uint8 else first.view(-1)
            )
            flipped = torch.cat([flat[:1] ^ 1, flat[1:]]).view(first.dtype).view(first.shape)
            return (flipped, *out[1:])

        return flipped_body

    make.__name__ = factory.__name__
    return make
