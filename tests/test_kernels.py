"""Fused Triton kernels against the pure-PyTorch reference codecs.

Without a GPU the kernels run through Triton's interpreter: this module sets
``TRITON_INTERPRET=1`` before triton (and the kernels) are first imported.
The interpreter costs per program and per operation, so tensors are small and
the kernels let one program own many groups there (the GPU layout, one group
per program, is exercised too, in ``test_gpu_layout``).

The checks themselves (bit-identical round to nearest, statistics of the
stochastic rounding, which uses Philox instead of torch.rand) are in
``fused_checks.py``, shared with the compiled CPU codecs.
"""

from __future__ import annotations

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton/kernels

try:  # not pytest.importorskip: it only skips on ModuleNotFoundError since pytest 8.2
    import triton  # noqa: F401
    import triton.language  # noqa: F401
except Exception as exc:  # missing, or a broken install raising anything else
    pytest.skip(
        f"triton is not importable ({exc!r}): the fused kernels cannot run or be tested",
        allow_module_level=True,
    )

from fused_checks import (  # noqa: E402
    DTYPES,
    assert_division_matches_reference,
    assert_division_unbiased,
    assert_generator_semantics,
    assert_groups_match_reference,
    assert_groups_unbiased,
    assert_order_matters,
    check_division,
    check_groups,
    order_sensitive_map,
)
from fused_checks import same as _same  # noqa: E402
from fused_checks import same_code as _same_code  # noqa: E402

import actpack  # noqa: E402
from actpack.codecs import backend  # noqa: E402
from actpack.codecs import groupquant as rgq  # noqa: E402
from actpack.codecs import pack as rpack  # noqa: E402
from actpack.codecs.encoded import Bits  # noqa: E402
from actpack.codecs.kernels import bits as kbits  # noqa: E402
from actpack.codecs.kernels import division as kdiv  # noqa: E402
from actpack.codecs.kernels import groupquant as kgq  # noqa: E402
from actpack.strategies import ActNN, Division, SaveInfo  # noqa: E402

DEV = "cuda" if CUDA else "cpu"

if not CUDA and not kgq.interpreted(kgq._quantize_kernel):
    pytest.skip(
        "actpack.codecs.kernels was imported before TRITON_INTERPRET=1 was set; "
        "run this module alone",
        allow_module_level=True,
    )

pytestmark = pytest.mark.filterwarnings(
    "ignore::RuntimeWarning:triton.runtime.interpreter"  # IEEE overflow, on purpose
)


def _check_groups(x, bits, gs, **kw):
    return check_groups(kgq, x, bits, gs, **kw)


# --------------------------------------------------------------------------------------
# ActNN groups: round to nearest is bit-identical
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 255), (3, 257), (1, 1000)])
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_groups_rtn_identical(shape, bits, dtype):
    x = (torch.randn(shape, device=DEV) * 3 + 1).to(dtype)
    _check_groups(x, bits, 256)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_groups_zero_exact_identical(bits, dtype):
    x = torch.relu(torch.randn(3, 257, device=DEV)).to(dtype)
    x[1, :256] = 0  # a group without positive values
    _, ker = _check_groups(x, bits, 256, zero_exact=True)
    y = kgq.dequantize_groups(ker, dtype)
    assert torch.equal(y == 0, x == 0)


@pytest.mark.parametrize(
    ("shape", "gs", "bits"),
    [((3, 20), 7, 2), ((2, 100), 49, 2), ((3, 10), 3, 1), ((1, 40), 5, 4), ((2, 5), 1, 2)],
)
def test_groups_unaligned_group_sizes(shape, gs, bits):
    """Groups whose codes do not fill whole bytes: programs own several groups."""
    x = torch.randn(shape, device=DEV)
    _check_groups(x, bits, gs, out_dtypes=[torch.float32, torch.bfloat16])


@pytest.mark.parametrize(("shape", "gs"), [((2, 300), 256), ((3, 20), 49), ((1, 5000), 4500)])
def test_gpu_layout(monkeypatch, shape, gs):
    """The GPU policy (M = byte-alignment groups per program, chunked sweeps)."""
    monkeypatch.setattr(kgq, "INTERPRET_PROGRAM_ELEMENTS", 0)
    x = torch.randn(shape, device=DEV)
    _check_groups(x, 2, gs)
    x[0, 7] = float("nan")
    _check_groups(x, 4, gs)


def test_groups_large_group_chunks():
    """A group larger than one chunk (several sweeps per program)."""
    _check_groups(torch.randn(1, 5000, device=DEV), 2, 5000)


@pytest.mark.parametrize("meta", [torch.float16, torch.float32])
def test_groups_meta_dtypes(meta):
    x = torch.randn(3, 257, device=DEV) * 100
    _check_groups(x, 2, 256, meta=meta)


def test_groups_meta_fp16_saturates():
    """Finite values beyond float16's range saturate lo/hi at its maximum."""
    x = torch.randn(2, 64, device=DEV)
    x[0, :3] = torch.tensor([7e4, -9e4, 3.0])
    _, ker = _check_groups(x, 2, 64, meta=torch.float16)
    assert torch.isfinite(ker.lo).all() and torch.isfinite(ker.hi).all()


def test_groups_strided_input():
    x = torch.randn(300, 3, device=DEV).t()  # (3, 300), column stride 3
    assert not x.is_contiguous()
    _check_groups(x, 2, 256)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [1, 2, 4])
def test_groups_nonfinite_classes(bits, dtype):
    x = torch.randn(3, 300, device=DEV)
    x[0, 3], x[0, 9], x[0, 200] = float("nan"), float("inf"), -float("inf")
    x[1, 260] = float("inf")  # in the tail group
    x[2, :256] = 1.0  # constant group
    x = x.to(dtype)
    _, ker = _check_groups(x, bits, 256, out_dtypes=[dtype, torch.float32])
    y = kgq.dequantize_groups(ker, torch.float32)
    assert (
        torch.isnan(ker.lo[0, 0]) and torch.isnan(ker.lo[1, 1]) and not torch.isnan(ker.lo[2]).any()
    )
    if bits >= 2:
        assert y[0, 9] == float("inf") and y[0, 200] == -float("inf") and y[1, 260] == float("inf")
    assert torch.isnan(y[0, :256]).sum() == 256 - (2 if bits >= 2 else 0)
    assert torch.isfinite(y[2]).all()


def test_groups_extreme_finite_ranges():
    """Ranges overflowing float32 (the k = 0.5 path) and values at the meta limit."""
    x = torch.randn(2, 512, device=DEV)
    x[0, 0], x[0, 1] = -3.3e38, 3.3e38
    x[1, 5] = 3.4e38  # beyond bf16's finite range: saturates
    x[1, 300] = 1e-40  # subnormal
    _check_groups(x, 2, 256, out_dtypes=[torch.float32, torch.float16, torch.bfloat16])


@pytest.mark.parametrize("bits", [3, 5, 6, 7])
def test_decode_any_bits(bits):
    """Encode falls back for 3/5/6/7 bits; the decode kernel reads any width."""
    x = torch.randn(3, 257, device=DEV)
    _check_groups(x, bits, 256, out_dtypes=[torch.float32, torch.bfloat16])
    code = rgq.quantize_groups(x, bits, 7)
    _same(kgq.dequantize_groups(code), rgq.dequantize_groups(code))


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_of_stochastic_codes_identical(dtype):
    x = (torch.randn(3, 600, device=DEV) * 2).to(dtype)
    for code in (rgq.quantize_groups(x, 2, 256), kgq.quantize_groups(x, 2, 256)):
        for out in (dtype, torch.float32):
            _same(kgq.dequantize_groups(code, out), rgq.dequantize_groups(code, out))


# --------------------------------------------------------------------------------------
# ActNN groups: stochastic rounding
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("bits", "zero_exact", "dtype"), [(2, False, torch.float32),
                                                          (2, True, torch.float32),
                                                          (4, False, torch.bfloat16)])  # fmt: skip
def test_groups_stochastic_unbiased(bits, zero_exact, dtype):
    assert_groups_unbiased(kgq, bits, zero_exact, dtype, DEV)


@pytest.mark.parametrize(("bits", "dtype"), [(2, torch.float32), (4, torch.bfloat16)])
def test_groups_stochastic_matches_reference(bits, dtype):
    assert_groups_match_reference(kgq, bits, dtype, DEV)


def test_groups_stochastic_generator_semantics():
    assert_generator_semantics(kgq, DEV)


# --------------------------------------------------------------------------------------
# DIVISION
# --------------------------------------------------------------------------------------


def _check_division(x, block=8, bits=2, out_dtypes=None):
    return check_division(kdiv, x, block, bits, out_dtypes)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", [7, 14, 28])
def test_division_rtn_identical(size, dtype):
    shape = (2, 3, size, size) if size < 28 else (1, 2, size, size)
    x = (torch.randn(shape, device=DEV) * 2 + 0.5).to(dtype)
    _check_division(x, out_dtypes=[dtype, torch.float32])


@pytest.mark.parametrize(
    ("shape", "block", "bits"),
    [((2, 3, 7, 7), 8, 1), ((2, 3, 14, 14), 8, 4), ((2, 3, 50), 8, 2), ((1, 2, 5, 6, 7), 4, 2),
     ((2, 3, 9, 10), 4, 8)],
)  # fmt: skip
def test_division_shapes_and_bits(shape, block, bits):
    _check_division(torch.randn(shape, device=DEV), block, bits)


@pytest.mark.parametrize(
    ("shape", "block"), [((2, 3, 14, 14), 8), ((2, 3, 7, 7), 8), ((1, 2, 5, 6, 7), 4)]
)
def test_division_sums_blocks_in_the_reference_order(shape, block):
    x = order_sensitive_map(shape, block)
    assert_order_matters(x, block)
    _check_division(x.to(DEV), block, 2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_division_nonfinite_and_overflowing_rows(dtype):
    """Poisoned rows decode to their classes (NaN bit patterns included), only them."""
    x = torch.randn(2, 3, 7, 7, device=DEV)
    x[0, 0, 1, 2] = float("nan")
    x[0, 1, 6, 6] = float("inf")
    x[0, 2, 0, 0] = -float("inf")
    big = 3.3e38 if dtype == torch.float32 else torch.finfo(dtype).max
    x[1, 0, :4] = big  # the block means stay finite, the residual overflows (float32)
    x[1, 0, 4:] = -big
    x = x.to(dtype)
    ker = _check_division(x, out_dtypes=[torch.float32, torch.bfloat16, torch.float16])
    assert (ker.lfc[0, :3] == 0).all()
    if dtype == torch.float32:
        assert (ker.lfc[1, 0] == 0).all()
    y = kdiv.division_decode(ker)
    assert y[0, 1, 6, 6] == float("inf") and y[0, 2, 0, 0] == -float("inf")
    assert torch.isnan(y[0, 0]).all() and torch.isnan(y[0, 1]).sum() == 48
    assert torch.isfinite(y[1]).all()
    for out in (torch.bfloat16, torch.float16):  # finite rows stay finite in 16 bits
        assert torch.isfinite(kdiv.division_decode(ker, out)[1]).all()


def test_division_strided_input():
    x = torch.randn(2, 12, 5, device=DEV).permute(0, 2, 1)  # (N, D, L) view, as Dual uses
    _check_division(x)


def test_division_stochastic_unbiased():
    assert_division_unbiased(kdiv, DEV)


def test_division_stochastic_matches_reference():
    assert_division_matches_reference(kdiv, DEV)


# --------------------------------------------------------------------------------------
# Bit packing
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("numel", [1, 7, 8, 9, 1000])
def test_mask_pack_unpack(numel):
    mask = torch.rand(numel, device=DEV) > 0.5
    want = rpack.pack_bits(mask.to(torch.uint8), 1)
    got = kbits.pack_mask(mask)
    _same(got, want)
    back = kbits.unpack_mask(got, mask.shape)
    assert back.dtype == torch.bool and torch.equal(back, mask)


def test_mask_strided():
    mask = torch.rand(6, 50, device=DEV).t() > 0.3
    _same(kbits.pack_mask(mask), rpack.pack_bits(mask.reshape(-1).to(torch.uint8), 1))


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
def test_pack_unpack_bits(bits):
    codes = torch.randint(0, 2**bits, (1001,), device=DEV, dtype=torch.uint8)
    packed = rpack.pack_bits(codes, bits)
    _same(kbits.pack_bits(codes, bits), packed)
    _same(kbits.unpack_bits(packed, bits, 1001), codes)
    _same(kbits.unpack_bits(packed, bits, 10), codes[:10])
    with pytest.raises(ValueError):
        kbits.unpack_bits(packed[:3], bits, 1001)


# --------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------


def test_resolve_backend(monkeypatch):
    cpu = torch.zeros(3)
    monkeypatch.delenv(backend.ENV_VAR, raising=False)
    assert backend.resolve_backend(cpu) == "reference"  # auto: CUDA tensors only
    assert backend.resolve_backend(cpu, "triton") == "triton"  # forcible under the interpreter
    assert backend.resolve_backend(cpu, "REFERENCE") == "reference"
    monkeypatch.setenv(backend.ENV_VAR, "triton")
    assert backend.resolve_backend(cpu) == "triton"
    assert backend.resolve_backend(cpu, "auto") == "reference"  # the argument wins
    monkeypatch.setenv(backend.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="ACTPACK_BACKEND"):
        backend.resolve_backend(cpu)
    with pytest.raises(ValueError, match="backend"):
        backend.resolve_backend(cpu, "cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="CUDA"):
        backend.resolve_backend(cpu, "triton")
    if CUDA:
        assert backend.resolve_backend(torch.zeros(3, device="cuda"), "auto") == "triton"


def test_dispatch_functions_match(monkeypatch):
    x = torch.randn(2, 300, device=DEV)
    for name in ("reference", "triton"):
        code = backend.quantize_groups(x, 2, 256, stochastic=False, backend=name)
        _same(backend.dequantize_groups(code, backend=name), rgq.dequantize_groups(code))
    m = torch.randn(5, 13, device=DEV) > 0
    for name in ("reference", "triton"):
        assert torch.equal(backend.unpack_mask(backend.pack_mask(m, backend=name), m.shape), m)
    monkeypatch.setenv(backend.ENV_VAR, "triton")
    bits = Bits.encode(m)
    _same(bits.packed, rpack.pack_bits(m.reshape(-1).to(torch.uint8), 1))
    assert torch.equal(bits.decode(), m)


@pytest.mark.parametrize("strategy", ["actnn", "division"])
def test_strategies_route_through_kernels(monkeypatch, strategy):
    x = torch.randn(2, 4, 14, 14, device=DEV)
    make = (lambda: ActNN(stochastic=False)) if strategy == "actnn" else (
        lambda: Division(stochastic=False))  # fmt: skip
    monkeypatch.setenv(backend.ENV_VAR, "reference")
    want = make().encode(x, SaveInfo(op="conv2d"))
    monkeypatch.setenv(backend.ENV_VAR, "triton")
    got = make().encode(x, SaveInfo(op="conv2d"))
    inner_w = want.code if strategy == "actnn" else want.code.hfc
    inner_g = got.code if strategy == "actnn" else got.code.hfc
    _same_code(inner_w, inner_g)
    _same(got.decode(), want.decode())


def test_rotated_rows_route_through_kernels(monkeypatch):
    # The Hadamard codec has no kernel of its own (the rotation is one matmul
    # per block); its quantization goes through the group kernel, so round to
    # nearest must give the reference's codes bit for bit.
    from actpack.strategies.rows import RowActNN

    x = torch.randn(3, 20, 100, device=DEV)
    x[..., 7] *= 30
    monkeypatch.setenv(backend.ENV_VAR, "reference")
    want = RowActNN(stochastic=False, seed=0).encode(x, SaveInfo(op="linear"))
    monkeypatch.setenv(backend.ENV_VAR, "triton")
    got = RowActNN(stochastic=False, seed=0).encode(x, SaveInfo(op="linear"))
    _same(got.code.signs, want.code.signs)
    _same(got.code.plain, want.code.plain)
    _same_code(want.code.inner, got.code.inner)
    _same(got.decode(), want.decode())


def test_end_to_end_gradients_match(monkeypatch):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)
    ).to(DEV)
    x = torch.randn(48, 64, device=DEV)

    def grads(name):
        monkeypatch.setenv(backend.ENV_VAR, name)
        model.zero_grad()
        with actpack.compress(ActNN(bits=4, stochastic=False), model=model, min_numel=1024):
            loss = model(x).square().mean()
        loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    for a, b in zip(grads("reference"), grads("triton")):
        _same(a, b)


@pytest.mark.skipif(not CUDA, reason="host synchronisation can only be observed on CUDA")
def test_no_host_sync_on_cuda():
    x = torch.randn(8, 4096, device="cuda")
    m = torch.randn(2, 8, 28, 28, device="cuda")
    gen = torch.Generator("cuda").manual_seed(0)
    kgq.dequantize_groups(kgq.quantize_groups(x, 2, 256, generator=gen))  # compile first
    kdiv.division_decode(kdiv.division_encode(m, generator=gen))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        kgq.dequantize_groups(kgq.quantize_groups(x, 2, 256, generator=gen), torch.bfloat16)
        kdiv.division_decode(kdiv.division_encode(m, generator=gen))
        kbits.unpack_mask(kbits.pack_mask(x > 0), x.shape)
    finally:
        torch.cuda.set_sync_debug_mode("default")
