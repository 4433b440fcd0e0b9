"""The compiled Hadamard codec (:mod:`actpack.codecs.compiled.hadamard`)
against the reference (:mod:`actpack.codecs.hadamard`, run with
``ACTPACK_BACKEND=reference`` so that its quantization is the reference's too).

Round to nearest gives the reference's code bit for bit (signs, row flags,
packed codes, ranges) over float dtypes, widths with a tail of Hadamard
chunks, bit widths, both row choices (``adaptive``), and rows that must stay
unrotated (NaN, Inf, beyond the overflow limit); stochastic rounding gives
the reference's code for the compiled noise, and its decodes average to the
input.  Decodes equal the reference's but for NaN payloads.  Every equality
asserts that the compiled body served the call (a silent fall back to the
reference would make it vacuous), and the cases left to the reference are
asserted to be.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from fused_checks import DTYPES, compiled_codecs_only, perturbed, same

from actpack.codecs import backend
from actpack.codecs import groupquant as rgq
from actpack.codecs import hadamard as ref
from actpack.codecs.compiled import build
from actpack.codecs.compiled import hadamard as chad
from actpack.codecs.compiled.verify import same_values
from actpack.codecs.counter_noise import random_key, uniform

pytestmark = compiled_codecs_only()


@pytest.fixture
def bodies(monkeypatch):
    """The compiled bodies that served calls, by factory name."""
    seen: list[str] = []
    run = build.run

    def counted(factory, key, args, check=None):
        out = run(factory, key, args, check)
        if out is not None:
            seen.append(factory.__name__)
        return out

    monkeypatch.setattr(build, "run", counted)
    return seen


def _reference(monkeypatch, fn):
    monkeypatch.setenv("ACTPACK_BACKEND", "reference")
    try:
        return fn()
    finally:
        monkeypatch.delenv("ACTPACK_BACKEND")


def _rows(rows: int, cols: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Gaussian rows, with rows that must stay unrotated and rows each
    adaptive choice takes: an outlier among small values, one-sided values."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=gen)
    x[1, 3] = float("nan")
    x[2, 0], x[2, -1] = float("inf"), -float("inf")
    x[4] *= 0.01
    x[4, 1] = 30.0  # rotation shrinks the range
    x[5] = x[5].abs() + 2  # rotation widens it
    x[6] = 0.0
    if dtype == torch.float32:
        x[7, 2] = 3e38  # finite, but a rotated sum could overflow
    else:
        x[7, 2] = torch.finfo(dtype).max
    return x.to(dtype)


def _same_rotated(a: ref.RotatedCode, b: ref.RotatedCode) -> None:
    assert a.block == b.block and (a.rows, a.cols) == (b.rows, b.cols)
    same(a.signs, b.signs)
    same(a.plain, b.plain)
    same(a.inner.packed, b.inner.packed)
    same(a.inner.lo + 0.0, b.inner.lo + 0.0)  # the sign of a zero bound aside (same_bound)
    same(a.inner.hi + 0.0, b.inner.hi + 0.0)


# Each case compiles its configurations (tens of seconds of Inductor time on
# a 2-core CPU, CI's budget): every dtype, both row choices, a width with a
# tail of chunks, the default 3 bits and 2.
@pytest.mark.parametrize(
    ("dtype", "cols", "adaptive", "bits"),
    [
        (torch.float32, 64, True, (3,)),  # the configuration of the tests below
        (torch.bfloat16, 100, False, (3,)),  # 100: chunks of 64, 32 and 4
        (torch.float16, 64, True, (2,)),
    ],
)
def test_round_to_nearest_is_the_reference(monkeypatch, bodies, dtype, cols, adaptive, bits):
    x = _rows(40, cols, dtype)
    for bits in bits:  # noqa: B020

        def encode(x=x, bits=bits):
            gen = torch.Generator().manual_seed(11)
            return ref.hadamard_encode(x, bits, 64, adaptive=adaptive, stochastic=False,
                                       generator=gen)  # fmt: skip

        gen = torch.Generator().manual_seed(11)
        got = chad.hadamard_encode(x, bits, 64, adaptive=adaptive, stochastic=False, generator=gen)
        want = _reference(monkeypatch, encode)
        _same_rotated(got, want)
        assert "_rotated_encoder" in bodies, bodies
        bodies.clear()
        plain = ref.unpack_mask(got.plain, torch.Size([x.shape[0]]))
        # non-finite rows and rows beyond the limit (none in float16) stay unrotated
        assert plain[[1, 2] if dtype == torch.float16 else [1, 2, 7]].all()
        if adaptive:
            assert not plain[4] and plain[5]  # each choice is made
        else:
            assert not plain[[0, 3, 4, 5, 6]].any()
        for out in DTYPES:
            decoded = chad.hadamard_decode(got, out)
            assert "_unrotated_decoder" in bodies, bodies
            bodies.clear()
            expected = _reference(
                monkeypatch, lambda got=got, out=out: ref.hadamard_decode(got, out)
            )
            assert same_values(decoded, expected)


def test_stochastic_codes_are_the_references_for_the_compiled_noise(bodies):
    shape = (33, 64)
    x = _rows(*shape, torch.bfloat16, seed=3)
    got = chad.hadamard_encode(x, 3, 64, adaptive=True, generator=torch.Generator().manual_seed(5))
    assert "_rotated_encoder" in bodies
    # What the compiled encode draws, in its order: the signs, then the noise's key.
    gen = torch.Generator().manual_seed(5)
    values, plain = ref.rotated_rows(x, ref.random_signs(shape[1], gen, x.device), 64,
                                     shape[1], True)  # fmt: skip
    noise = uniform(torch.arange(x.numel()), random_key(gen, x.device))
    want = rgq.quantize_groups(values, 3, shape[1], stochastic=False, noise=noise)
    same(got.plain, ref.pack_mask(plain))
    same(got.inner.packed, want.packed)
    same(got.inner.lo + 0.0, want.lo + 0.0)


def test_stochastic_decodes_average_to_the_input():
    # A rotated row's error is a sum of `cols` independent rounding errors,
    # each of variance <= step**2 / 4 (step: its range over 7 levels), spread
    # by the orthogonal H: an element's error variance <= max step**2 / 4.
    # The mean of n draws lies within 5 sd / sqrt(n) (failure ~ 6e-7 a value).
    # (the configuration of the case above: no compile of its own)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 64, generator=gen).bfloat16()
    x[3, 7] = 25.0
    n = 200
    total = torch.zeros(x.shape)  # float32 sums
    worst = torch.zeros(())
    for _ in range(n):
        code = chad.hadamard_encode(x, 3, 64, adaptive=True, generator=gen)
        total += chad.hadamard_decode(code)
        worst = torch.maximum(worst, ((code.inner.hi - code.inner.lo).float() / 7).max())
    bound = 5 * (worst / 2) / n**0.5
    err = (total / n - x.float()).abs()
    assert err.max() <= bound, (err.max(), bound)
    # and not vacuous: one draw is far from the input
    one = chad.hadamard_decode(chad.hadamard_encode(x, 3, 64, adaptive=True, generator=gen))
    assert (one - x.float()).abs().max() > bound


@pytest.mark.parametrize(
    "case", ["groups within a row", "transposed", "float64", "sliced rows", "1-D", "bad block"]
)
def test_cases_left_to_the_reference(monkeypatch, bodies, case):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(24, 128, generator=gen)
    group_size, block = None, 64
    if case == "groups within a row":
        group_size = 64  # a row's ranges summed: the reference's order (module notes)
    elif case == "transposed":
        x = torch.randn(128, 24, generator=gen).t()
    elif case == "float64":
        x = x.double()
    elif case == "sliced rows":
        x = x[:, :100]
    elif case == "1-D":
        x = x[0]
    else:
        block = 48

    def encode(fn):
        return fn(x, 3, block, group_size, adaptive=True, stochastic=False,
                  generator=torch.Generator().manual_seed(4))  # fmt: skip

    if case in ("1-D", "bad block"):
        with pytest.raises(ValueError, match="2-D" if case == "1-D" else "power of two"):
            encode(chad.hadamard_encode)
        return
    got = encode(chad.hadamard_encode)
    assert "_rotated_encoder" not in bodies
    _same_rotated(got, _reference(monkeypatch, lambda: encode(ref.hadamard_encode)))


def test_backend_dispatch(monkeypatch, bodies):
    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(6))  # 16K elements
    code = backend.hadamard_encode(x, 3, 64, adaptive=True, stochastic=False)
    backend.hadamard_decode(code)
    assert "_rotated_encoder" in bodies and "_unrotated_decoder" in bodies
    bodies.clear()
    small = x[:200]  # below COMPILED_MIN_NUMEL: the reference
    backend.hadamard_decode(backend.hadamard_encode(small, 3, 64, adaptive=True, stochastic=False))
    assert "_rotated_encoder" not in bodies and "_unrotated_decoder" not in bodies
    monkeypatch.setenv("ACTPACK_BACKEND", "reference")
    backend.hadamard_decode(backend.hadamard_encode(x, 3, 64, adaptive=True, stochastic=False))
    assert "_rotated_encoder" not in bodies and "_unrotated_decoder" not in bodies


def test_large_codes_decode_with_the_reference_tail(monkeypatch, bodies):
    monkeypatch.setattr(chad, "DECODE_MAX_NUMEL", 1000)
    x = _rows(40, 64, torch.float32)
    code = chad.hadamard_encode(x, 3, 64, adaptive=True, stochastic=False)
    got = chad.hadamard_decode(code, torch.bfloat16)
    assert "_unrotated_decoder" not in bodies
    want = _reference(monkeypatch, lambda: ref.hadamard_decode(code, torch.bfloat16))
    assert same_values(got, want)


@pytest.mark.parametrize("codec", ["encode", "decode"])
def test_codes_unlike_the_reference_fall_back_with_one_warning(monkeypatch, codec):
    """A configuration whose result differs from the reference's on its probe
    (here one bit flipped, as an Inductor rounding otherwise would) is never
    used: the reference serves it, after one NumericsFallbackWarning."""
    monkeypatch.setattr(build, "_numerics_warned", False)
    build._compiled.cache_clear()
    x = _rows(24, 64, torch.float32)

    def encode(fn):
        return fn(x, 3, 64, adaptive=True, stochastic=False,
                  generator=torch.Generator().manual_seed(8))  # fmt: skip

    code = _reference(monkeypatch, lambda: encode(ref.hadamard_encode))
    if codec == "encode":
        monkeypatch.setattr(chad, "_rotated_encoder", perturbed(chad._rotated_encoder))

        def call():
            return encode(chad.hadamard_encode)
    else:
        monkeypatch.setattr(chad, "_unrotated_decoder", perturbed(chad._unrotated_decoder))

        def call():
            return chad.hadamard_decode(code, torch.bfloat16)

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = [call(), call()]
        assert [w.category for w in caught] == [build.NumericsFallbackWarning]
        for g in got:
            if codec == "encode":
                _same_rotated(g, code)
            else:
                want = _reference(monkeypatch, lambda: ref.hadamard_decode(code, torch.bfloat16))
                assert same_values(g, want)
    finally:
        build._compiled.cache_clear()


def test_a_pending_negation_is_read_as_its_values(monkeypatch, bodies):
    """A negated view (``torch._neg_view``: what ``z.conj().imag`` gives)
    holds -x in memory; the compiled body reads memory, so the encode
    resolves it first (as the group and DIVISION encoders do)."""
    x = _rows(24, 64, torch.float32)
    neg = torch._neg_view(x)

    def encode(fn, v):
        return fn(v, 3, 64, adaptive=True, stochastic=False,
                  generator=torch.Generator().manual_seed(9))  # fmt: skip

    got = encode(chad.hadamard_encode, neg)
    assert "_rotated_encoder" in bodies
    _same_rotated(got, _reference(monkeypatch, lambda: encode(ref.hadamard_encode, -x)))


def test_a_fall_back_draws_the_signs_once(monkeypatch):
    """Where the body cannot serve (here: another default dtype, which the
    bodies are not compiled for), the reference codes the signs already
    drawn: round to nearest still gives the reference's code for the same
    generator, and the generator moves as the reference's does."""
    x = _rows(24, 64, torch.float32)
    gens = [torch.Generator().manual_seed(12) for _ in range(2)]
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = chad.hadamard_encode(x, 3, 64, adaptive=True, stochastic=False, generator=gens[0])
        want = _reference(monkeypatch, lambda: ref.hadamard_encode(
            x, 3, 64, adaptive=True, stochastic=False, generator=gens[1]))  # fmt: skip
    finally:
        torch.set_default_dtype(previous)
    _same_rotated(got, want)
    assert torch.equal(gens[0].get_state(), gens[1].get_state())
