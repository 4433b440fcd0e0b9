"""Model specs on the command line: built-in models, HuggingFace configs, torchvision and timm.

transformers is a test dependency; torchvision and timm are not: their
construction path is checked with small fake modules in their place.
"""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch
from torch import nn

from actpack.tools import bench, cli
from actpack.tools.specs import HF_SIZES, ModelSpec, build, parse_spec


def test_builtin_specs() -> None:
    assert parse_spec("resnet") == ModelSpec("builtin", "resnet", None)
    spec = parse_spec("gpt:tiny")
    assert spec == ModelSpec("builtin", "gpt", "tiny")
    assert str(spec) == "gpt:tiny" and spec.label == "gpt-tiny"
    with pytest.raises(ValueError, match="unknown model 'nosuch'"):
        parse_spec("nosuch")
    with pytest.raises(ValueError, match="unknown size 'huge' for vit; choose from tiny, small"):
        parse_spec("vit:huge")


def test_missing_packages_name_the_fix(monkeypatch) -> None:
    for package in ("torchvision", "timm"):
        monkeypatch.setitem(sys.modules, package, None)  # as if not installed
        with pytest.raises(ValueError) as err:
            parse_spec(f"{package}:resnet18")
        assert str(err.value) == (
            f"{package}:resnet18 needs {package}, which is not installed: pip install {package}"
        )


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layer2(self.layer1(x)).mean((2, 3)))


@pytest.fixture
def fake_vision(monkeypatch) -> list[tuple]:
    """torchvision and timm stand-ins recording how they were asked for a model."""
    calls: list[tuple] = []

    def get_model(name: str, weights: object = "missing") -> nn.Module:
        calls.append(("torchvision", name, weights))
        return TinyCNN()

    def create_model(name: str, pretrained: bool = True) -> nn.Module:
        calls.append(("timm", name, pretrained))
        model = TinyCNN()
        model.pretrained_cfg = {"input_size": (3, 40, 40)}
        return model

    tv = types.ModuleType("torchvision")
    tv.models = types.SimpleNamespace(list_models=lambda: ["tinycnn"], get_model=get_model)
    timm = types.ModuleType("timm")
    timm.is_model = lambda name: name == "tinycnn"
    timm.create_model = create_model
    monkeypatch.setitem(sys.modules, "torchvision", tv)
    monkeypatch.setitem(sys.modules, "timm", timm)
    return calls


def test_torchvision_and_timm_models_are_built_without_weights(fake_vision) -> None:
    model, make_inputs, loss = build(parse_spec("torchvision:tinycnn"))
    (x,) = make_inputs(2)
    assert x.shape == (2, 3, 224, 224)
    assert loss(model(x), (x,)).shape == ()
    model, make_inputs, _ = build(parse_spec("timm:tinycnn"))
    assert make_inputs(2)[0].shape == (2, 3, 40, 40)  # the model's own input size
    assert fake_vision == [("torchvision", "tinycnn", None), ("timm", "tinycnn", False)]
    for source in ("torchvision", "timm"):
        with pytest.raises(ValueError, match=f"{source} has no model named 'nosuch'"):
            parse_spec(f"{source}:nosuch")
    with pytest.raises(ValueError, match="takes no size"):
        parse_spec("timm:tinycnn:small")


def test_report_on_a_torchvision_model(fake_vision, capsys) -> None:
    assert cli.main(["report", "--models", "torchvision:tinycnn", "--strategies", "none",
                     "actnn", "--batch-size", "2"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| torchvision:tinycnn")]
    assert len(rows) == 2
    # 2 images of 224x224: the first ReLU's output (also the second conv's input,
    # counted once), the second ReLU's output, the Linear's input; the first conv's
    # input is the batch itself, a leaf that is never counted
    saved = 4 * (2 * 8 * 224 * 224 + 2 * 8 * 112 * 112 + 2 * 8)
    assert f"| none | {saved / 2**20:.2f} MiB | {saved / 2**20:.2f} MiB | 1.00x |" in rows[0]


def test_checkpoint_finds_blocks_in_sibling_stages() -> None:
    """torchvision's ResNet keeps its blocks in layer1..layer4: all of them are checkpointed."""
    model = TinyCNN()
    assert bench.block_containers(model) == [model.layer1, model.layer2]
    with bench.checkpointed(model) as blocks:
        assert len(blocks) == 4


def test_hf_sizes_shrink_the_config() -> None:
    model, make_inputs, loss = build(parse_spec("hf:llama:tiny"))
    config = model.model.config
    tiny = HF_SIZES["tiny"]
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (
        tiny["hidden_size"], tiny["num_hidden_layers"], tiny["vocab_size"],
    )  # fmt: skip
    assert config.head_dim == tiny["hidden_size"] // tiny["num_attention_heads"]
    ids, labels = make_inputs(2)
    assert ids.shape == (2, tiny["seq_len"]) and labels is ids
    out = model(ids, labels)
    assert loss(out, (ids, labels)) is out.loss
    # random weights: next-token loss is near log(vocab)
    assert abs(out.loss.item() - torch.log(torch.tensor(1024.0)).item()) < 0.5


def test_hf_gpt2_default_is_gpt2_small() -> None:
    from transformers import CONFIG_MAPPING

    spec = parse_spec("hf:gpt2")
    assert spec == ModelSpec("hf", "gpt2", "full")
    config = CONFIG_MAPPING["gpt2"]()
    assert (config.n_embd, config.n_layer, config.n_head) == (768, 12, 12)


def test_bench_an_hf_model_with_checkpointing(tmp_path, capsys) -> None:
    out = tmp_path / "bench.json"
    argv = ["bench", "--model", "hf:gpt2:tiny", "--batch-size", "2", "--strategies", "actnn",
            "--alternatives", "checkpoint", "--steps", "1", "--warmup", "0",
            "--json", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    payload = json.loads(out.read_text())
    rows = {r["name"]: r for r in payload["rows"]}
    assert payload["config"]["label"] == "hf:gpt2:tiny"
    assert rows["actnn"]["saved_bytes"] < rows["none"]["saved_bytes"] / 4
    assert rows["checkpoint"]["saved_bytes"] < rows["none"]["saved_bytes"]
    assert "model.transformer.h[2]" in rows["checkpoint"]["note"]
