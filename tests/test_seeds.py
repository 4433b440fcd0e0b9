"""Seeds per rank: ranks of a distributed job seeded alike round apart.

A rank is simulated by patching ``torch.distributed``'s ``is_initialized``
and ``get_rank`` (what :func:`actpack.strategies.seeds.process_rank` reads);
``tests/test_distributed.py`` checks the same with two real processes.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.distributed as dist
from torch import nn

import actpack
from actpack.strategies.seeds import process_rank, rank_key_words, rank_seed

DRAWS = 12


@pytest.fixture
def as_rank(monkeypatch):
    def set_rank(rank: int) -> None:
        monkeypatch.setattr(dist, "is_initialized", lambda: True)
        monkeypatch.setattr(dist, "get_rank", lambda group=None: rank)

    return set_rank


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 64), nn.LayerNorm(64), nn.ReLU(),
        nn.Linear(64, 8),
    )  # fmt: skip


def _grads(model: nn.Module, x: torch.Tensor, strategy=None) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    if strategy is None:
        model(x).square().mean().backward()
    else:
        with actpack.compress(strategy, min_numel=1):
            model(x).square().mean().backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def _errors(model, x, strategy) -> torch.Tensor:
    exact = _grads(model, x)
    return torch.stack([_grads(model, x, strategy) - exact for _ in range(DRAWS)])


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a * b).sum() / (a.square().sum() * b.square().sum()).sqrt())


def test_rank_seeds_and_key_words():
    for seed in (0, 5, 2**63, 2**64 - 1):
        assert rank_seed(seed, 0) == seed
        seeds = {rank_seed(seed, r) for r in range(4096)}
        assert len(seeds) == 4096 and all(0 <= s < 2**64 for s in seeds)
        torch.Generator().manual_seed(rank_seed(seed, 4095))  # in manual_seed's range
    assert rank_key_words(0) == (0, 0)
    words = {rank_key_words(r) for r in range(1, 4096)}
    assert len(words) == 4095 and all(0 <= w < 2**32 for pair in words for w in pair)
    assert (0, 0) not in words


def test_process_rank_outside_a_job_is_zero(as_rank):
    assert process_rank() == 0
    as_rank(3)
    assert process_rank() == 3


STRATEGIES = pytest.mark.parametrize(
    "make",
    [
        lambda: actpack.ActNN(seed=11),
        lambda: actpack.RowActNN(seed=11),
        lambda: actpack.Division(seed=11),
        lambda: actpack.ActNNMixed(budget=2.0, seed=11),
        lambda: actpack.ActNN(bits=8, seed=11),
    ],
    ids=["actnn", "actnn-rows", "division", "mixed", "int8"],
)


@STRATEGIES
def test_ranks_seeded_alike_round_apart(as_rank, make):
    # One input on both ranks, so that equal noise would give equal errors:
    # before rank seeds the two ranks' errors correlated exactly (1.0).
    model, x = _model(), torch.randn(32, 16)
    as_rank(0)
    zero = _errors(model, x, make())
    as_rank(1)
    one, again = _errors(model, x, make()), _errors(model, x, make())
    assert torch.equal(one, again)  # a rank's stream is reproducible
    assert zero.abs().sum() > 0
    # Independent noise: a sample correlation of ~DRAWS * 500 terms, std < 0.05.
    assert abs(_correlation(zero, one)) < 0.2


@STRATEGIES
def test_a_resumed_run_continues_the_noise_stream(tmp_path, make):
    # Before 2026-12-03 only ActNNMixed saved its generators' states: the
    # others restarted from the seed on resume, replaying the first steps'
    # noise.  The 1x1 map makes DIVISION use its inner ActNN code too.
    model, x = _model(), torch.randn(32, 16)
    head = nn.Conv2d(4, 4, 1)
    maps = torch.randn(8, 4, 1, 1, requires_grad=True)

    def step(strategy) -> torch.Tensor:
        maps.grad = None
        with actpack.compress(strategy, min_numel=1):
            head(maps).square().sum().backward()
        return torch.cat([_grads(model, x, strategy), maps.grad.flatten()])

    run = make()
    first = [step(run), step(run)]
    torch.save(run.state_dict(), tmp_path / "strategy.pt")
    copied, pickled = copy.deepcopy(run), pickle.loads(pickle.dumps(run))
    after = [step(run), step(run)]
    for twin in (copied, pickled):  # copies continue the stream too
        assert all(torch.equal(a, step(twin)) for a in after)
    resumed = make()
    resumed.load_state_dict(torch.load(tmp_path / "strategy.pt", weights_only=True))
    again = [step(resumed), step(resumed)]
    assert all(torch.equal(a, b) for a, b in zip(after, again))
    assert not any(torch.equal(a, b) for a, b in zip(first, again))


@STRATEGIES
def test_a_generator_state_continues_its_own_rank_only(as_rank, make):
    model, x = _model(), torch.randn(32, 16)
    as_rank(1)
    saved = make()
    _grads(model, x, saved)
    state = saved.state_dict()
    continued = _grads(model, x, saved)
    resumed = make()
    resumed.load_state_dict(state)
    assert torch.equal(_grads(model, x, resumed), continued)
    # Rank 0 loading rank 1's state (or every rank loading rank 0's) starts
    # from its own rank seed instead of drawing rank 1's noise.
    as_rank(0)
    elsewhere, fresh = make(), make()
    elsewhere.load_state_dict(state)
    fresh.load_state_dict(state | {"rng": {}})  # ActNNMixed: the same statistics
    assert torch.equal(_grads(model, x, elsewhere), _grads(model, x, fresh))
    assert not torch.equal(_grads(model, x, elsewhere), continued)


def test_a_state_without_generator_states_starts_from_the_seed():
    # A state dict saved before 2026-12-03 holds the seed only.
    model, x = _model(), torch.randn(32, 16)
    for make in (actpack.ActNN, actpack.Division, actpack.RowActNN):
        old = make(seed=4)
        old.load_state_dict({"seed": 9})
        assert torch.equal(_grads(model, x, old), _grads(model, x, make(seed=9)))


def test_a_strategy_with_a_state_dict_of_its_own_still_copies():
    # __getstate__ read state_dict()["rng"]: a subclass returning its own dict
    # could no longer be copied (measure copies the wrapped strategy).
    class Mine(actpack.ActNN):
        def state_dict(self):
            return {"seed": self.seed}

    model, x = _model(), torch.randn(32, 16)
    mine = Mine(seed=2)
    _grads(model, x, mine)
    twin = copy.deepcopy(mine)
    assert torch.equal(_grads(model, x, twin), _grads(model, x, mine))
    assert actpack.measure(actpack.wrap(_model(), Mine(seed=3)), x).ratio > 1
