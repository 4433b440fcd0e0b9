"""ActNN mixed precision: allocator, optimization levels, state and swapping."""

import io
import itertools
import math
import warnings

import pytest
import torch
from small_models import SmallCNN
from torch import nn

import actpack
from actpack.codecs.encoded import Groups
from actpack.strategies.allocate import allocate_bits as allocate_from_module
from actpack.strategies.mixed import ActNNMixed, ActNNPreset, Kept, MixedGroups, allocate_bits

# --------------------------------------------------------------------------- #
# Allocator
# --------------------------------------------------------------------------- #


def _levels(b, zero_exact=False):
    return (1 << b) - 1 - int(zero_exact)


def _cost(sens, bits, zero_exact):
    return sum(
        float(s) / _levels(int(b), z) ** 2
        for layer, bl, z in zip(sens, bits, zero_exact)
        for s, b in zip(layer, bl)
    )


def test_allocator_is_exported():
    assert allocate_bits is allocate_from_module
    assert actpack.allocate_bits is allocate_from_module


@pytest.mark.parametrize("budget", [1.0, 1.5, 2.0, 2.37, 3.0, 7.9])
@pytest.mark.parametrize("weights", [[512, 512, 512], [784, 12544, 128], [3, 5, 7]])
def test_allocator_meets_the_budget_and_never_exceeds_it(budget, weights):
    g = torch.Generator().manual_seed(int(budget * 100) + weights[0])
    sens = [
        torch.rand(16, generator=g) ** 4 * 10 ** (3 * torch.rand(1, generator=g)) for _ in weights
    ]
    a = allocate_bits(sens, weights, budget)
    total = 16 * sum(weights)
    assert a.capacity_bits == math.floor(budget * total)
    used = sum(int(b.sum()) * d for b, d in zip(a.bits, weights))
    assert used == a.used_bits <= a.capacity_bits
    assert all(int(b.min()) >= 1 and int(b.max()) <= 8 for b in a.bits)
    # Exact within one element's bits: no row below 8 bits could still take one.
    below = [d for b, d in zip(a.bits, weights) if int(b.min()) < 8]
    if below:
        assert a.capacity_bits - a.used_bits < min(below)
    assert a.average_bits == pytest.approx(a.used_bits / total)
    assert a.average_bits <= budget


def test_allocator_spends_the_budget_exactly_with_equal_weights():
    sens = [torch.rand(64) + 0.1 for _ in range(4)]
    for budget in (1.25, 2.0, 2.5, 3.1):
        a = allocate_bits(sens, [100] * 4, budget)
        assert a.capacity_bits - a.used_bits < 100
        assert a.method == "greedy"


def test_allocator_is_monotone_in_sensitivity():
    g = torch.Generator().manual_seed(3)
    sens = [torch.rand(200, generator=g) ** 3 for _ in range(3)]
    for budget in (1.5, 2.0, 2.75):
        for method in ("greedy", "exact"):
            a = allocate_bits(sens, [256, 256, 256], budget, method=method)
            s = torch.cat(sens)
            b = torch.cat(a.bits)
            order = torch.argsort(s)
            # A more sensitive row never gets fewer bits (rows weigh the same).
            assert bool((b[order].diff() >= 0).all())


def test_allocator_is_monotone_within_a_layer_of_different_weights():
    sens = [torch.linspace(0.01, 5, 40), torch.linspace(0.02, 1, 30)]
    a = allocate_bits(sens, [100, 37], 2.2)
    for s, b in zip(sens, a.bits):
        assert bool((b[torch.argsort(s)].diff() >= 0).all())


def _brute_force(sens, weights, budget, max_bits, zero_exact):
    rows = [(k, s) for k, layer in enumerate(sens) for s in layer]
    capacity = math.floor(budget * sum(len(layer) * d for layer, d in zip(sens, weights)))
    lows = [2 if zero_exact[k] else 1 for k, _ in rows]
    best = math.inf
    for combo in itertools.product(*(range(lo, max_bits + 1) for lo in lows)):
        if sum(b * weights[k] for b, (k, _) in zip(combo, rows)) > capacity:
            continue
        cost = sum(s / _levels(b, zero_exact[k]) ** 2 for b, (k, s) in zip(combo, rows))
        best = min(best, cost)
    return best


@pytest.mark.parametrize("case", range(12))
def test_allocator_matches_brute_force_optimum(case):
    g = torch.Generator().manual_seed(case)
    n_layers = 2 + case % 2
    sens = [
        (
            torch.rand(1 + (k + case) % 2, generator=g) * 10 ** (2 * torch.rand(1, generator=g))
        ).tolist()
        for k in range(n_layers)
    ]
    weights = [int(w) for w in torch.randint(1, 6, (n_layers,), generator=g)]
    if case % 3 == 0:
        weights = [3] * n_layers  # equal weights: greedy alone is optimal
    zero_exact = [bool(k == 1 and case % 4 == 1) for k in range(n_layers)]
    budget = [1.5, 2.0, 2.4, 3.3][case % 4]
    max_bits = 4
    best = _brute_force(sens, weights, budget, max_bits, zero_exact)
    methods = ["auto", "exact"] + (["greedy"] if len(set(weights)) == 1 else [])
    for method in methods:
        a = allocate_bits(sens, weights, budget, max_bits=max_bits, zero_exact=zero_exact,
                          method=method)  # fmt: skip
        assert a.used_bits <= a.capacity_bits
        assert a.cost == pytest.approx(best, rel=1e-9)
        assert _cost(sens, [b.tolist() for b in a.bits], zero_exact) == pytest.approx(best)


def test_allocator_fractional_budget_splits_rows():
    a = allocate_bits([torch.ones(10)], [256], 2.3)
    assert sorted(a.bits[0].tolist()) == [2] * 7 + [3] * 3
    assert a.average_bits == pytest.approx(2.3)


def test_allocator_does_not_buy_useless_bits_and_reports_infeasible():
    a = allocate_bits([torch.zeros(4), torch.ones(4)], [10, 10], 3.0)
    assert a.bits[0].tolist() == [1] * 4  # no variance to reduce
    a = allocate_bits([torch.ones(4)], [10], 1.0, min_bits=2)
    assert not a.feasible and a.bits[0].tolist() == [2] * 4


def test_invalid_knobs_raise_value_error_naming_valid_choices():
    with pytest.raises(ValueError, match="'auto', 'greedy' or 'exact'"):
        allocate_bits([torch.ones(2)], [4], 2.0, method="dp")
    with pytest.raises(ValueError, match="1..8"):
        allocate_bits([torch.ones(2)], [4], 2.0, max_bits=9)
    with pytest.raises(ValueError, match="L0..L5"):
        actpack.ActNN(level="L9")
    with pytest.raises(ValueError, match="L0..L5"):
        actpack.ActNN(level=True)
    with pytest.raises(ValueError, match=r"within \[1, 8\]"):
        ActNNMixed(budget=0.5)
    with pytest.raises(ValueError, match="number of bits"):
        ActNNMixed(budget="2")
    with pytest.raises(ValueError, match="refresh_every"):
        ActNNMixed(refresh_every=0)
    with pytest.raises(ValueError, match="momentum"):
        ActNNMixed(momentum=1.0)
    with pytest.raises(ValueError, match="'auto', 'greedy' or 'exact'"):
        ActNNMixed(method="dp")
    with pytest.raises(ValueError, match="1..8"):
        ActNNMixed(max_bits=9)
    with pytest.raises(ValueError, match="L3-L5"):
        ActNNMixed(level="L1")
    with pytest.raises(ValueError, match="L0-L2"):
        ActNNPreset(level="L4")
    with pytest.raises(ValueError, match="valid names: .*actnn-l3"):
        actpack.compress("actnn-l7")


@pytest.mark.parametrize("level", ["L0", "L2", "L3", "L5"])
@pytest.mark.parametrize("knob", ["bits", "nosuch"])
def test_a_knob_a_level_does_not_take_names_actnn_level(level, knob):
    """ActNN(level=...) builds another class: an unknown keyword is reported
    against what the user called, with the level's knobs."""
    with pytest.raises(TypeError, match=rf"ActNN\(level='{level}'\) does not take '{knob}'.*"
                       r"knobs are .*group_size"):  # fmt: skip
        actpack.ActNN(level=level, **{knob: 4})
    assert actpack.ActNN(level=level, group_size=128).group_size == 128


# --------------------------------------------------------------------------- #
# Levels
# --------------------------------------------------------------------------- #


def _case(n=8):
    """tests/test_gradients.py's CNN; half the samples have three times the range."""
    torch.manual_seed(0)
    model = SmallCNN()
    x = torch.randn(n, 3, 16, 16)
    x[n // 2 :] *= 3  # samples of different ranges
    return model, x


def _grads(model, x, strategy, **kw):
    model.zero_grad()
    with actpack.compress(strategy, min_numel=0, model=model, **kw):
        out = model(x)
    out.pow(2).mean().backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def _exact(model, x):
    model.zero_grad()
    model(x).pow(2).mean().backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def _spy(strategy):
    seen = []
    encode = strategy.encode

    def spy(x, info):
        enc = encode(x, info)
        seen.append((info.op, enc))
        return enc

    strategy.encode = spy
    return seen


def test_level_names_and_classes():
    for n in range(6):
        s = actpack.ActNN(level=f"L{n}")
        assert isinstance(s, ActNNPreset if n <= 2 else ActNNMixed)
        assert s.level == f"L{n}" and s.name == f"actnn-l{n}"
        assert type(actpack.resolve(f"actnn-l{n}")) is type(s)
    assert isinstance(actpack.resolve("actnn-mixed"), ActNNMixed)
    assert isinstance(actpack.ActNN(bits=4), actpack.ActNN)
    assert set(actpack.LEVELS) == {f"L{n}" for n in range(6)}


def test_level_l0_gradients_are_bit_identical_to_autograd():
    model, x = _case()
    exact = _exact(model, x)
    got = _grads(model, x, actpack.ActNN(level="L0"))
    assert torch.equal(got, exact)


def test_level_l1_keeps_norm_inputs_exact_and_l2_quantizes_them_at_4_bits():
    model, x = _case()
    l1 = actpack.ActNN(level="L1", seed=0)
    seen = _spy(l1)
    _grads(model, x, l1)
    norm = [enc for op, enc in seen if op == "batch_norm"]
    other = [enc for op, enc in seen if op != "batch_norm"]
    assert len(norm) == 2 and all(isinstance(e, Kept) for e in norm)
    assert other and all(isinstance(e, Groups) and e.code.bits == 4 for e in other)
    l2 = actpack.ActNN(level="L2", seed=0)
    seen = _spy(l2)
    _grads(model, x, l2)
    assert len(seen) == len(norm) + len(other)
    assert all(isinstance(e, Groups) and e.code.bits == 4 for _, e in seen)


def _warm(strategy, model, x, steps=3):
    for _ in range(steps):
        _grads(model, x, strategy)
    return strategy


def test_level_l3_gradients_are_unbiased():
    """Same z-statistic as tests/test_gradients.py, on a warmed-up mixed allocation."""
    model, x = _case()
    base = _warm(ActNNMixed(refresh_every=1, seed=0), model, x)
    bits = {b for L in base._layers.values() if L.counts for b, _ in L.counts}
    assert len(bits) >= 3  # a genuinely mixed allocation
    exact = _exact(model, x).double()
    k = 16
    draws = torch.stack([_grads(model, x, base.fork(seed=s)) for s in range(k)]).double()
    mean, std = draws.mean(0), draws.std(0)
    noisy = std > 0
    z = (mean - exact)[noisy] / (std[noisy] / k**0.5)
    assert noisy.sum() > 0.5 * exact.numel()
    assert (z**2).mean() < 1.5


def test_level_l3_bits_per_element_within_budget():
    model, x = _case()
    for budget in (2.0, 2.5):
        mixed = _warm(ActNNMixed(budget=budget, refresh_every=1, seed=0), model, x)
        # Default min_numel: tensors of a few rows of 32 elements pass through, as
        # their row indices and group ranges would cost more than they save.
        with actpack.compress(mixed, model=model) as ctx:
            model(x).pow(2).mean().backward()
        assert len(mixed.last_bits) >= 2
        assert mixed.average_bits <= budget + 1e-9
        assert mixed.average_bits > budget - 0.05
        with actpack.compress(actpack.ActNN(bits=2), model=model) as uniform:
            model(x).pow(2).mean().backward()
        # Same metadata as uniform ActNN, plus int32 row indices of split tensors.
        assert ctx.stats.bits_per_element <= uniform.stats.bits_per_element + (budget - 2) + 0.1


def test_first_step_ranks_rows_by_range_not_by_index():
    x = torch.randn(8, 4096, requires_grad=True)
    scale = torch.tensor([1.0, 5, 1, 5, 1, 5, 1, 5]).unsqueeze(1)
    w = torch.randn(4096, 4, requires_grad=True)
    mixed = ActNNMixed(budget=2.5, seed=0)
    seen = _spy(mixed)
    with actpack.compress(mixed, min_numel=0):
        (x * scale) @ w
    (enc,) = [e for _, e in seen]
    assert isinstance(enc, MixedGroups)
    wide = [idx for idx, code in enc.parts if code.bits == 3]
    assert sorted(wide[0].tolist()) == [1, 3, 5, 7]  # the wide-range rows, wherever they are
    assert mixed.last_allocation is None  # no gradient seen yet: range-only estimate
    assert mixed.average_bits == pytest.approx(2.5)


def test_no_host_synchronisation_on_the_save_path(monkeypatch):
    # The code that also runs on GPUs (the compiled CPU codecs read a flag
    # on the host, which synchronises nothing there; see tests/test_engine.py).
    monkeypatch.setenv("ACTPACK_BACKEND", "reference")
    model, x = _case()
    mixed = _warm(ActNNMixed(refresh_every=1000, seed=0), model, x, steps=2)
    assert mixed.last_allocation is not None
    fresh = ActNNMixed(seed=0)

    def forbidden(*args, **kwargs):
        raise AssertionError("host synchronisation on the compressed path")

    for name in ("item", "tolist", "cpu", "numpy", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    for strategy in (mixed, fresh):  # allocated, and first-step (range-only) paths
        with actpack.compress(strategy, min_numel=0, model=model):
            out = model(x)
        out.pow(2).mean().backward()


def test_state_dict_round_trip_reproduces_the_allocation():
    model, x = _case()
    a = _warm(ActNNMixed(refresh_every=2, seed=5), model, x, steps=4)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = ActNNMixed(refresh_every=2, seed=99)
    b.load_state_dict(torch.load(buf))
    assert b.seed == 5 and b.step == a.step
    ra, rb = a.refresh(), b.refresh()
    assert all(torch.equal(u, v) for u, v in zip(ra.bits, rb.bits))
    # Resumed training continues identically (same statistics and random state).
    assert torch.equal(_grads(model, x, a), _grads(model, x, b))
    assert a.last_bits == b.last_bits


def test_two_models_with_their_own_strategies_do_not_interfere():
    model, x = _case()
    torch.manual_seed(7)
    other = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 4))
    y = torch.randn(32, 512) * 4

    def run(with_other):
        s = ActNNMixed(refresh_every=1, seed=1)
        t = ActNNMixed(refresh_every=1, seed=2)
        out = []
        for _ in range(3):
            if with_other:
                _grads(other, y, t)
            out.append(_grads(model, x, s))
        return out, s

    alone, s1 = run(False)
    together, s2 = run(True)
    assert all(torch.equal(a, b) for a, b in zip(alone, together))
    assert list(s1._layers) == list(s2._layers)


@pytest.mark.parametrize("level", ["L4", "L5"])
def test_swapping_levels_on_cpu_warn_and_behave_like_l3(level):
    model, x = _case()
    l3 = actpack.ActNN(level="L3", seed=3, refresh_every=1)
    swap = actpack.ActNN(level=level, seed=3, refresh_every=1)
    assert swap.offload
    with pytest.warns(UserWarning, match="behaves like L3"):
        got = [_grads(model, x, swap) for _ in range(3)]
    want = [_grads(model, x, l3) for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert not swap.offload_active and "CUDA" in swap.offload_note


def test_swap_bookkeeping_round_trips_on_cpu():
    """The swap path (host copies, prefetch on backward) run with plain CPU copies."""
    model, x = _case()
    l3 = actpack.ActNN(level="L3", seed=3, refresh_every=1)
    l5 = actpack.ActNN(level="L5", seed=3, refresh_every=1)
    l5._simulate_swap = True
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = [_grads(model, x, l5) for _ in range(3)]
    want = [_grads(model, x, l3) for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    store = next(iter(l5._swap.values()))
    assert store.prefetched > 0 and store.arena is not None


def test_allocation_survives_a_smaller_last_batch():
    # The allocation is made for the batch size seen at refresh; a smaller
    # batch (the last of an epoch) splits the row counts, some to zero.
    model = SmallCNN()
    strategy = ActNNMixed(budget=2.5, refresh_every=1, seed=0)
    for n in (16, 16, 3, 1, 16):
        x = torch.randn(n, 3, 16, 16)
        with actpack.compress(strategy, model=model):
            loss = model(x * 1).pow(2).mean()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        model.zero_grad()
