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

import copy
import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

import actpack
from actpack.codecs import groupquant, traceable
from actpack.engine import compiled
from actpack.policy.decide import Kind

pytestmark = pytest.mark.skipif(not compiled.available(), reason="torch cannot inline hooks")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
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


def test_hook_context_hands_over_node_and_both_graphs():
    # What graphfacts reads: the saved node, and the backward placeholder of
    # the same name whose users are the ops that read the save.
    seen = {}

    def pack(x):
        state = compiled._hook_context_fn()()
        if state is not None:
            node, bw = state["_node"], state["_bw_graph"]
            names = [n.name for n in bw.find_nodes(op="placeholder")]
            seen[node.name] = (node.name in names, isinstance(state["_fw_graph"], torch.fx.Graph))
        return x

    graph = torch.fx.Graph()
    graph.output(graph.call_function(pack, (graph.placeholder("x"),)))
    pack_gm = torch.fx.GraphModule(nn.Module(), graph)
    graph = torch.fx.Graph()
    graph.output(graph.placeholder("p"))
    unpack_gm = torch.fx.GraphModule(nn.Module(), graph)
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


def test_hash_uniform_is_uniform_and_uncorrelated():
    n = 1 << 20
    gen = torch.Generator().manual_seed(1)
    u = traceable.hash_uniform(n, traceable.random_key(gen))
    assert u.dtype == torch.float32 and bool((u >= 0).all()) and bool((u < 1).all())
    sd_mean = (1 / 12 / n) ** 0.5
    assert abs(u.mean().item() - 0.5) < 5 * sd_mean
    assert abs(u.var().item() - 1 / 12) < 5 * (1 / 180 / n) ** 0.5  # var of (u-1/2)^2 is 1/180
    counts = torch.histc(u, 64, 0, 1)
    chi2 = ((counts - n / 64) ** 2 / (n / 64)).sum().item()
    assert chi2 < 63 + 5 * (2 * 63) ** 0.5
    for lag in (1, 2, 3, 256, 4096):
        r = torch.corrcoef(torch.stack([u[:-lag], u[lag:]]))[0, 1].item()
        assert abs(r) < 5 / n**0.5
    # The same element under independent keys: independent draws.
    draws = torch.stack([traceable.hash_uniform(64, traceable.random_key(gen)) for _ in range(512)])
    assert (draws.mean(0) - 0.5).abs().max().item() < 5 * (1 / 12 / 512) ** 0.5


def test_hash_key_is_checked():
    with pytest.raises(ValueError, match="random_key"):
        traceable.hash_uniform(8, torch.tensor(3))
    with pytest.raises(ValueError, match="random_key"):
        traceable.hash_uniform(8, torch.zeros(2))


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
