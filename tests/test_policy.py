"""The policy's shortcuts agree with its full decision."""

from __future__ import annotations

import pytest
import torch

from actpack.policy.decide import Facts, Kind, Settings, decide, small_plan

DTYPES = (
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
    torch.uint8, torch.bool, torch.complex64,
)  # fmt: skip

SETTINGS = (
    Settings(),
    Settings(lossless=True, min_numel=64),
    Settings(min_numel=10_000, keeps_relu_exact=True, checkpoint_inputs="bf16", smooth="exact"),
    Settings(min_numel=1, bounded_codes=True),
)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("settings", SETTINGS, ids=range(len(SETTINGS)))
def test_small_plan_is_decide_for_small_saves(dtype, settings):
    # Whatever else is known of a small save (its op, role, origin, attention
    # roles), decide() returns small_plan's plan below min_numel.
    for numel in {1, settings.min_numel - 1} - {0}:
        if numel >= settings.min_numel:
            continue
        for facts in (
            Facts(dtype, numel),
            Facts(dtype, numel, origin="custom-function", op="mul", role="input"),
            Facts(dtype, numel, origin="checkpoint", history=True, logits=True),
            Facts(dtype, numel, op="relu", history=True, overlapping=True, values=True),
        ):
            assert decide(facts, settings) == small_plan(dtype)
    # ... and never once a save reaches min_numel (a float save is then coded
    # or kept for a named reason, not as "tiny").
    big = decide(Facts(dtype, settings.min_numel, op="mul"), settings)
    assert big.reason != "tiny"


def test_small_plan_keeps_small_floats_exact():
    assert small_plan(torch.float32) == (Kind.EXACT, "tiny", None)
    assert small_plan(torch.float64).kind is Kind.EXACT
