"""actpack.measure: exact byte counts and the ratios the README promises."""

import pytest
import torch
from torch import nn

import actpack
from actpack.tools.models import build_model, loss_for


def test_measure_matches_a_hand_count():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
    x = torch.randn(4, 3, 32, 32)
    rep = actpack.measure(model, x, strategy="actnn")
    conv_in, relu_out = 4 * 3 * 32 * 32, 4 * 8 * 32 * 32  # elements
    # The input batch has no autograd history: its storage exists anyway, it
    # is never coded and is reported apart from the activations.
    assert rep.leaf_bytes == conv_in * 4
    assert rep.baseline_bytes == relu_out * 4
    # 2-bit codes, plus a 16-bit min and max for each group of 256 in a sample
    groups = 4 * (8 * 32 * 32 // 256)
    assert rep.compressed_bytes == relu_out * 2 // 8 + groups * 4
    assert "0" not in rep.modules
    assert rep.modules["1"][0] == relu_out * 4
    assert rep.ratio == pytest.approx(rep.baseline_bytes / rep.compressed_bytes)


def test_measure_division_hand_count():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Tanh())
    x = torch.randn(2, 3, 16, 16)
    rep = actpack.measure(model, x, strategy="division", min_numel=0)
    # per map: 2x2 block means in bf16, 2-bit codes, bf16 min and max
    per_map = 4 * 2 + 16 * 16 * 2 // 8 + 4
    assert rep.compressed_bytes == 2 * 8 * per_map  # the input batch is a leaf: not coded


def test_measure_leaves_model_untouched():
    model, make_inputs = build_model("resnet", "tiny")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    actpack.measure(model, *make_inputs(4, "cpu"), strategy="actnn")
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("strategy", ["actnn", "division"])
def test_resnet_ratio_at_least_10x(strategy):
    torch.manual_seed(0)
    model, make_inputs = build_model("resnet", "small")
    inputs = make_inputs(8, "cpu")
    loss = loss_for("resnet")
    rep = actpack.measure(model, *inputs, strategy=strategy, loss_fn=lambda o: loss(o, inputs))
    assert rep.ratio >= 10.0, str(rep)


def test_none_strategy_reports_ratio_one():
    model, make_inputs = build_model("gpt", "tiny")
    rep = actpack.measure(model, *make_inputs(2, "cpu"), strategy="none")
    assert rep.ratio == 1.0 and rep.baseline_bytes > 0
