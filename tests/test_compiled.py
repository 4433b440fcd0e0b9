"""Compile-native compression: hooks inlined into torch.compile's graphs (CPU, Inductor).

Covers the traceable codecs (:mod:`actpack.codecs.traceable`), the decisions
made from the FX graphs (:mod:`actpack.engine.graphfacts`), the private torch
API they rely on, and compiled training steps: exactness under ``"none"``,
gradient fidelity against eager under the same strategy, graph breaks and
recompilations, dynamic shapes, bf16 autocast, the AOT autograd cache, and
the built-in and HF models.  Inductor compiles are slow on CPU: models are
tiny, and checks that need no Inductor lowering use the ``aot_eager`` backend
(the hooks are inlined by AOTAutograd either way).
"""

from __future__ import annotations

import functools
import importlib
import math
import pathlib
import shutil
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from small_models import tiny_gpt2_config
from torch import nn

import actpack
from actpack.codecs import groupquant, traceable
from actpack.engine import compiled
from actpack.policy.decide import Kind

pytestmark = pytest.mark.skipif(not compiled.available(), reason="torch cannot inline hooks")


class _Counters:
    """torch._dynamo.utils.counters, imported on first use: importing Dynamo
    imports Triton, which tests/test_kernels.py configures at collection."""

    def __getitem__(self, key):
        from torch._dynamo.utils import counters

        return counters[key]

    def clear(self) -> None:
        from torch._dynamo.utils import counters

        counters.clear()


counters = _Counters()


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # Each test traces its hooks (and records their decisions): no graph from
    # AOTAutograd's on-disk cache, except where the cache itself is tested.
    torch._dynamo.reset()
    counters.clear()
    with torch._functorch.config.patch(enable_autograd_cache=False):
        yield
    torch._dynamo.reset()


class Block(nn.Module):
    """LayerNorm -> Linear -> activation -> Linear, plus the residual."""

    def __init__(self, dim: int = 32, act: nn.Module | None = None) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.act = act if act is not None else nn.GELU()

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(self.ln(x))))


def _mlp(act: type[nn.Module] = nn.GELU, depth: int = 2, dim: int = 32) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[Block(dim, act()) for _ in range(depth)])


class MaskedBlock(nn.Module):
    """A block that masks its scores with finfo.min before a softmax (what
    attention masks do): the eager tracker tags such fills, and must stay out
    of Dynamo's trace of them."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.score, self.out = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.score(x)
        s = s.masked_fill(s < -1, torch.finfo(s.dtype).min)
        return x + self.out(s.softmax(-1) * x)


def _masked(depth: int = 2, dim: int = 32) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[MaskedBlock(dim) for _ in range(depth)])


def _grads(model: nn.Module, x: torch.Tensor, run=None) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    out = (run or model)(x)
    out.float().pow(2).mean().backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def _decisions(engine) -> list[compiled.Decision]:
    return list(engine._graph_hooks.decisions.values())


# --------------------------------------------------------------------------- #
# Private torch API this path relies on (changes without notice: pinned here)
# --------------------------------------------------------------------------- #


def test_private_torch_api_is_there():
    from torch._functorch._aot_autograd import graph_compile, utils

    assert callable(graph_compile._get_saved_tensor_hook_context)
    assert callable(graph_compile.maybe_inline_graph_saved_tensors_hooks)
    assert callable(utils.saved_tensors_hooks_are_inlineable)
    assert torch._functorch.config.saved_tensors_hooks_filtering_mode == "donated"
    importlib.import_module("torch._inductor.inductor_prims")  # registers the prims
    seeds = torch.ops.prims.inductor_seeds.default(1, torch.device("cpu"))
    assert seeds.shape == (1,) and seeds.dtype == torch.int64


def _spy_pair(pack):
    """A GraphModule saved-tensor hook pair calling ``pack`` (unpack: the
    identity): GraphModules are what AOTAutograd inlines and traces."""
    graph = torch.fx.Graph()
    graph.output(graph.call_function(pack, (graph.placeholder("x"),)))
    pack_gm = torch.fx.GraphModule(nn.Module(), graph)
    graph = torch.fx.Graph()
    graph.output(graph.placeholder("p"))
    return pack_gm, torch.fx.GraphModule(nn.Module(), graph)


def test_forward_inputs_record_requires_grad():
    # What graphfacts.history_free reads: each forward input's requires_grad
    # in its tensor_meta (the example values are detached: all False), and
    # intermediates traced below autograd (False whatever their inputs).
    seen = {}

    def pack(x):
        state = compiled._trace_state()
        if state is not None:
            for node in state["_fw_graph"].find_nodes(op="placeholder"):
                seen[node.name] = node.meta["tensor_meta"].requires_grad
        return x

    pack_gm, unpack_gm = _spy_pair(pack)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(32, 32)
            self.register_buffer("buf", torch.rand(32))

        def forward(self, x):
            return self.lin(x * self.buf).relu()

    with torch.autograd.graph.saved_tensors_hooks(pack_gm, unpack_gm):
        torch.compile(Net(), backend="aot_eager")(torch.randn(2, 8, 32))
    # weight and bias require grad; the batch and the buffer do not.
    assert sorted(seen.values()) == [False, False, True, True], seen


def test_hook_context_hands_over_node_and_both_graphs():
    # What graphfacts reads: the saved node, and the backward placeholder of
    # the same name whose users are the ops that read the save.
    seen = {}

    def pack(x):
        state = compiled._trace_state()
        if state is not None:
            node, bw = state["_node"], state["_bw_graph"]
            names = [n.name for n in bw.find_nodes(op="placeholder")]
            seen[node.name] = (node.name in names, isinstance(state["_fw_graph"], torch.fx.Graph))
        return x

    pack_gm, unpack_gm = _spy_pair(pack)
    model = _mlp(depth=1)
    with torch.autograd.graph.saved_tensors_hooks(pack_gm, unpack_gm):
        torch.compile(model, backend="aot_eager")(torch.randn(2, 8, 32))
    assert seen and all(found and fw for found, fw in seen.values())


# --------------------------------------------------------------------------- #
# Traceable codecs
# --------------------------------------------------------------------------- #


def _awkward(rows: int = 6, cols: int = 300) -> torch.Tensor:
    x = torch.randn(rows, cols) * torch.logspace(-3, 3, rows).unsqueeze(1)
    x[1, 5], x[2, 7], x[2, 8], x[3, :] = math.nan, math.inf, -math.inf, 0.25
    return x


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_round_to_nearest_is_the_reference_code(bits):
    x = _awkward()
    for zero_exact, data in ((False, x), (bits >= 2, x.abs().nan_to_num(0.0))):
        got = traceable.quantize_groups(data, bits, 64, None, zero_exact=zero_exact)
        ref = groupquant.quantize_groups(data, bits, 64, stochastic=False, zero_exact=zero_exact)
        for a, b in zip((got.packed, got.lo, got.hi), (ref.packed, ref.lo, ref.hi)):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize(
    ("shape", "group_size", "dtype"),
    [((17, 137), 33, torch.bfloat16), ((85, 33), 33, torch.float16)],
)
def test_codes_compiled_into_a_graph_are_the_reference_for_16_bit_tails(shape, group_size, dtype):
    # With a 16-bit input, torch 2.13's Inductor stored the uint8 codes of
    # 32 groups at a time through a masked store whose mask overflows past
    # 64 bytes: the fused CPU encoder left the last codes of a tail of 17-31
    # groups unwritten (tests/test_compiled_codecs.py).  These geometries
    # (85 groups: a tail of 21) inlined into a user's compiled graph.
    torch.manual_seed(0)
    x = (torch.randn(*shape) * 3).to(dtype)
    fn = torch.compile(
        lambda x: traceable.quantize_groups(x, 2, group_size, None), dynamic=False, fullgraph=True
    )
    with warnings.catch_warnings():
        # Inductor's note on codegen of a float16 input with bfloat16 ranges
        # (shown when it compiles the kernel, not when a cache serves it).
        warnings.filterwarnings("ignore", "bf16 and fp16 are mixed")
        got = fn(x)
    ref = groupquant.quantize_groups(x, 2, group_size, stochastic=False)
    assert torch.equal(got.packed, ref.packed)
    assert torch.equal(got.lo.view(torch.int16), ref.lo.view(torch.int16))
    assert torch.equal(got.hi.view(torch.int16), ref.hi.view(torch.int16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vectorisable_decode_is_the_reference_decode(dtype):
    x = _awkward(6, 700)
    key = traceable.random_key(torch.Generator().manual_seed(4))
    for bits in (1, 2, 4, 8):
        for zero_exact, data in ((False, x), (bits >= 2, x.abs().nan_to_num(0.0))):
            code = traceable.quantize_groups(data, bits, 128, key, zero_exact=zero_exact)
            got = traceable.dequantize_groups(code, dtype)
            torch.testing.assert_close(
                got, groupquant.dequantize_groups(code, dtype), rtol=0, atol=0, equal_nan=True
            )


def test_round_out_bf16_is_outward_and_tight():
    # The bit-cut rounding must give the nearest bf16 on the required side.
    v = torch.cat(
        [torch.randn(4000) * 10.0 ** torch.randint(-40, 38, (4000,)).float(),
         torch.tensor([0.0, -0.0, 1e-45, -1e-45, 3.3e38, -3.3e38, 3.4e38, 1.0, -1.0])]
    )  # fmt: skip
    v = v[torch.isfinite(v)]
    big = torch.finfo(torch.bfloat16).max
    for down in (True, False):
        r = groupquant._round_out(v, torch.bfloat16, down=down).float()
        inside = v.abs() <= big
        if down:
            assert bool((r[inside] <= v[inside]).all())
        else:
            assert bool((r[inside] >= v[inside]).all())
        beyond = torch.nextafter(
            r.to(torch.bfloat16), torch.full_like(r, math.inf if down else -math.inf).bfloat16()
        ).float()
        # The next bf16 outwards... inwards from r crosses v: r is the tightest.
        tight = beyond > v if down else beyond < v
        assert bool(tight[inside & (r.abs() < big)].all())


def test_stochastic_rounding_is_unbiased_over_keys():
    torch.manual_seed(0)
    x = torch.randn(8, 512)
    gen = torch.Generator().manual_seed(2)

    def mean_error(k: int) -> float:
        acc = torch.zeros_like(x)
        for _ in range(k):
            code = traceable.quantize_groups(x, 2, 128, traceable.random_key(gen))
            acc += groupquant.dequantize_groups(code)
        return (acc / k - x).pow(2).mean().item()

    one, many = mean_error(1), mean_error(64)
    # Unbiased: the squared error of the mean falls as 1/K (3x slack).
    assert many < 3 * one / 64


def test_compiled_codec_equals_eager_codec():
    x = _awkward(8, 700)
    key = traceable.random_key(torch.Generator().manual_seed(3))

    def encode(x, key):
        code = traceable.quantize_groups(x, 2, 256, key)
        return code.packed, code.lo, code.hi

    got = torch.compile(encode, fullgraph=True)(x, key)
    for a, b in zip(got, encode(x, key)):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


# --------------------------------------------------------------------------- #
# Decisions from the graph (aot_eager: AOTAutograd inlines the hooks either way)
# --------------------------------------------------------------------------- #


class Mixed(nn.Module):
    """Conv-BN-ReLU-pool-dropout-hardtanh, then LayerNorm-MLP with ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.ln, self.fc1, self.fc2 = nn.LayerNorm(128), nn.Linear(128, 256), nn.Linear(256, 10)

    def forward(self, x):
        h = F.max_pool2d(F.relu(self.bn(self.conv(x))), 2)
        h = F.hardtanh(F.dropout(h, 0.2)).flatten(1)
        return self.fc2(F.relu(self.fc1(self.ln(h))))


def _compiled_step(model, x, engine, backend="aot_eager", **kw):
    run = torch.compile(model, backend=backend, **kw)
    with engine:
        out = run(x)
    out.float().pow(2).mean().backward()
    return _decisions(engine)


def test_decisions_follow_the_graph():
    torch.manual_seed(0)
    model, x = Mixed(), torch.randn(16, 3, 8, 8)
    engine = actpack.compress("actnn", min_numel=64)
    by_node = {d.node: d for d in _compiled_step(model, x, engine)}
    kinds = {d.kind for d in by_node.values()}
    assert Kind.LOSSY in kinds and Kind.BITS in kinds
    for d in by_node.values():
        # Masks (ReLU's le, dropout's gt, hardtanh's bounds) in 1 bit, lossless.
        if d.producer in ("le", "gt", "bitwise_or"):
            assert (d.kind, d.form, d.after) == (Kind.BITS, "bits", d.before // 8)
        # Statistics (BatchNorm/LayerNorm mean and rstd) are constants to backward.
        if d.producer == "rsqrt" or (d.producer == "getitem" and d.readers == ("sub",)):
            assert d.kind is Kind.EXACT and d.form == "exact"
            assert d.reason in ("op statistics", "tiny")
    # Max-pool indices (int64 here; Inductor's own int8 offsets in
    # test_inductor_step_under_autocast): the offset in a 2x2 window, 2 bits.
    pool = [d for d in by_node.values() if d.readers == ("max_pool2d_with_indices_backward",)]
    assert pool and all(d.kind is Kind.COMPACT and d.form == "pool" for d in pool)
    assert all(d.after * 32 == d.before for d in pool)
    norm = [d for d in by_node.values() if d.op == "layer_norm"]
    assert norm and all(d.form == "groups" for d in norm)
    batchnorm = [d for d in by_node.values() if d.op == "batch_norm"]
    assert batchnorm and all(d.form == "groups" for d in batchnorm)
    # Parameters and the input batch are graph inputs: never handed to the hooks.
    assert not any(d.node.startswith("primals") for d in by_node.values())


def test_layer_norm_inputs_get_per_token_ranges():
    # The residual sum feeding the next LayerNorm: one quantization range per
    # token (group size = width), as the eager ActNN gives row-norm inputs.
    model, x = _mlp(dim=64), torch.randn(2, 16, 64)
    engine = actpack.compress(actpack.ActNN(bits=2, group_size=256), min_numel=64)
    run = torch.compile(model, backend="aot_eager")
    seen = []
    encode = actpack.engine.graphcodes.traceable.quantize_groups

    def spy(x, bits, group_size, key, **kw):
        seen.append((tuple(x.shape), group_size))
        return encode(x, bits, group_size, key, **kw)

    actpack.engine.graphcodes.traceable.quantize_groups = spy
    try:
        with engine:
            run(x)
    finally:
        actpack.engine.graphcodes.traceable.quantize_groups = encode
    norm = [d for d in _decisions(engine) if d.op == "layer_norm"]
    assert norm
    assert ((32, 64), 64) in seen  # (tokens, width) rows of 64: per-token
    assert ((32, 256), 256) in seen  # the fc2 input: rows of its own, groups of 256


def test_filtering_all_hands_parameters_over_and_they_are_kept():
    model, x = _mlp(depth=1), torch.randn(2, 8, 32)
    engine = actpack.compress("actnn", min_numel=16)
    with torch._functorch.config.patch(saved_tensors_hooks_filtering_mode="all"):
        decisions = _compiled_step(model, x, engine)
    inputs = [d for d in decisions if d.node.startswith("primals")]
    assert inputs and all(d.kind is Kind.KEEP and d.form == "exact" for d in inputs)


def test_untraceable_strategy_keeps_compiled_saves_exact_with_a_warning():
    model, x = _mlp(depth=1), torch.randn(2, 8, 32)
    exact = _grads(model, x)
    engine = actpack.compress(actpack.Division(), min_numel=16)
    run = torch.compile(model, backend="aot_eager")

    def step(x):
        with engine:
            return run(x)

    with pytest.warns(UserWarning, match="no traceable code"):
        got = _grads(model, x, step)
    torch.testing.assert_close(got, exact, rtol=1e-5, atol=1e-6)
    assert all(d.form in ("exact", "bits") for d in _decisions(engine))


def test_actnn_rows_has_a_traceable_twin():
    # The default strategy inside compiled graphs: the eager token-row layout
    # and widths (3 bits for matmul and norm inputs, 2 elsewhere), without the
    # Hadamard rotation; no warning, nothing lossy kept exact.
    model, x = _mlp(dim=64), torch.randn(2, 16, 64)
    engine = actpack.compress("actnn-rows", min_numel=64)
    run = torch.compile(model, backend="aot_eager")
    seen = []
    encode = actpack.engine.graphcodes.traceable.quantize_groups

    def spy(x, bits, group_size, key, **kw):
        seen.append((tuple(x.shape), bits, group_size))
        return encode(x, bits, group_size, key, **kw)

    actpack.engine.graphcodes.traceable.quantize_groups = spy
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with engine:
                run(x)
    finally:
        actpack.engine.graphcodes.traceable.quantize_groups = encode
    lossy = [d for d in _decisions(engine) if d.kind is Kind.LOSSY]
    assert lossy and all(d.form == "groups" for d in lossy)
    assert ((32, 64), 3, 64) in seen  # layer-norm / fc1 inputs: a range per token, 3 bits
    assert ((32, 256), 3, 256) in seen  # the fc2 input
    assert any(bits == 2 for _, bits, _ in seen)  # GELU's input: 2 bits


def test_actnn_rows_compiled_gradients_are_unbiased():
    # Mean of K compiled draws against the exact gradient: unbiased codes
    # divide the squared error by K (ReLU: backward linear in every save).
    model, x = _mlp(act=nn.ReLU, depth=1), torch.randn(4, 16, 32)
    exact = _grads(model, x)
    run = torch.compile(model, backend="aot_eager")
    k = 16
    draws = _draws(model, x, actpack.compress("actnn-rows", min_numel=64), run, k)
    single = (draws - exact).pow(2).sum(1).mean().item()
    mean_error = (draws.mean(0) - exact).pow(2).sum().item()
    assert single > 0 and len({tuple(d.tolist()) for d in draws}) == k
    assert mean_error < 3 * single / k


def test_compress_inside_a_fullgraph_compile_names_the_fix():
    # Dynamo traced compress() itself and failed deep inside the strategy's
    # default seed (torch.initial_seed) with no word of what to change.
    model = _mlp(depth=1)

    def step(x):
        with actpack.compress("actnn"):
            return model(x).sum()

    with pytest.raises(Exception, match="outside the compiled code"):
        torch.compile(step, fullgraph=True, backend="aot_eager")(torch.randn(2, 4, 32))


def test_the_cache_key_covers_every_actpack_module(tmp_path):
    # The key hashed a list of 11 modules: graphreads (the product rule),
    # fills, fxnodes, compact's callers and the seeds were missing, and a
    # graph compiled before a fix to one of them, served from AOTAutograd's
    # cache, kept the bias the fix removed (R = 11.7 on h * h * h).
    model, x = _mlp(act=nn.ReLU, depth=1), torch.randn(4, 16, 32)
    _compiled_step(model, x, actpack.compress("actnn", min_numel=64))
    hashed = {p.resolve() for p in compiled.package_files()}
    loaded = {
        pathlib.Path(m.__file__).resolve()
        for name, m in list(sys.modules.items())
        if (name == "actpack" or name.startswith("actpack.")) and getattr(m, "__file__", None)
    }
    assert "actpack.engine.graphreads" in sys.modules and loaded <= hashed
    package = pathlib.Path(compiled.__file__).resolve().parent.parent
    copy = tmp_path / "actpack"
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert compiled.package_digest(copy) == compiled.package_digest()
    for name in ("engine/graphreads.py", "engine/fills.py", "strategies/seeds.py"):
        with open(copy / name, "a") as f:
            f.write("\n# changed\n")
        changed = compiled.package_digest(copy)
        assert changed != compiled.package_digest()
        shutil.copy(package / name, copy / name)


def test_compiled_ranks_seeded_alike_round_apart(monkeypatch):
    # Every rank of a job seeded alike (HF's set_seed, Lightning's
    # seed_everything) draws the same keys from the default generator: each
    # rank's traced key mixes its rank in (strategies/seeds.py), and graphs
    # of different ranks never share a cache entry (the pair's cache hash).
    model, x = _mlp(act=nn.ReLU, depth=1), torch.randn(4, 16, 32)
    exact = _grads(model, x)

    def on_rank(rank: int):
        monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
        monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: rank)
        torch._dynamo.reset()
        engine = actpack.compress("actnn-rows", min_numel=64)
        torch.manual_seed(5)
        errors = _draws(model, x, engine, torch.compile(model, backend="aot_eager"), 6) - exact
        return errors, engine._graph_hooks.pack_gm

    zero, pair0 = on_rank(0)
    one, pair1 = on_rank(1)
    again, _ = on_rank(1)
    assert torch.equal(one, again)  # a rank's stream follows the default generator
    assert pair0 is not pair1
    hashes = {n.meta.get("user_cache_hash") for pair in (pair0, pair1) for n in pair.graph.nodes}
    assert len(hashes - {None}) == 2
    corr = (zero * one).sum() / (zero.square().sum() * one.square().sum()).sqrt()
    assert zero.abs().sum() > 0 and abs(float(corr)) < 0.2  # equal keys: 1.0


# --------------------------------------------------------------------------- #
# Graph breaks and recompilations
# --------------------------------------------------------------------------- #


def _breaks() -> int:
    return sum(counters["graph_break"].values())


class _Stack(nn.Sequential):
    """nn.Sequential with a forward of its own, defined outside torch.nn (as a
    model's forward is).

    After wrap's hooks break the graph, Dynamo starts a new frame at the
    wrapped model's forward.  It skips frames of torch.nn's own files there
    unless it allows "inbuilt nn.Module.forward" of a module with hooks
    (``trace_rules.check_verbose``; torch 2.13 does, torch 2.11 does not):
    then a bare ``nn.Sequential``'s blocks are compiled one frame each
    (test_compile_wrap_of_a_torch_nn_container).  A forward in user code is
    one frame on every version."""

    def forward(self, x):
        for block in self:
            x = block(x)
        return x


@pytest.mark.parametrize("kind", ["mlp", "masked"])
@pytest.mark.parametrize("how", ["compile(wrap)", "wrap(compile)", "compress", "per-block"])
def test_one_graph_and_no_recompiles(how, kind):
    model, x = _Stack(*(_mlp() if kind == "mlp" else _masked())), torch.randn(2, 8, 32)
    if how == "compile(wrap)":
        run = torch.compile(actpack.wrap(model, min_numel=64), backend="aot_eager")
        engine = actpack.engine_of(model)
    elif how == "wrap(compile)":
        run = actpack.wrap(torch.compile(model, backend="aot_eager"), min_numel=64)
        engine = actpack.engine_of(run)
    elif how == "per-block":
        run = actpack.wrap(model, min_numel=64)
        engine = actpack.engine_of(model)
        for block in model:
            block.compile(backend="aot_eager")
    else:
        compiled_model = torch.compile(model, backend="aot_eager")
        engine = actpack.compress("actnn", min_numel=64)

        def run(x):
            with engine:
                return compiled_model(x)

    _grads(model, x, run)
    graphs = counters["stats"]["unique_graphs"]
    # Per block: the first block's input needs no grad, the second's does.
    assert graphs == (2 if how == "per-block" else 1)
    for _ in range(2):
        _grads(model, x, run)
    assert counters["stats"]["unique_graphs"] == graphs
    # Only wrap's disabled hooks break, entering and leaving the engine
    # around the forward: the model's own ops are all in that one graph.
    assert (_breaks() > 0) == (how == "compile(wrap)")
    assert all("function _enter" in k or "function _leave" in k for k in counters["graph_break"])
    assert not counters["recompiles"]
    assert any(d.form == "groups" for d in _decisions(engine))


def _graphs_after_a_disabled_pre_hook(model: nn.Module, x: torch.Tensor) -> int:
    """Graphs Dynamo makes of ``torch.compile(model)`` with a
    ``torch.compiler.disable``'d forward pre-hook and hook on ``model`` (what
    wrap adds), without actpack: this Dynamo's own cost of such hooks."""
    pre = model.register_forward_pre_hook(torch.compiler.disable(lambda m, a: None))
    post = model.register_forward_hook(torch.compiler.disable(lambda m, a, o: None))
    try:
        torch._dynamo.reset()
        counters.clear()
        _grads(model, x, torch.compile(model, backend="aot_eager"))
        return counters["stats"]["unique_graphs"]
    finally:
        pre.remove()
        post.remove()
        torch._dynamo.reset()
        counters.clear()


def test_compile_wrap_of_a_torch_nn_container():
    """``torch.compile(wrap(nn.Sequential(...)))``: how many graphs the blocks
    take is Dynamo's choice after a hook's graph break (one graph where it
    traces a hooked torch.nn forward, torch 2.13; a graph per block where it
    skips that frame, torch 2.11), the same with or without actpack.  wrap
    adds no graph of its own, and every graph is compressed."""
    model, x = _mlp(), torch.randn(2, 8, 32)
    expected = _graphs_after_a_disabled_pre_hook(model, x)
    assert expected in (1, len(model))
    run = torch.compile(actpack.wrap(model, min_numel=64), backend="aot_eager")
    engine = actpack.engine_of(model)
    assert torch.isfinite(_grads(model, x, run)).all()
    assert counters["stats"]["unique_graphs"] == expected
    assert all("function _enter" in k or "function _leave" in k for k in counters["graph_break"])
    # Every graph's saves were decided while it was compiled, and coded.
    assert len({key[0] for key in engine._graph_hooks.decisions}) == expected
    assert any(d.form == "groups" for d in _decisions(engine))
    decisions = _decisions(engine)
    assert sum(d.after for d in decisions) < sum(d.before for d in decisions)


def test_engines_share_graphs_by_configuration():
    """A new engine per step (``with actpack.compress(...)`` in the loop) with
    the same strategy and settings reuses the compiled graph; another
    configuration compiles one more graph, reused in turn.  Dynamo guards on
    the identity of the innermost hook pair, shared per configuration; a pair
    per engine recompiled every step and, after 8 steps, Dynamo ran the model
    uncompiled."""
    model, x = _mlp(depth=1), torch.randn(2, 8, 32)
    run = torch.compile(model, backend="aot_eager")
    for step in range(10):
        strategy = "actnn" if step % 5 else "int8"
        with actpack.compress(strategy, min_numel=64):
            run(x)
    assert counters["stats"]["unique_graphs"] == 2
    assert not counters["recompiles"] or set(counters["recompiles"]) == {"total"}
    first = actpack.compress("actnn", min_numel=64)
    with first:
        run(x)
    assert counters["stats"]["unique_graphs"] == 2


@pytest.mark.parametrize("how", ["inside", "around", "compile(wrap)", "wrap(compile)"])
def test_engine_entered_inside_compiled_code_warns(how):
    """Entered inside a compiled function, the engine is traced by Dynamo and
    whether the model is compressed depends on its graph breaks (a
    Linear-GELU-Linear model was not, without a word): that case warns; the
    supported patterns do not."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 32))
    x = torch.randn(4, 16, 32)
    if how == "inside":
        engine = actpack.compress("actnn", min_numel=64)

        @torch.compile(backend="aot_eager")
        def run(x):
            with engine:
                return model(x)

    elif how == "around":
        engine = actpack.compress("actnn", min_numel=64)
        compiled_model = torch.compile(model, backend="aot_eager")

        def run(x):
            with engine:
                return compiled_model(x)

    elif how == "compile(wrap)":
        run = torch.compile(actpack.wrap(model, "actnn", min_numel=64), backend="aot_eager")
    else:
        run = actpack.wrap(torch.compile(model, backend="aot_eager"), "actnn", min_numel=64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(x).sum().backward()
    inside = [w for w in caught if "entered inside a torch.compile'd function" in str(w.message)]
    assert bool(inside) == (how == "inside")


def test_lossless_engine_keeps_compiled_saves_and_counts_them():
    """``"none"`` installs plain hooks (it codes nothing, so the GraphModule
    pair would only cost time): a compiled model's saves come to it after the
    forward, kept exact and counted; new engines per step recompile nothing."""
    model, x = _mlp(depth=2), torch.randn(2, 8, 32)
    exact = _grads(model, x)
    run = torch.compile(model, backend="aot_eager")
    eager_stats = None
    for _ in range(4):
        with actpack.compress("none", min_numel=0) as ctx:
            out = run(x)
        model.zero_grad(set_to_none=True)
        out.float().pow(2).mean().backward()
        got = torch.cat([p.grad.flatten() for p in model.parameters()])
        torch.testing.assert_close(got, exact, rtol=1e-5, atol=1e-6)
        assert ctx.stats.tensors > 0 and ctx.stats.ratio == 1.0
        if eager_stats is None:
            with actpack.compress("none", min_numel=0) as eager_ctx:
                model(x)
            eager_stats = eager_ctx.stats
        # Compiled or eager, the same activations are held (the graph
        # may save fewer, recomputing cheap ones): never more bytes.
        assert 0 < ctx.stats.baseline_bytes <= eager_stats.baseline_bytes
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["recompiles"]


def test_fused_cpu_codecs_compile_once_across_engines(monkeypatch):
    """The eager engine's fused CPU codecs run inside its pack hook, under its
    hook pair: a new engine per step must not recompile them (it did, per
    engine, until Dynamo's limit, then ran them uncompiled), neither as
    Dynamo graphs nor as standalone artifacts."""
    from actpack.codecs import backend
    from actpack.codecs.compiled import build, standalone

    model = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256))
    x = torch.randn(64, 256)
    if backend.resolve_backend(x.new_empty(1 << 16), "auto") != "compiled":
        pytest.skip("the compiled CPU codecs are not picked here")
    build._compiled.cache_clear()  # configurations compiled by earlier tests: compile afresh
    artifacts = []
    compile_one = standalone.Standalone._compile

    def counted(self, facts, args):
        out = compile_one(self, facts, args)
        artifacts.append(out)
        return out

    monkeypatch.setattr(standalone.Standalone, "_compile", counted)

    def compiled() -> tuple[int, int]:
        return counters["stats"]["unique_graphs"], len(artifacts)

    for _ in range(4):
        with actpack.compress("actnn"):
            y = model(x)
        y.sum().backward()
    before = compiled()
    assert sum(before) > 0
    for _ in range(4):
        with actpack.compress("actnn"):
            y = model(x)
        y.sum().backward()
    assert compiled() == before


# --------------------------------------------------------------------------- #
# Compiled training steps (Inductor)
# --------------------------------------------------------------------------- #


def _draws(model, x, engine, run, k: int) -> torch.Tensor:
    def step(x):
        with engine:
            return run(x)

    return torch.stack([_grads(model, x, step) for _ in range(k)])


def test_none_is_exact_and_actnn_is_as_faithful_as_eager():
    model, x = _mlp(act=nn.ReLU, depth=1), torch.randn(4, 16, 32)
    exact = _grads(model, x)
    run = torch.compile(model)
    plain = _grads(model, x, run)
    # "none" changes nothing in the compiled graphs: bitwise the same gradients,
    # and every save (ReLU's bool mask included) held as autograd holds it.
    engine = actpack.compress("none", min_numel=64)
    none = _draws(model, x, engine, run, 1)[0]
    assert torch.equal(none, plain)
    # (ReLU's mask was packed to 1 bit: lossless, but not what "none" means.)
    assert engine.stats.compressed_bytes == engine.stats.baseline_bytes > 0
    assert not engine.stats.forms, engine.stats.forms
    # actnn: each compiled step draws fresh rounding noise in the graph; the
    # mean of K draws approaches the exact gradient (unbiased codes: the
    # squared error falls as 1/K), and a single draw is as noisy as eager's.
    k = 16
    compiled_draws = _draws(model, x, actpack.compress("actnn", min_numel=64), run, k)
    eager_draws = _draws(model, x, actpack.compress("actnn", min_numel=64), model, k)
    single = (compiled_draws - exact).pow(2).sum(1).mean().item()
    eager_single = (eager_draws - exact).pow(2).sum(1).mean().item()
    mean_error = (compiled_draws.mean(0) - exact).pow(2).sum().item()
    assert single > 0 and len({tuple(d.tolist()) for d in compiled_draws}) == k
    assert mean_error < 3 * single / k
    assert 0.5 < single / eager_single < 2


class ConvMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.block = Block(128, nn.GELU())

    def forward(self, x):
        h = F.max_pool2d(F.relu(self.conv(x)), 2).flatten(2).transpose(1, 2)
        return self.block(h.reshape(x.shape[0], -1, 128))


def test_inductor_step_under_autocast_max_autotune():
    torch.manual_seed(0)
    model, x = ConvMLP(), torch.randn(8, 3, 16, 16)
    engine = actpack.compress("actnn", min_numel=64)
    run = torch.compile(model, mode="max-autotune-no-cudagraphs")

    def step(x):
        with torch.autocast("cpu", dtype=torch.bfloat16), engine:
            return run(x)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        exact = _grads(model, x)
    got = torch.stack([_grads(model, x, step) for _ in range(4)])
    decisions = _decisions(engine)
    # Inductor saves max-pool offsets as int8: packed in 2 bits (2x2 windows).
    offsets = [d for d in decisions if d.form == "offsets"]
    assert offsets and all(d.after * 4 == d.before for d in offsets)
    coded = [d for d in decisions if d.form == "groups"]
    assert coded and sum(d.after for d in coded) * 6 < sum(d.before for d in coded)
    assert bool(torch.isfinite(got).all())
    eager = torch.stack([_grads(model, x, lambda x: _autocast_eager(model, x)) for _ in range(4)])
    single = (got - exact).pow(2).sum(1).mean().item()
    assert 0 < single < 3 * (eager - exact).pow(2).sum(1).mean().item()


def _autocast_eager(model, x):
    with torch.autocast("cpu", dtype=torch.bfloat16), actpack.compress("actnn", min_numel=64):
        return model(x)


def test_dynamic_shapes_one_graph():
    model = _mlp(depth=1)
    engine = actpack.compress("actnn", min_numel=64)
    run = torch.compile(model, dynamic=True)
    for n in (3, 5, 7):
        x = torch.randn(n, 8, 32)
        exact = _grads(model, x)
        got = _draws(model, x, engine, run, 2)
        assert bool(torch.isfinite(got).all()) and not torch.equal(got[0], exact)
        assert (got.mean(0) - exact).norm() < 0.5 * exact.norm()
    assert counters["stats"]["unique_graphs"] == 1
    assert any(d.form == "groups" for d in _decisions(engine))


def test_aot_autograd_cache_hits_and_keys_on_the_strategy():
    from torch._inductor.utils import fresh_cache

    model, x = _mlp(depth=1), torch.randn(2, 8, 32)
    exact = _grads(model, x)
    with fresh_cache(), torch._functorch.config.patch(enable_autograd_cache=True):
        for strategy, expect in (("actnn", "autograd_cache_miss"), ("actnn", "autograd_cache_hit"),
                                 ("int8", "autograd_cache_miss")):  # fmt: skip
            torch._dynamo.reset()
            counters.clear()
            engine = actpack.compress(strategy, min_numel=64)
            got = _draws(model, x, engine, torch.compile(model), 1)[0]
            assert counters["aot_autograd"][expect] == 1, dict(counters["aot_autograd"])
            assert not counters["aot_autograd"]["autograd_cache_bypass"]
            # A hit skips tracing the hooks, yet the cached graphs still compress.
            assert bool(_decisions(engine)) == (expect != "autograd_cache_hit")
            assert not torch.equal(got, exact)


# --------------------------------------------------------------------------- #
# Built-in models and transformers, compiled
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("name", ["gpt", "vit", "resnet"])
def test_builtin_models_compiled(name):
    from actpack.tools.models import build_model, loss_for

    torch.manual_seed(0)
    model, make_inputs = build_model(name, "tiny")
    inputs, loss_fn = make_inputs(4), loss_for(name)
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(run, ctx):
        with ctx:
            loss = loss_fn(run(*inputs), inputs)
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])

    exact = grads(model, torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t))
    run = torch.compile(model, backend="aot_eager")
    engine = actpack.compress("actnn")
    got = torch.stack([grads(run, engine) for _ in range(2)])
    eager = torch.stack([grads(model, actpack.compress("actnn")) for _ in range(2)])
    assert any(d.form == "groups" for d in _decisions(engine))
    single = (got - exact).pow(2).sum(1).mean().item()
    assert 0 < single < 3 * (eager - exact).pow(2).sum(1).mean().item()


def test_transformers_gpt2_compiled():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = tiny_gpt2_config()
    model = transformers.GPT2LMHeadModel(config)
    ids = torch.randint(0, 128, (4, 32))
    engine = actpack.compress("actnn", min_numel=1024)
    run = torch.compile(model, backend="aot_eager")
    with engine:
        loss = run(input_ids=ids, labels=ids).loss
    loss.backward()
    assert bool(torch.isfinite(loss))
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    decisions = _decisions(engine)
    assert any(d.form == "groups" for d in decisions)
    assert sum(d.after for d in decisions) * 3 < sum(d.before for d in decisions)


# --------------------------------------------------------------------------- #
# Gradient checkpointing under torch.compile
# --------------------------------------------------------------------------- #


def _checkpointed_hf(kind: str) -> nn.Module:
    """A tiny HF model (built from a config, nothing downloaded) in training
    mode with HF's non-reentrant per-layer checkpointing: T5 (dropout on, so
    that the code Dynamo leaves to eager mode saves tensors), Llama and GPT-2
    (attention is seeded in training: their checkpointed regions save the
    generator state)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if kind == "t5":
        model = transformers.T5ForConditionalGeneration(transformers.T5Config(
            d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=1, num_decoder_layers=1,
            vocab_size=128, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
        ))  # fmt: skip
    elif kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
        ))  # fmt: skip
    else:
        model = transformers.GPT2LMHeadModel(tiny_gpt2_config())
    enable = getattr(model, "activation_checkpointing_enable", None)
    enable = enable or model.gradient_checkpointing_enable  # transformers < 5.20
    enable({"use_reentrant": False})
    return model.train()


def _actpack_frames_dynamo_compiled() -> set[str]:
    """actpack's functions Dynamo tried to compile as frames of their own, but
    for wrap's hooks (which it traces up to their disabled call, by design)."""
    from torch._dynamo import convert_frame

    root = actpack.__file__.rsplit("__init__.py", 1)[0]
    codes = (ref() for ref in convert_frame.input_codes.seen)
    return {
        f"{c.co_filename.rsplit('/', 1)[-1]}:{c.co_name}"
        for c in codes
        if c is not None and c.co_filename.startswith(root) and not c.co_filename.endswith("api.py")
    }


def _checkpointed_steps(kind: str, strategy: str | None, steps: int = 1):
    """``steps`` SGD steps of ``torch.compile(wrap(model))`` (aot_eager) on a
    checkpointed HF model: (losses, first step's gradient, actpack frames
    Dynamo compiled)."""
    torch._dynamo.reset()  # each run compiles its own code (hooks are not guarded on)
    model = _checkpointed_hf(kind)
    run = torch.compile(actpack.wrap(model, strategy) if strategy else model, backend="aot_eager")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)  # the same dropout in every run
    losses, first = [], None
    for _ in range(steps):
        loss = run(input_ids=ids, labels=ids).loss
        loss.backward()
        if first is None:
            first = torch.cat([p.grad.flatten() for p in model.parameters()])
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, first, _actpack_frames_dynamo_compiled()


@pytest.mark.parametrize("kind", ["t5", "llama", "gpt2"])
def test_checkpointed_hf_models_compiled(kind, capfd):
    """``torch.compile(wrap(model))`` with HF's gradient checkpointing.

    T5: Dynamo falls back to eager mode for its checkpointed layers and
    stacks, with its frame callback still installed; the eager hooks' frames
    and the op tracker's reached it, and Dynamo compiled them frame by frame
    (graph breaks, recompilations, "Exception ignored in StorageWeakRef.__del__"
    tracebacks).  Llama and GPT-2: the compiled checkpointed layers save the
    generator state for attention's replay under another name in backward,
    and AOTAutograd failed to inline any lossy strategy's hooks ("could not
    find saved tensor getitem_4 in bw_g_inputs")."""
    plain_losses, plain, _ = _checkpointed_steps(kind, None)
    none_losses, none, none_frames = _checkpointed_steps(kind, "none")
    losses, got, frames = _checkpointed_steps(kind, "actnn-rows")
    assert none_losses == plain_losses and torch.equal(none, plain)
    assert losses[0] == plain_losses[0]  # codes feed backward only
    assert all(math.isfinite(v) for v in losses) and not torch.equal(got, plain)
    assert F.cosine_similarity(got, plain, dim=0) > 0.9
    assert not none_frames and not frames
    err = capfd.readouterr().err
    assert "Exception ignored" not in err and "recompile_limit" not in err


class _CheckpointedBlocks(nn.Module):
    """Two LayerNorm-MLP blocks under non-reentrant (optionally selective)
    checkpointing after an input Linear: every value backward reads is one
    a checkpointed block is recomputed from."""

    def __init__(self, selective: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(32, 32)
        self.blocks = nn.ModuleList([Block(32), Block(32)])
        self.selective = selective

    def forward(self, x):
        from torch.utils.checkpoint import (
            CheckpointPolicy,
            checkpoint,
            create_selective_checkpoint_contexts,
        )

        def policy(ctx, op, *args, **kwargs):
            mm = op in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)
            return CheckpointPolicy.MUST_SAVE if mm else CheckpointPolicy.PREFER_RECOMPUTE

        h = self.inp(x)
        for block in self.blocks:
            if self.selective:
                context = functools.partial(create_selective_checkpoint_contexts, policy)
                h = checkpoint(block, h, use_reentrant=False, context_fn=context)
            else:
                h = checkpoint(block, h, use_reentrant=False)
        return h


@pytest.mark.parametrize("selective", [False, True])
@pytest.mark.parametrize("strategy", ["actnn", "actnn-rows", "int8"])
def test_compiled_checkpoint_inputs_stay_exact(selective, strategy):
    """What a checkpointed region traced into a compiled graph is recomputed
    from is what eager checkpointing keeps (``"checkpoint input"``): exact
    unless ``checkpoint_inputs=`` opts in.  The recompute reads it only
    through LayerNorm, Linear and GELU, so the decisions coded it in 2 bits,
    and a code of it moves every gradient of the block."""
    model, x = _CheckpointedBlocks(selective), torch.randn(4, 16, 32)
    compiled_model = torch.compile(model, backend="aot_eager")

    def run(x):
        return compiled_model(x)

    exact = _grads(model, x, run)
    engine = actpack.compress(strategy, min_numel=64)
    got = _draws(model, x, engine, run, 1)[0]
    assert torch.equal(got, exact)
    kept = [d for d in _decisions(engine) if d.reason == "checkpoint input"]
    assert len(kept) >= 2 and all(d.form == "exact" for d in kept)
    opted = actpack.compress(strategy, min_numel=64, checkpoint_inputs="int8")
    got = _draws(model, x, opted, run, 1)[0]
    coded = [d for d in _decisions(opted) if d.reason == "checkpoint input (int8, opted in)"]
    assert len(coded) >= 2 and all(d.form == "groups" and 3 * d.after < d.before for d in coded)
    assert not torch.equal(got, exact) and F.cosine_similarity(got, exact, dim=0) > 0.99


def test_eager_hooks_are_never_compiled_by_dynamo(capfd):
    """Blocks made of torch's own modules, compiled one by one inside a
    wrapped model: their frames are torch's, which Dynamo skips, so the only
    frames it compiled were the eager engine's hooks, called from autograd
    and the op tracker (graph breaks at every storage lookup, 8
    recompilations each, then its limit; 10 s for 3 steps against 0.05 s).
    Marked eager-only, the hooks run as in eager mode and code as usual."""
    torch.manual_seed(0)
    blocks = nn.Sequential(
        *[nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
          for _ in range(3)]
    )  # fmt: skip
    model = actpack.wrap(blocks, "actnn", min_numel=64)
    for block in blocks:
        block.compile(backend="aot_eager")
    x = torch.randn(4, 8, 16, 16)
    for _ in range(3):
        model(x).sum().backward()
    assert not _actpack_frames_dynamo_compiled()
    assert not counters["graph_break"] and not counters["recompiles"]
    stats = actpack.engine_of(model).stats
    assert stats.compressed_bytes * 4 < stats.baseline_bytes
    assert "recompile_limit" not in capfd.readouterr().err


# --------------------------------------------------------------------------- #
# Forms, eagerly: what the inlined hooks compute, checked on real tensors
# --------------------------------------------------------------------------- #


def _graph(saved_target, readers):
    """A forward node saved for backward, read in backward by ``readers``."""
    fw = torch.fx.Graph()
    x = fw.placeholder("primals_1")
    node = fw.call_function(saved_target, (x,))
    fw.output((node, node))
    bw = torch.fx.Graph()
    saved = bw.placeholder(node.name)
    outs = [bw.call_function(target, (saved, *args)) for target, args in readers]
    bw.output(tuple(outs))
    return node, bw


def _round_trip(plan_strategy, node, bw, x):
    from actpack.engine import graphcodes, graphfacts
    from actpack.policy.decide import Settings, decide

    strategy = actpack.resolve(plan_strategy)
    gf = graphfacts.graph_facts(node, bw, x)
    plan = decide(gf.facts, Settings(min_numel=16, keeps_relu_exact=strategy.keeps_relu_exact))
    form, meta, tensors = graphcodes.encode(strategy, plan, gf, x)
    if form == "exact":
        return plan, form, x
    return plan, form, graphcodes.decode(form, meta, tensors)


def test_relu_output_read_only_by_comparisons_keeps_its_region_in_one_bit():
    aten = torch.ops.aten
    node, bw = _graph(aten.relu.default, [(aten.le.Scalar, (0,))])
    x = torch.randn(4, 64).relu()
    plan, form, y = _round_trip("bf16", node, bw, x)
    assert (plan.kind, form) == (Kind.REGION, "region")
    assert torch.equal(y <= 0, x <= 0) and y.dtype == x.dtype


def test_comparison_with_another_constant_is_kept_exact():
    aten = torch.ops.aten
    node, bw = _graph(aten.neg.default, [(aten.le.Scalar, (0.5,))])
    x = torch.randn(4, 64)
    plan, form, y = _round_trip("actnn", node, bw, x)
    assert form == "exact" and plan.kind is Kind.EXACT and y is x


def test_relu_output_read_by_a_matmul_keeps_exact_zeros_in_its_code():
    aten = torch.ops.aten
    node, bw = _graph(aten.relu.default, [(aten.mm.default, ())])
    x = torch.randn(8, 256).relu()
    plan, form, y = _round_trip("actnn", node, bw, x)
    assert (plan.kind, form) == (Kind.LOSSY, "groups")
    assert torch.equal(y > 0, x > 0)  # ReLU zeros stay zeros, positives positive
