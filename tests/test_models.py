"""Tests for the built-in models in :mod:`actpack.tools.models`."""

from __future__ import annotations

import pytest
import torch

from actpack.tools.models import GPT, MODELS, ResNet, ViT, build_model, loss_for


def _expected_shape(name: str, cfg: dict, batch: int) -> tuple[int, ...]:
    if name == "gpt":
        return (batch, cfg["seq_len"], cfg["vocab_size"])
    return (batch, cfg["num_classes"])


@pytest.mark.parametrize("name", sorted(MODELS))
def test_tiny_forward_backward(name: str) -> None:
    torch.manual_seed(0)
    model, make_inputs = build_model(name, "tiny")
    inputs = make_inputs(2, "cpu")
    assert isinstance(inputs, tuple)
    out = model(*inputs)
    assert out.shape == _expected_shape(name, MODELS[name]["tiny"], 2)
    loss = loss_for(name)(out, inputs)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname


def test_input_dtypes() -> None:
    _, make_images = build_model("resnet", "tiny")
    (x,) = make_images(3, torch.device("cpu"))
    assert x.dtype == torch.float32 and x.shape == (3, 3, 32, 32)
    _, make_tokens = build_model("gpt", "tiny")
    (idx,) = make_tokens(3, "cpu")
    assert idx.dtype == torch.long and idx.shape == (3, 64)
    assert 0 <= int(idx.min()) and int(idx.max()) < 256
    _, make_digits = build_model("vit", "tiny")
    (img,) = make_digits(3, "cpu")
    assert img.dtype == torch.float32 and img.shape == (3, 1, 28, 28)


def test_resnet_small_forward() -> None:
    model, make_inputs = build_model("resnet", "small")
    assert isinstance(model, ResNet)
    model.eval()
    with torch.no_grad():
        out = model(*make_inputs(2, "cpu"))
    assert out.shape == (2, 10)


def test_resnet_imagenet_stem_and_bottleneck() -> None:
    model = ResNet(block="bottleneck", layers=[1, 1], width=8, num_classes=5, stem="imagenet")
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 5)
    assert model.fc.in_features == 8 * 2 * 4


def test_default_size_is_small() -> None:
    model, _ = build_model("vit")
    assert isinstance(model, ViT)
    assert model.pos_emb.shape == (1, (28 // 4) ** 2 + 1, 128)


def test_overrides() -> None:
    model, make_inputs = build_model("resnet", "tiny", num_classes=7, in_channels=1, image_size=16)
    (x,) = make_inputs(2, "cpu")
    assert x.shape == (2, 1, 16, 16)
    assert model(x).shape == (2, 7)

    model, make_inputs = build_model("vit", "tiny", num_classes=7)
    assert model(*make_inputs(2, "cpu")).shape == (2, 7)

    model, make_inputs = build_model("gpt", "tiny", seq_len=16, vocab_size=50)
    (idx,) = make_inputs(2, "cpu")
    assert idx.shape == (2, 16)
    assert model(idx).shape == (2, 16, 50)


def test_unknown_name_size_override() -> None:
    with pytest.raises(ValueError, match="resnet"):
        build_model("alexnet")
    with pytest.raises(ValueError, match="tiny"):
        build_model("gpt", "huge")
    with pytest.raises(ValueError):
        loss_for("alexnet")
    with pytest.raises(TypeError):
        build_model("gpt", "tiny", image_size=32)
    with pytest.raises(ValueError):
        ResNet(block="wide")
    with pytest.raises(ValueError):
        ResNet(stem="nope")


def test_gpt_is_causal() -> None:
    torch.manual_seed(0)
    model, make_inputs = build_model("gpt", "tiny")
    model.eval()
    (idx,) = make_inputs(1, "cpu")
    idx2 = idx.clone()
    idx2[0, -1] = (idx2[0, -1] + 1) % 256
    with torch.no_grad():
        a, b = model(idx), model(idx2)
    torch.testing.assert_close(a[:, :-1], b[:, :-1])
    assert not torch.allclose(a[:, -1], b[:, -1])


def test_gpt_rejects_long_sequence() -> None:
    model, _ = build_model("gpt", "tiny")
    with pytest.raises(ValueError):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_gpt_loss_is_next_token_ce() -> None:
    logits = torch.zeros(2, 5, 11)
    idx = torch.randint(0, 11, (2, 5))
    loss = loss_for("gpt")(logits, (idx,))
    torch.testing.assert_close(loss, torch.log(torch.tensor(11.0)))


def test_gpt2_param_count_meta() -> None:
    with torch.device("meta"):
        model, _ = build_model("gpt", "gpt2")
    assert isinstance(model, GPT)
    assert all(p.is_meta for p in model.parameters())
    v, s, d, depth = 50257, 1024, 768, 12
    ln = 2 * d
    attn = (3 * d * d + 3 * d) + (d * d + d)
    mlp = (4 * d * d + 4 * d) + (4 * d * d + d)
    block = 2 * ln + attn + mlp
    expected = v * d + s * d + depth * block + 2 * d + d * v  # untied, bias-free head
    assert expected == 163_037_184
    assert sum(p.numel() for p in model.parameters()) == expected


def test_resnet50_param_count_meta() -> None:
    with torch.device("meta"):
        model, _ = build_model("resnet", "resnet50")
    # Same architecture as torchvision's resnet50.
    assert sum(p.numel() for p in model.parameters()) == 25_557_032
