"""Built-in reference models for the CLI report, benchmarks and tests.

Plain :class:`torch.nn.Module` implementations (no torchvision dependency):

* :class:`ResNet` -- ResNet-style CNN with basic or bottleneck blocks.
* :class:`GPT` -- GPT-style decoder-only transformer (pre-LN, causal).
* :class:`ViT` -- small vision transformer (pre-LN, cls token).

:func:`build_model` builds a named, sized model from :data:`MODELS` together
with a ``make_inputs(batch_size, device)`` factory for example inputs, and
:func:`loss_for` returns a scalar training loss suitable for each model.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "MODELS",
    "GPT",
    "BasicBlock",
    "Bottleneck",
    "InputFactory",
    "LossFn",
    "MLP",
    "ResNet",
    "SelfAttention",
    "TransformerBlock",
    "ViT",
    "build_model",
    "loss_for",
]

Device = Union[torch.device, str]
#: ``make_inputs(batch_size, device) -> tuple of example inputs``.
InputFactory = Callable[[int, Device], tuple]
#: ``loss(output, inputs) -> scalar tensor``.
LossFn = Callable[[Tensor, tuple], Tensor]


# --------------------------------------------------------------------------- #
# ResNet
# --------------------------------------------------------------------------- #


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection (ResNet-18/34)."""

    expansion = 1

    def __init__(self, in_ch: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_ch = planes * self.expansion
        self.conv1 = _conv3x3(in_ch, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, out_ch)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(_conv1x1(in_ch, out_ch, stride), nn.BatchNorm2d(out_ch))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand x4, with a residual (ResNet-50+).

    The stride sits on the 3x3 conv, as in torchvision ("ResNet v1.5").
    """

    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_ch = planes * self.expansion
        self.conv1 = _conv1x1(in_ch, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, out_ch)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(_conv1x1(in_ch, out_ch, stride), nn.BatchNorm2d(out_ch))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)


_BLOCKS: dict[str, type[BasicBlock] | type[Bottleneck]] = {
    "basic": BasicBlock,
    "bottleneck": Bottleneck,
}
_STEMS = ("cifar", "imagenet")


class ResNet(nn.Module):
    """ResNet-style CNN.

    Stage ``i`` has ``layers[i]`` blocks of ``width * 2**i`` planes; every stage
    but the first halves the resolution.  ``stem="cifar"`` is a 3x3 stride-1
    conv without max-pool; ``stem="imagenet"`` is a 7x7 stride-2 conv followed
    by a 3x3 stride-2 max-pool.  Head: global average pool + Linear.
    """

    def __init__(
        self,
        block: str = "basic",
        layers: list[int] | tuple[int, ...] = (2, 2, 2, 2),
        width: int = 64,
        in_channels: int = 3,
        num_classes: int = 1000,
        stem: str = "imagenet",
    ) -> None:
        super().__init__()
        if block not in _BLOCKS:
            raise ValueError(f"unknown block {block!r}; choose from {sorted(_BLOCKS)}")
        if stem not in _STEMS:
            raise ValueError(f"unknown stem {stem!r}; choose from {list(_STEMS)}")
        if len(layers) == 0 or any(n < 1 for n in layers):
            raise ValueError(f"layers must be a non-empty list of positive ints, got {layers}")
        block_cls = _BLOCKS[block]

        if stem == "cifar":
            self.conv1 = _conv3x3(in_channels, width)
            self.maxpool: nn.Module = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(
                in_channels, width, kernel_size=7, stride=2, padding=3, bias=False
            )
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)

        stages: list[nn.Module] = []
        in_ch = width
        for i, num_blocks in enumerate(layers):
            planes = width * 2**i
            stride = 1 if i == 0 else 2
            blocks: list[nn.Module] = []
            for j in range(num_blocks):
                blocks.append(block_cls(in_ch, planes, stride if j == 0 else 1))
                in_ch = planes * block_cls.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        """``(N, C, H, W)`` images -> ``(N, num_classes)`` logits."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.stages(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


# --------------------------------------------------------------------------- #
# Transformers
# --------------------------------------------------------------------------- #


class SelfAttention(nn.Module):
    """Multi-head self-attention: fused qkv Linear, SDPA, output projection."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0, causal: bool = False) -> None:
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.heads = heads
        self.causal = causal
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        n, seq, dim = x.shape
        qkv = self.qkv(x).view(n, seq, 3, self.heads, dim // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (N, heads, L, head_dim)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=self.causal,
        )
        out = out.transpose(1, 2).reshape(n, seq, dim)
        return self.proj_drop(self.proj(out))


class MLP(nn.Module):
    """Linear -> GELU -> Linear (-> dropout)."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.act(self.fc1(x))))


class TransformerBlock(nn.Module):
    """Pre-LN transformer block: ``x + attn(ln1(x))`` then ``x + mlp(ln2(x))``."""

    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_ratio: float = 4,
        dropout: float = 0.0,
        causal: bool = False,
    ) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads, dropout, causal)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio), dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


def _init_transformer(module: nn.Module) -> None:
    """GPT-2 style init: N(0, 0.02) weights, zero biases, unit LayerNorm."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class GPT(nn.Module):
    """GPT-style decoder-only transformer with an untied LM head.

    Token + learned position embeddings, ``depth`` causal pre-LN blocks, a
    final LayerNorm and a bias-free Linear head.
    """

    def __init__(
        self,
        vocab_size: int,
        seq_len: int,
        dim: int,
        depth: int,
        heads: int,
        mlp_ratio: float = 4,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.seq_len = seq_len
        self.tok_emb = nn.Embedding(vocab_size, dim)
        self.pos_emb = nn.Embedding(seq_len, dim)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.Sequential(
            *[TransformerBlock(dim, heads, mlp_ratio, dropout, causal=True) for _ in range(depth)]
        )
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        _init_transformer(self)

    def forward(self, idx: Tensor) -> Tensor:
        """``(N, L)`` token ids -> ``(N, L, vocab_size)`` logits."""
        seq = idx.shape[1]
        if seq > self.seq_len:
            raise ValueError(f"sequence length {seq} exceeds seq_len {self.seq_len}")
        pos = torch.arange(seq, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        x = self.blocks(x)
        return self.head(self.ln_f(x))


class ViT(nn.Module):
    """Small vision transformer: conv patch embedding, cls token, pre-LN blocks."""

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        in_channels: int,
        num_classes: int,
        dim: int,
        depth: int,
        heads: int,
        mlp_ratio: float = 4,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if image_size % patch_size != 0:
            raise ValueError(
                f"image_size ({image_size}) must be divisible by patch_size ({patch_size})"
            )
        num_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_emb = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.Sequential(
            *[TransformerBlock(dim, heads, mlp_ratio, dropout, causal=False) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        _init_transformer(self)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_emb, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        """``(N, C, H, W)`` images -> ``(N, num_classes)`` logits."""
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (N, patches, dim)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = self.drop(torch.cat([cls, x], dim=1) + self.pos_emb)
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


# --------------------------------------------------------------------------- #
# Registry
# --------------------------------------------------------------------------- #

#: ``MODELS[name][size]`` -> config.  Keys are constructor kwargs of the model
#: class, except ``"image_size"`` for ``"resnet"``, which only sets the
#: resolution of the example inputs (ResNet itself is resolution-agnostic).
MODELS: dict[str, dict[str, dict[str, Any]]] = {
    "resnet": {
        "tiny": dict(
            block="basic",
            layers=[1, 1, 1, 1],
            width=16,
            in_channels=3,
            num_classes=10,
            stem="cifar",
            image_size=32,
        ),
        "small": dict(
            block="basic",
            layers=[2, 2, 2, 2],
            width=32,
            in_channels=3,
            num_classes=10,
            stem="cifar",
            image_size=32,
        ),
        "resnet50": dict(
            block="bottleneck",
            layers=[3, 4, 6, 3],
            width=64,
            in_channels=3,
            num_classes=1000,
            stem="imagenet",
            image_size=224,
        ),
    },
    "gpt": {
        "tiny": dict(vocab_size=256, seq_len=64, dim=64, depth=2, heads=4),
        "small": dict(vocab_size=1024, seq_len=256, dim=256, depth=4, heads=4),
        "gpt2": dict(vocab_size=50257, seq_len=1024, dim=768, depth=12, heads=12),
    },
    "vit": {
        "tiny": dict(
            image_size=28, patch_size=7, in_channels=1, num_classes=10, dim=64, depth=2, heads=4
        ),
        "small": dict(
            image_size=28, patch_size=4, in_channels=1, num_classes=10, dim=128, depth=4, heads=4
        ),
    },
}

_CLASSES: dict[str, type[nn.Module]] = {"resnet": ResNet, "gpt": GPT, "vit": ViT}
# Config keys accepted for a model besides its constructor kwargs.
_EXTRA_KEYS: dict[str, set[str]] = {"resnet": {"image_size"}, "gpt": set(), "vit": set()}


def _check_name(name: str) -> None:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(MODELS)}")


def build_model(name: str, size: str = "small", **overrides: Any) -> tuple[nn.Module, InputFactory]:
    """Build built-in model ``name`` at ``size`` (see :data:`MODELS`).

    ``overrides`` replace entries of the size config (any constructor kwarg,
    plus ``image_size`` for ``"resnet"``).  Returns ``(model, make_inputs)``
    where ``make_inputs(batch_size, device="cpu")`` returns a tuple of example
    inputs: float32 ``randn`` images ``(N, C, H, W)`` for resnet/vit, or int64
    token ids ``(N, seq_len)`` for gpt.  The model is built on the current
    default device (so ``with torch.device("meta"):`` works).

    Raises ``ValueError`` for an unknown name or size and ``TypeError`` for an
    unknown override key.
    """
    _check_name(name)
    sizes = MODELS[name]
    if size not in sizes:
        raise ValueError(f"unknown size {size!r} for model {name!r}; choose from {list(sizes)}")
    cls = _CLASSES[name]
    allowed = (set(inspect.signature(cls.__init__).parameters) - {"self"}) | _EXTRA_KEYS[name]
    unknown = set(overrides) - allowed
    if unknown:
        raise TypeError(
            f"unknown override(s) {sorted(unknown)} for model {name!r}; "
            f"valid keys: {sorted(allowed)}"
        )
    cfg = {**sizes[size], **overrides}
    kwargs = {k: v for k, v in cfg.items() if k not in _EXTRA_KEYS[name]}
    model = cls(**kwargs)

    if name == "gpt":
        vocab_size, seq_len = int(cfg["vocab_size"]), int(cfg["seq_len"])

        def make_inputs(batch_size: int, device: Device = "cpu") -> tuple[Tensor]:
            return (torch.randint(0, vocab_size, (batch_size, seq_len), device=device),)

    else:
        shape = (int(cfg["in_channels"]), int(cfg["image_size"]), int(cfg["image_size"]))

        def make_inputs(batch_size: int, device: Device = "cpu") -> tuple[Tensor]:
            return (torch.randn(batch_size, *shape, device=device, dtype=torch.float32),)

    return model, make_inputs


def _next_token_loss(logits: Tensor, inputs: tuple) -> Tensor:
    idx = inputs[0]
    vocab = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, vocab).float(), idx[:, 1:].reshape(-1).long())


def _surrogate_loss(output: Tensor, inputs: tuple) -> Tensor:
    return output.float().pow(2).mean()


def loss_for(model_name: str) -> LossFn:
    """Scalar loss ``loss(output, inputs)`` for built-in model ``model_name``.

    * ``"gpt"``: next-token cross-entropy of ``logits[:, :-1]`` vs ``idx[:, 1:]``.
    * ``"resnet"``, ``"vit"``: surrogate ``output.float().pow(2).mean()``.  The
      inputs are random, so labels would be meaningless; this deterministic
      loss needs no labels and still back-propagates through every parameter,
      which is all the memory/accuracy benchmarks need.
    """
    _check_name(model_name)
    return _next_token_loss if model_name == "gpt" else _surrogate_loss
