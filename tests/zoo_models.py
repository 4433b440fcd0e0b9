"""Small models for the model-zoo test (tests/test_zoo.py).

Each architecture is written with plain torch.nn (no torchvision) or built from
a tiny HuggingFace config (no download).  :func:`build` returns a :class:`Case`:
the module, its inputs and a loss, sized so that one CPU forward and backward
takes well under a second.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from actpack.tools.models import build_model

# --------------------------------------------------------------------------- #
# DenseNet-style: dense blocks with torch.cat, functional ReLU, BN transitions
# --------------------------------------------------------------------------- #


class DenseLayer(nn.Module):
    """BN-ReLU-Conv1x1 bottleneck, BN-ReLU-Conv3x3; output concatenated to input."""

    def __init__(self, in_ch: int, growth: int) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(in_ch)
        self.conv1 = nn.Conv2d(in_ch, 4 * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(4 * growth)
        self.conv2 = nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False)

    def forward(self, features: list[Tensor]) -> Tensor:
        x = torch.cat(features, 1)
        x = self.conv1(F.relu(self.norm1(x)))
        return self.conv2(F.relu(self.norm2(x)))


class DenseBlock(nn.Module):
    def __init__(self, layers: int, in_ch: int, growth: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DenseLayer(in_ch + i * growth, growth) for i in range(layers))

    def forward(self, x: Tensor) -> Tensor:
        features = [x]
        for layer in self.layers:
            features.append(layer(features))
        return torch.cat(features, 1)


class Transition(nn.Module):
    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(in_ch)
        self.conv = nn.Conv2d(in_ch, out_ch, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(self.conv(F.relu(self.norm(x))), 2)


class DenseNet(nn.Module):
    def __init__(self, growth: int = 8, layers: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        ch = 2 * growth
        self.stem = nn.Conv2d(3, ch, 3, padding=1, bias=False)
        self.block1 = DenseBlock(layers, ch, growth)
        ch += layers * growth
        self.trans1 = Transition(ch, ch // 2)
        ch //= 2
        self.block2 = DenseBlock(layers, ch, growth)
        ch += layers * growth
        self.norm = nn.BatchNorm2d(ch)
        self.fc = nn.Linear(ch, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.block2(self.trans1(self.block1(self.stem(x))))
        x = F.adaptive_avg_pool2d(F.relu(self.norm(x)), 1).flatten(1)
        return self.fc(x)


# --------------------------------------------------------------------------- #
# MobileNetV3-style: depthwise convs, Hardswish, SE with Hardsigmoid, ReLU6
# --------------------------------------------------------------------------- #


class SqueezeExcite(nn.Module):
    def __init__(self, ch: int, reduced: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(ch, reduced, 1)
        self.fc2 = nn.Conv2d(reduced, ch, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x: Tensor) -> Tensor:
        s = self.gate(self.fc2(F.relu(self.fc1(self.pool(x)))))
        return x * s


class InvertedResidual(nn.Module):
    def __init__(
        self, in_ch: int, expand: int, out_ch: int, stride: int, act: type[nn.Module], se: bool
    ) -> None:
        super().__init__()
        self.use_res = stride == 1 and in_ch == out_ch
        self.expand = nn.Sequential(
            nn.Conv2d(in_ch, expand, 1, bias=False), nn.BatchNorm2d(expand), act()
        )
        self.depthwise = nn.Sequential(
            nn.Conv2d(expand, expand, 3, stride, 1, groups=expand, bias=False),
            nn.BatchNorm2d(expand),
            act(),
        )
        self.se = SqueezeExcite(expand, max(8, expand // 4)) if se else nn.Identity()
        self.project = nn.Sequential(
            nn.Conv2d(expand, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch)
        )

    def forward(self, x: Tensor) -> Tensor:
        y = self.project(self.se(self.depthwise(self.expand(x))))
        return x + y if self.use_res else y


class MobileNetV3(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.Hardswish()
        )
        self.blocks = nn.Sequential(
            InvertedResidual(16, 48, 16, 1, nn.ReLU6, se=False),
            InvertedResidual(16, 64, 24, 2, nn.ReLU, se=False),
            InvertedResidual(24, 72, 24, 1, nn.Hardswish, se=True),
            InvertedResidual(24, 96, 32, 1, nn.Hardswish, se=True),
        )
        self.head = nn.Sequential(
            nn.Conv2d(32, 128, 1, bias=False), nn.BatchNorm2d(128), nn.Hardswish()
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(self.head(self.blocks(self.stem(x))))
        return self.fc(x.flatten(1))


# --------------------------------------------------------------------------- #
# U-Net-style: max-pool down, ConvTranspose2d and interpolation up, skip cat
# --------------------------------------------------------------------------- #


def _double_conv(in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    def __init__(self, in_ch: int = 3, classes: int = 3, width: int = 8) -> None:
        super().__init__()
        w = width
        self.enc1 = _double_conv(in_ch, w)
        self.enc2 = _double_conv(w, 2 * w)
        self.mid = _double_conv(2 * w, 4 * w)
        self.up2 = nn.ConvTranspose2d(4 * w, 2 * w, 2, stride=2)
        self.dec2 = _double_conv(4 * w, 2 * w)
        self.up1 = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(2 * w, w, 1)
        )
        self.dec1 = _double_conv(2 * w, w)
        self.aux = nn.Conv2d(4 * w, classes, 1)  # deep supervision, bilinear upsampled
        self.out = nn.Conv2d(w, classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        m = self.mid(F.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([self.up2(m), e2], 1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], 1))
        aux = F.interpolate(self.aux(m), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.out(d1) + 0.5 * aux


# --------------------------------------------------------------------------- #
# Recurrent and 1-D / 3-D convolutional nets
# --------------------------------------------------------------------------- #


class RNNTagger(nn.Module):
    """2-layer batch-first LSTM or GRU with a per-step Linear head."""

    def __init__(self, cell: str, features: int = 32, hidden: int = 128, classes: int = 10):
        super().__init__()
        rnn = {"lstm": nn.LSTM, "gru": nn.GRU}[cell]
        self.rnn = rnn(features, hidden, num_layers=2, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x)
        return self.head(out)


class Conv1dNet(nn.Module):
    def __init__(self, in_ch: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(in_ch, 32, 5, padding=2),
            nn.BatchNorm1d(32),
            nn.ReLU(),
            nn.MaxPool1d(2),
            nn.Conv1d(32, 64, 3, padding=1),
            nn.BatchNorm1d(64),
            nn.ReLU(),
            nn.MaxPool1d(2),
        )
        self.fc = nn.Linear(64, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x).mean(-1))


class Conv3dNet(nn.Module):
    def __init__(self, in_ch: int = 2, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv3d(in_ch, 16, 3, padding=1),
            nn.BatchNorm3d(16),
            nn.ReLU(),
            nn.MaxPool3d(2),
            nn.Conv3d(16, 32, 3, padding=1),
            nn.BatchNorm3d(32),
            nn.ReLU(),
            nn.MaxPool3d(2),
        )
        self.fc = nn.Linear(32, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x).mean((2, 3, 4)))


# --------------------------------------------------------------------------- #
# HuggingFace transformers (tiny configs, random init, no download)
# --------------------------------------------------------------------------- #


class LossOf(nn.Module):
    """Calls a HuggingFace model with keyword inputs and returns ``output.loss``."""

    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.hf = hf

    def forward(self, input_ids: Tensor, labels: Tensor) -> Tensor:
        return self.hf(input_ids=input_ids, labels=labels).loss


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        n_layer=2, n_head=2, n_embd=64, vocab_size=512, n_positions=64,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=0, eos_token_id=0, loss_type="ForCausalLM",
    )  # fmt: skip
    return GPT2LMHeadModel(cfg)


def _bert() -> nn.Module:
    from transformers import BertConfig, BertForMaskedLM

    cfg = BertConfig(
        vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=256, max_position_embeddings=64,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, loss_type="ForMaskedLM",
    )  # fmt: skip
    return BertForMaskedLM(cfg)


# --------------------------------------------------------------------------- #
# Registry
# --------------------------------------------------------------------------- #


@dataclass
class Case:
    model: nn.Module  #: called as ``model(*inputs)``
    inputs: tuple
    loss_fn: Callable[[Tensor], Tensor]
    #: The module under test: ``model`` itself, or the HF model inside LossOf.
    target: nn.Module

    def loss(self) -> Tensor:
        return self.loss_fn(self.model(*self.inputs))


def _classify(labels: Tensor) -> Callable[[Tensor], Tensor]:
    return lambda logits: F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.flatten())


def _segment(labels: Tensor) -> Callable[[Tensor], Tensor]:
    return lambda logits: F.cross_entropy(logits, labels)


def build(name: str) -> Case:
    """A freshly seeded model and inputs (the same every call)."""
    torch.manual_seed(0)
    if name == "resnet_bottleneck":
        model, make = build_model("resnet", "tiny", block="bottleneck")
        inputs = make(4)
        return Case(model, inputs, _classify(torch.randint(0, 10, (4,))), model)
    if name == "vit":
        model, make = build_model("vit", "tiny")
        inputs = make(16)
        return Case(model, inputs, _classify(torch.randint(0, 10, (16,))), model)
    if name in ("gpt2", "bert"):
        hf = _gpt2() if name == "gpt2" else _bert()
        ids = torch.randint(0, 512, (8, 64))
        if name == "gpt2":
            labels = ids.clone()  # the model shifts them for next-token loss
        else:
            masked = torch.rand(ids.shape) < 0.15
            labels = torch.where(masked, ids, torch.full_like(ids, -100))
            ids = torch.where(masked, torch.full_like(ids, 3), ids)  # a [MASK]-like token
        hf.train()
        return Case(LossOf(hf), (ids, labels), lambda loss: loss, hf)
    if name in ("lstm", "gru"):
        model = RNNTagger(name)
        x = torch.randn(16, 16, 32)
        return Case(model, (x,), _classify(torch.randint(0, 10, (16, 16))), model)
    if name == "unet":
        model = UNet()
        x = torch.randn(4, 3, 32, 32)
        return Case(model, (x,), _segment(torch.randint(0, 3, (4, 32, 32))), model)
    model, shape = {
        "densenet": (DenseNet, (4, 3, 32, 32)),
        "mobilenetv3": (MobileNetV3, (8, 3, 32, 32)),
        "conv1d": (Conv1dNet, (16, 8, 256)),
        "conv3d": (Conv3dNet, (4, 2, 16, 16, 16)),
    }[name]
    model = model()
    x = torch.randn(*shape)
    return Case(model, (x,), _classify(torch.randint(0, 10, (shape[0],))), model)


ZOO = (
    "resnet_bottleneck",
    "densenet",
    "mobilenetv3",
    "unet",
    "vit",
    "gpt2",
    "bert",
    "lstm",
    "gru",
    "conv1d",
    "conv3d",
)
