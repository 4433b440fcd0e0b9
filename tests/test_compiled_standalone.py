"""The standalone artifacts behind the compiled CPU codecs (no Dynamo per call).

An artifact has no guards of its own: :mod:`actpack.codecs.compiled.standalone`
checks the trace's shape guards and the argument facts they do not cover on
every call.  These tests check that what an artifact returns is bit for bit
what the ``torch.compile`` path returns and (round to nearest) what the
reference returns, over shapes that make the trace branch (sizes 1, tails,
odd sizes), strides, dtypes and both roundings; that a call its guards reject
is served by ``torch.compile`` with the same result; and that calls outside
the plain state never reach an artifact.
"""

from __future__ import annotations

import threading
import warnings

import pytest
import torch
from fused_checks import DTYPES, compiled_codecs_only, same, same_code, same_division

from actpack.codecs import division as rdiv
from actpack.codecs import groupquant as rgq
from actpack.codecs.compiled import build, standalone
from actpack.codecs.compiled import division as cdiv
from actpack.codecs.compiled import groupquant as cgq
from actpack.engine.untraced import eager_only

pytestmark = compiled_codecs_only()


@pytest.fixture
def served(monkeypatch):
    """Fresh configurations (no artifacts yet); counts the calls an artifact
    served (``hits``) and those it left to torch.compile (``misses``)."""
    build._compiled.cache_clear()
    counts = {"hits": 0, "misses": 0, "direct": []}
    call = standalone.Standalone.__call__
    direct = standalone._direct

    def counted(self, args, quiet):
        out = call(self, args, quiet)
        counts["misses" if out is standalone.MISS else "hits"] += 1
        return out

    def recorded(fn, args):  # whether each artifact's graph is called directly
        out = direct(fn, args)
        counts["direct"].append(out is not None)
        return out

    monkeypatch.setattr(standalone.Standalone, "__call__", counted)
    monkeypatch.setattr(standalone, "_direct", recorded)
    yield counts
    build._compiled.cache_clear()


def _torch_compile_only(fn):
    """``fn()`` with every artifact declined: the torch.compile path alone."""
    mp = pytest.MonkeyPatch()
    mp.setattr(standalone.Standalone, "__call__", lambda self, args, quiet: standalone.MISS)
    try:
        return fn()
    finally:
        mp.undo()


# Round to nearest in float32 (decoded to every dtype), stochastic rounding
# (compared with the torch.compile path only) in bfloat16: each case compiles
# its configurations afresh on both paths, about a minute of Inductor time on
# a 2-core CPU (CI's budget).  Every dtype's artifacts are compared with the
# reference in test_compiled_codecs.py, where they serve the calls; what is
# particular here is the torch.compile path beside them.
_CASES = [(torch.float32, False), (torch.bfloat16, True)]
# Stochastic rounding skips the inputs of sizes 1 and the odd ones: their
# shape facts are the round-to-nearest case's, and each input compiles its
# configurations twice more (CI's 30 minutes on 2 cores).
_STOCHASTIC_SKIP = (1, 3)


def _groups_inputs(dtype):
    gen = torch.Generator().manual_seed(1)
    yield torch.randn(3, 255, generator=gen).to(dtype)  # a padded tail
    yield torch.randn(1, 1, generator=gen).to(dtype)  # sizes 1
    yield torch.randn(4, 512, generator=gen).to(dtype)  # whole groups
    yield torch.randn(7, 1001, generator=gen).to(dtype)  # odd
    yield torch.randn(300, 5, generator=gen).to(dtype).t()  # not contiguous


def _assert_direct(served):
    """Every artifact of the codecs was found to be its Inductor graph
    called directly (so the equalities asserted were the direct call's),
    on a torch with the internals that needs."""
    if standalone.CompiledFxGraph is not None and standalone.get_eval_frame_callback is not None:
        assert served["direct"] and all(served["direct"]), served["direct"]


@pytest.mark.parametrize(("dtype", "stochastic"), _CASES)
def test_groups_standalone_is_torch_compile_and_reference(served, dtype, stochastic):
    for i, x in enumerate(_groups_inputs(dtype)):
        if stochastic and i in _STOCHASTIC_SKIP:
            continue

        def encode(x=x):
            gen = torch.Generator().manual_seed(7)
            return cgq.quantize_groups(x, 2, 256, stochastic=stochastic, generator=gen)

        got = encode()
        same_code(got, _torch_compile_only(encode))
        if stochastic:
            continue  # decoding does not depend on how the codes were rounded
        same_code(got, rgq.quantize_groups(x, 2, 256, stochastic=False))
        for out in DTYPES:
            want = _torch_compile_only(lambda got=got, out=out: cgq.dequantize_groups(got, out))
            same(cgq.dequantize_groups(got, out), want)
            same(want, rgq.dequantize_groups(got, out))
    assert served["hits"] > 0
    _assert_direct(served)


def _division_inputs(dtype):
    gen = torch.Generator().manual_seed(2)
    yield torch.randn(2, 3, 16, 16, generator=gen).to(dtype)  # whole blocks
    yield torch.randn(1, 1, 7, 7, generator=gen).to(dtype)  # sizes 1, one partial block
    yield (
        torch.randn(2, 3, 9, 6, generator=gen)
        .to(dtype)
        .contiguous(memory_format=torch.channels_last)
    )
    yield torch.randn(2, 12, 5, generator=gen).to(dtype).permute(0, 2, 1)  # tokens view
    yield torch.randn(3, 5, 41, generator=gen).to(dtype)  # odd, 1-D


@pytest.mark.parametrize(("dtype", "stochastic"), _CASES)
def test_division_standalone_is_torch_compile_and_reference(served, dtype, stochastic):
    for i, x in enumerate(_division_inputs(dtype)):
        if stochastic and i in (1, 4):  # sizes 1, odd 1-D (see _STOCHASTIC_SKIP)
            continue

        def encode(x=x):
            gen = torch.Generator().manual_seed(7)
            return cdiv.division_encode(x, 8, 2, stochastic=stochastic, generator=gen)

        got = encode()
        same_division(got, _torch_compile_only(encode))
        if stochastic:
            continue  # decoding does not depend on how the codes were rounded
        same_division(got, rdiv.division_encode(x, 8, 2, stochastic=False))
        want = _torch_compile_only(lambda got=got: cdiv.division_decode(got, dtype))
        same(cdiv.division_decode(got, dtype), want)
        same(want, rdiv.division_decode(got, dtype))
    assert served["hits"] > 0
    _assert_direct(served)


def test_guard_mismatch_falls_back_to_torch_compile(served, monkeypatch):
    """One artifact allowed (the one compiled for the configuration's check
    against the reference, run before its first result is used, which also
    serves the caller's shapes): calls its guards reject (a size 1 where the
    trace saw more, a tail where it saw whole groups, another stride) are
    served by torch.compile, with the reference's result."""
    monkeypatch.setattr(standalone, "MAX_ARTIFACTS", 1)
    first = torch.randn(4, 512)
    same_code(cgq.quantize_groups(first, 2, 256, stochastic=False),
              rgq.quantize_groups(first, 2, 256, stochastic=False))  # fmt: skip
    hits = served["hits"]
    assert hits > 0
    misses = served["misses"]
    for x in (torch.randn(1, 256), torch.randn(3, 300), torch.randn(512, 6).t()):
        same_code(cgq.quantize_groups(x, 2, 256, stochastic=False),
                  rgq.quantize_groups(x, 2, 256, stochastic=False))  # fmt: skip
    assert served["misses"] > misses
    # The artifact still serves the calls it was traced for.
    hits = served["hits"]
    cgq.quantize_groups(torch.randn(8, 1024), 2, 256, stochastic=False)
    assert served["hits"] > hits


# Saved tensors as the built-in models make them (resnet-tiny, gpt-tiny):
# each codec's first call compiles one artifact, for its check's probe, and
# that verified artifact serves the call (the probes keep the shape facts
# Inductor specialises on: a group of more than one LANES vector, lo and hi
# as (groups, 1), whole blocks and whole words of codes).
_COMMON_SAVES = {
    "groups, 2-bit": lambda: cgq.dequantize_groups(
        cgq.quantize_groups(torch.randn(512, 256), 2, 256)
    ),
    "groups, rows of 128 groups": lambda: cgq.dequantize_groups(
        cgq.quantize_groups(torch.randn(1, 128 * 256), 3, 256, stochastic=False)
    ),
    "groups of 64, 3-bit": lambda: cgq.quantize_groups(torch.randn(512, 64), 3, 64),
    "division, 2-D blocks": lambda: cdiv.division_decode(
        cdiv.division_encode(torch.randn(8, 16, 32, 32), 8, 2)
    ),
    "division, rows": lambda: cdiv.division_decode(
        cdiv.division_encode(torch.randn(8, 64, 64), 8, 2)
    ),
}


@pytest.mark.parametrize("save", list(_COMMON_SAVES), ids=list(_COMMON_SAVES))
def test_the_verified_artifact_serves_common_saves(served, monkeypatch, save):
    compiled = []
    compile_ = standalone.Standalone._compile

    def counted(self, facts, args):
        compiled.append(self.name)
        return compile_(self, facts, args)

    monkeypatch.setattr(standalone.Standalone, "_compile", counted)
    _COMMON_SAVES[save]()
    assert compiled and sorted(compiled) == sorted(set(compiled)), compiled
    assert served["misses"] == 0


def test_artifacts_are_not_served_by_the_fx_graph_cache(served):
    """A graph of make_fx has no SymInt inputs, so Inductor's FX graph cache
    keeps an entry of it with no guards and serves it to any later trace of
    the same graph code, without the guards Inductor added while compiling
    it: an artifact for a padded row width of 16 (which Inductor's indexing
    guards on) then coded a width of 256 otherwise than the reference.
    Artifacts compile without that cache; the second is compiled for its
    own sizes."""
    from torch._dynamo.utils import counters

    cases = [
        (torch.randn(rows, cols).to(dtype), group_size)
        for dtype in (torch.float32, torch.bfloat16)  # a 32-bit and a 16-bit input
        for (rows, cols), group_size in [((7, 6), 16), ((33, 16), 256)]
    ]
    cache_hits = counters["inductor"]["fxgraph_cache_hit"]
    got = [cgq.quantize_groups(x, 2, g, stochastic=False) for x, g in cases]
    assert served["hits"] > 0 and served["misses"] == 0  # all served by artifacts
    for code, (x, g) in zip(got, cases):
        same_code(code, rgq.quantize_groups(x, 2, g, stochastic=False))
    assert counters["inductor"]["fxgraph_cache_hit"] == cache_hits
    for code, (x, g) in zip(got, cases):
        same_code(
            code,
            _torch_compile_only(lambda x=x, g=g: cgq.quantize_groups(x, 2, g, stochastic=False)),
        )


def _scale():
    def body(x, y):
        return x * 2 + y[: x.shape[0]].sum()

    return body


def test_guards_cover_sizes_strides_and_facts():
    """What the shape guards and the facts reject, directly on an artifact."""
    from contextlib import nullcontext

    sa = standalone.Standalone(_scale(), "scale", build._OPTIONS)
    x, y = torch.randn(4, 6), torch.randn(9, 6)
    with torch.no_grad():
        same(sa((x, y), nullcontext), _scale()(x, y))
        (artifact,) = sa.artifacts
        for ok in [(torch.randn(5, 7), torch.randn(6, 7)), (x, torch.randn(4, 6))]:
            assert artifact.facts == standalone._facts(ok) and artifact.guard(*ok)
        rejected = [
            (torch.randn(1, 6), y),  # a size 1
            (torch.randn(6, 4).t(), y),  # another stride
            (x, torch.randn(3, 6)),  # y[:4] of 3 rows: a branch the trace did not take
            (torch.randn(10, 6)[1:5], y),  # a storage offset
        ]
        for args in rejected:
            assert not artifact.guard(*args)
        for args in [(x.double(), y), (x[None], y), (x.to_sparse(), y)]:
            assert standalone._facts(args) != artifact.facts
        assert standalone._facts((x, 2)) is None
    # Outside the plain state no artifact is called.
    assert sa((x, y), nullcontext) is standalone.MISS  # grad enabled
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert sa((x, y), nullcontext) is standalone.MISS


def test_layouts_are_remembered_with_the_artifact_that_serves_them(monkeypatch):
    """A layout (sizes, strides, storage offsets, facts) the guards judged
    once is not judged again: the same answer, without evaluating them.  A
    layout differing in any of them is judged afresh."""
    from contextlib import nullcontext

    def twice_plus(x, y):  # elementwise: the artifact's result is exact
        return x * 2 + y[: x.shape[0]]

    monkeypatch.setattr(standalone, "MAX_ARTIFACTS", 1)
    sa = standalone.Standalone(twice_plus, "twice_plus", build._OPTIONS)
    x, y = torch.randn(4, 6), torch.randn(9, 6)
    with torch.no_grad():
        same(sa((x, y), nullcontext), twice_plus(x, y))
        (artifact,) = sa.artifacts
        judged = []
        guard = artifact.guard
        artifact.guard = lambda *args: judged.append(args) or guard(*args)
        calls = [  # (arguments, whether the artifact serves them)
            ((torch.randn(4, 6), torch.randn(9, 6)), True),  # the traced layout
            ((torch.randn(6, 4).t(), y), False),  # another stride
            ((torch.randn(10, 6)[1:5], y), False),  # a storage offset
            ((x.double(), y.double()), False),  # other facts: no guard to evaluate
            ((torch.randn(4, 6).requires_grad_(), y), False),  # requires_grad
            ((torch._neg_view(torch.randn(4, 6)), y), False),  # a dispatch key (Negative)
            ((torch.randn(5, 6), torch.randn(7, 6)), True),  # other sizes
        ]
        for again in (False, True, True):
            for args, served in calls:
                out = sa(args, nullcontext)
                if served:
                    same(out, twice_plus(*args))
                else:
                    assert out is standalone.MISS
            if not again:  # the stride, the offset, the other sizes: judged
                first = len(judged)
                assert first >= 3
        assert len(judged) == first  # and not again


def test_empty_trace_serves_empty_calls_only():
    from contextlib import nullcontext

    sa = standalone.Standalone(_scale(), "scale", build._OPTIONS)
    with torch.no_grad():
        empty = (torch.randn(0, 3), torch.randn(2, 3))
        same(sa(empty, nullcontext), _scale()(*empty))
        assert not sa.artifacts[0].guard(torch.randn(2, 3), torch.randn(2, 3))


def test_threads_share_a_configuration(served):
    """Two threads calling one configuration at once: one compiles, both
    get the reference's result."""
    xs = [torch.randn(5, 700), torch.randn(9, 700)]
    want = [rgq.quantize_groups(x, 2, 256, stochastic=False) for x in xs]
    got: list = [None, None]
    errors: list = []
    start = threading.Barrier(2)

    def work(i):
        try:
            start.wait()
            got[i] = cgq.quantize_groups(xs[i], 2, 256, stochastic=False)
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, [str(e)[:3000] for e in errors]
    for g, w in zip(got, want):
        same_code(g, w)
    assert served["hits"] > 0


@pytest.mark.parametrize("missing", ["internals", "standalone_compile"])
def test_missing_internals_fall_back_to_torch_compile(served, monkeypatch, missing):
    """A torch whose private internals the artifacts need are missing or
    changed (torch 2.11's standalone_compile took no ``donate_graph_module``)
    serves every call through torch.compile: the reference's codes, no
    warning, no error."""
    if missing == "internals":  # e.g. make_fx or the compile lock gone
        monkeypatch.setattr(standalone, "_SUPPORTED", False)
    else:

        def changed(*args, **kwargs):
            raise TypeError("standalone_compile() got an unexpected keyword argument")

        monkeypatch.setattr(torch._inductor, "standalone_compile", changed)
    for x in (torch.randn(4, 512), torch.randn(3, 300)):
        same_code(cgq.quantize_groups(x, 2, 256, stochastic=False),
                  rgq.quantize_groups(x, 2, 256, stochastic=False))  # fmt: skip
    assert served["hits"] == 0 and served["misses"] > 0
    assert standalone.supported()  # this torch has them: the test simulated their absence


def _direct_bodies():
    """(body, whether its Inductor graph may be called directly): fresh
    outputs in a tuple, one output, outputs sharing one buffer; and bodies
    whose AOTAutograd wrapper does work of its own: an output that is a view
    or the very tensor of an argument, an argument mutated in place."""

    # Elementwise bodies: Inductor's result is the eager one bit for bit.
    def pair(x, y):
        return x * 2, y + 1

    def one(x, y):
        return x * 2 + y

    def shared(x, y):
        both = torch.cat([x, y]) * 3
        return both[: x.shape[0]], both[x.shape[0] :]

    def view_of_argument(x, y):
        return x[1:], y * 2

    def argument_itself(x, y):
        return x, y * 2

    def mutates(x, y):
        y.add_(1)
        return x * 2

    return [
        (pair, True),
        (one, True),
        (shared, True),
        (view_of_argument, False),
        (argument_itself, False),
        (mutates, False),
    ]


@pytest.mark.skipif(
    standalone.CompiledFxGraph is None or standalone.get_eval_frame_callback is None,
    reason="this torch lacks the internals of the direct call",
)
@pytest.mark.parametrize(
    ("body", "direct"), _direct_bodies(), ids=[body.__name__ for body, _ in _direct_bodies()]
)
def test_graph_called_directly_only_where_that_is_the_wrapped_call(body, direct):
    """An artifact's Inductor graph is called without AOTAutograd's wrapper
    only where the wrapper adds nothing: every output fresh (an output
    aliasing an argument, or an argument mutated, keep the wrapper).  Either
    way each call returns what the body returns eagerly, on other sizes
    too, with the same storage sharing."""
    from contextlib import nullcontext

    sa = standalone.Standalone(body, body.__name__, build._OPTIONS)
    for rows in (4, 6, 4):
        x, y = torch.randn(rows, 5), torch.randn(rows, 5)
        x2, y2 = x.clone(), y.clone()
        with torch.no_grad():
            got = sa((x, y), nullcontext)
            want = body(x2, y2)
        assert got is not standalone.MISS
        got = [got] if isinstance(got, torch.Tensor) else list(got)
        want = [want] if isinstance(want, torch.Tensor) else list(want)
        assert len(got) == len(want)
        for g, w in zip(got, want):
            same(g, w)
        same(y, y2)  # the mutation, where the body mutates
        args = {x.untyped_storage().data_ptr(): "x", y.untyped_storage().data_ptr(): "y"}
        args2 = {x2.untyped_storage().data_ptr(): "x", y2.untyped_storage().data_ptr(): "y"}
        owners = [args.get(g.untyped_storage().data_ptr()) for g in got]
        assert owners == [args2.get(w.untyped_storage().data_ptr()) for w in want]
        ptrs = [g.untyped_storage().data_ptr() for g in got]
        ptrs2 = [w.untyped_storage().data_ptr() for w in want]
        assert [[a == b for b in ptrs] for a in ptrs] == [[a == b for b in ptrs2] for a in ptrs2]
        (artifact,) = sa.artifacts
        assert (artifact.direct is not None) == direct


@pytest.mark.skipif(
    standalone.CompiledFxGraph is None or standalone.get_eval_frame_callback is None,
    reason="this torch lacks the internals of the direct call",
)
def test_a_running_compiled_function_gets_the_wrapped_call(monkeypatch):
    """While Dynamo's frame callback is installed (a compiled function's
    eager code), it would reach the graph's Python frames: the artifact is
    called through its wrapper, whose disable context keeps Dynamo out.  In
    the engine's hooks (run as plain Python, ``eager_only``) Dynamo clears
    its callback, and a call there is served right, with no warning."""
    from contextlib import nullcontext

    def body(x, y):
        return x * 2, y + 1

    sa = standalone.Standalone(body, "body", build._OPTIONS)
    x, y = torch.randn(4, 5), torch.randn(4, 5)
    with torch.no_grad():
        sa((x, y), nullcontext)
    (artifact,) = sa.artifacts
    calls = []
    graph = artifact.direct
    artifact.direct = lambda args: calls.append(1) or graph(args)

    def call():
        with torch.no_grad():
            return sa((x, y), nullcontext)

    monkeypatch.setattr(standalone, "get_eval_frame_callback", lambda: object())
    same(call()[0], x * 2)  # a callback installed: the wrapper
    assert calls == []
    monkeypatch.setattr(standalone, "get_eval_frame_callback", lambda: None)
    same(call()[1], y + 1)  # none: the graph directly
    assert calls == [1]
    monkeypatch.undo()

    eager_only(call)  # as the engine's pack hooks are

    def compiled_caller(t):
        torch._dynamo.graph_break()
        out = call()  # eager code of a compiled function
        return out, t + 1

    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, _ = torch.compile(compiled_caller, backend="eager")(torch.ones(2))
    assert [str(w.message)[:100] for w in caught] == []  # Dynamo traced none of it
    same(out[0], x * 2)
    same(out[1], y + 1)
