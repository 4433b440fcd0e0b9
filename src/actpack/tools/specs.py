"""Models named on the command line: built-in, torchvision, timm and HuggingFace models.

A spec is one of:

* ``NAME[:SIZE]``: a built-in model (``resnet``, ``gpt``, ``vit``; sizes in
  :data:`actpack.tools.models.MODELS`);
* ``torchvision:NAME`` / ``timm:NAME``: that library's model with random
  weights (nothing downloaded), on 224x224 images (timm: the model's own
  input size);
* ``hf:TYPE[:SIZE]``: a HuggingFace ``transformers`` model built from the
  config class of model type ``TYPE`` (``gpt2``, ``llama``, ``bert``,
  ``vit``, ...; nothing downloaded) with a causal-LM, masked-LM or
  image-classification head, called with ``labels=`` so that its output
  carries the loss.  ``SIZE`` is ``full`` (the config class's defaults:
  ``hf:gpt2`` is GPT-2 small, 124M parameters; ``hf:llama`` is 7B),
  ``small`` or ``tiny`` (see :data:`HF_SIZES`).

The libraries are optional: a spec naming one that is not installed is
refused with the ``pip install`` line that fixes it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from actpack.tools.models import MODELS, InputFactory, LossFn, build_model, loss_for

__all__ = ["HF_SIZES", "SOURCES", "ModelSpec", "build", "parse_spec"]

#: Spec prefix -> the package it needs.
SOURCES = {"torchvision": "torchvision", "timm": "timm", "hf": "transformers"}
#: Config overrides per ``hf:`` size (a key the config class lacks is skipped)
#: and the sequence length of the example inputs.
HF_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        intermediate_size=256, vocab_size=1024, max_position_embeddings=128, seq_len=64,
        image_size=32, patch_size=8,
    ),
    "small": dict(
        hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
        intermediate_size=1024, vocab_size=8192, max_position_embeddings=512, seq_len=256,
        image_size=64, patch_size=8,
    ),
    "full": dict(seq_len=1024),
}  # fmt: skip
#: Model-type lists of transformers that say which head a config gets, tried in
#: order: encoders such as BERT also have a causal-LM head, meant for decoders.
_HF_HEADS = (
    ("MODEL_FOR_MASKED_LM_MAPPING_NAMES", "AutoModelForMaskedLM", "ForMaskedLM"),
    ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "AutoModelForCausalLM", "ForCausalLM"),
    ("MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES", "AutoModelForImageClassification", None),
)
_TORCHVISION_IMAGE_SIZE = {"inception_v3": 299}


@dataclass(frozen=True)
class ModelSpec:
    """A parsed spec: ``source`` is ``"builtin"`` or a key of :data:`SOURCES`."""

    source: str
    name: str
    size: str | None = None

    def __str__(self) -> str:
        """The spec as written on the command line."""
        if self.source == "builtin":
            return ":".join(p for p in (self.name, self.size) if p)
        return ":".join(p for p in (self.source, self.name, self.size) if p)

    @property
    def label(self) -> str:
        """Name in result tables: ``resnet-small`` for a built-in model, else the spec."""
        if self.source == "builtin":
            return f"{self.name}-{self.size}" if self.size else self.name
        return str(self)


def _package(source: str, spec: str) -> Any:
    package = SOURCES[source]
    try:
        return importlib.import_module(package)
    except ImportError:
        raise ValueError(
            f"{spec} needs {package}, which is not installed: pip install {package}"
        ) from None


def _hf_head(name: str) -> tuple[str, str | None]:
    from transformers.models.auto import modeling_auto

    for table, auto, loss_type in _HF_HEADS:
        if name in getattr(modeling_auto, table, {}):
            return auto, loss_type
    raise ValueError(
        f"hf:{name} has no causal-LM, masked-LM or image-classification head in transformers; "
        "try hf:gpt2, hf:llama, hf:bert or hf:vit"
    )


def parse_spec(text: str) -> ModelSpec:
    """Parse and check a spec; raises ``ValueError`` naming the problem and the fix.

    A built-in spec without a size keeps ``size=None`` (the caller picks the
    default); an ``hf:`` spec without one gets ``"full"``.
    """
    source, _, rest = text.partition(":")
    if source not in SOURCES:
        name, colon, size = source, bool(rest) or ":" in text, rest or None
        if colon and size is None:
            raise ValueError(f"empty size in {text!r}; write {name} or {name}:SIZE")
        if name not in MODELS:
            raise ValueError(
                f"unknown model {name!r}; choose a built-in model ({', '.join(MODELS)}) "
                "or torchvision:NAME, timm:NAME, hf:TYPE[:tiny|small|full]"
            )
        if size is not None and size not in MODELS[name]:
            raise ValueError(
                f"unknown size {size!r} for {name}; choose from {', '.join(MODELS[name])}"
            )
        return ModelSpec("builtin", name, size)
    name, _, size = rest.partition(":")
    if not name:
        raise ValueError(f"{text!r} names no model; write {source}:NAME")
    lib = _package(source, text)
    if source == "hf":
        size = size or "full"
        if size not in HF_SIZES:
            raise ValueError(
                f"unknown size {size!r} for hf:{name}; choose from {', '.join(HF_SIZES)}"
            )
        if name not in lib.CONFIG_MAPPING:
            raise ValueError(
                f"hf:{name}: transformers has no model type {name!r} "
                "(a config's model_type, e.g. gpt2, llama, bert, vit)"
            )
        _hf_head(name)
        return ModelSpec(source, name, size)
    if size:
        raise ValueError(f"{source}:{name} takes no size (got {size!r})")
    known = lib.is_model(name) if source == "timm" else name in lib.models.list_models()
    if not known:
        raise ValueError(f"{source} has no model named {name!r}")
    return ModelSpec(source, name)


def _image_loss(output: Any, inputs: tuple) -> Tensor:
    # Inputs are random, so labels would be meaningless: a deterministic
    # surrogate that reaches every parameter, as for the built-in models.
    logits = output[0] if isinstance(output, (tuple, list)) else output
    return logits.float().pow(2).mean()


def _hf_loss(output: Any, inputs: tuple) -> Tensor:
    return output.loss


def _images(shape: tuple[int, ...]) -> InputFactory:
    def make_inputs(batch_size: int, device: Any = "cpu") -> tuple[Tensor]:
        return (torch.randn(batch_size, *shape, device=device),)

    return make_inputs


class _Labelled(nn.Module):
    """Calls a HuggingFace model with ``labels=`` so that its output carries ``.loss``."""

    def __init__(self, model: nn.Module, key: str) -> None:
        super().__init__()
        self.model = model
        self.key = key

    def forward(self, x: Tensor, labels: Tensor) -> Any:
        return self.model(**{self.key: x}, labels=labels)


def _hf_config(lib: Any, name: str, size: str) -> Any:
    cls = lib.CONFIG_MAPPING[name]
    default = cls()
    wanted = {k: v for k, v in HF_SIZES[size].items() if k != "seq_len" and hasattr(default, k)}
    # Passed to the constructor under the class's own names (GPT-2: n_embd...),
    # so that derived fields such as head_dim follow.
    amap = getattr(cls, "attribute_map", {})
    kwargs = {amap.get(k, k): v for k, v in wanted.items()}
    vocab = wanted.get("vocab_size")
    if vocab is not None:
        # Special token ids of the full vocabulary would point past the small one.
        for key, value in default.to_dict().items():
            if key.endswith("_token_id") and isinstance(value, int) and value >= vocab:
                kwargs[key] = None
    if hasattr(default, "use_cache"):
        kwargs["use_cache"] = False  # training: no key/value cache in the output
    return cls(**kwargs)


def _build_hf(lib: Any, spec: ModelSpec) -> tuple[nn.Module, InputFactory]:
    auto, loss_type = _hf_head(spec.name)
    config = _hf_config(lib, spec.name, spec.size or "full")
    model = getattr(lib, auto).from_config(config)
    if loss_type is not None and getattr(model, "loss_type", None) is None:
        model.loss_type = loss_type  # GPT2LMHeadModel's name does not say its loss
    if auto == "AutoModelForImageClassification":
        shape = (config.num_channels, config.image_size, config.image_size)
        classes = config.num_labels

        def make_inputs(batch_size: int, device: Any = "cpu") -> tuple[Tensor, Tensor]:
            x = torch.randn(batch_size, *shape, device=device)
            return x, torch.randint(0, classes, (batch_size,), device=device)

        return _Labelled(model, "pixel_values"), make_inputs
    seq = HF_SIZES[spec.size or "full"]["seq_len"]
    positions = getattr(config, "max_position_embeddings", None) or seq
    # A power of two that fits: RoBERTa's 514 positions hold 512 tokens.
    seq = min(seq, 1 << (positions.bit_length() - 1))
    vocab = config.vocab_size

    def make_tokens(batch_size: int, device: Any = "cpu") -> tuple[Tensor, Tensor]:
        ids = torch.randint(0, vocab, (batch_size, seq), device=device)
        return ids, ids  # labels: the model shifts them for next-token prediction

    return _Labelled(model, "input_ids"), make_tokens


def build(spec: ModelSpec, **overrides: Any) -> tuple[nn.Module, InputFactory, LossFn]:
    """``(model, make_inputs, loss)`` for ``spec``, as :func:`~actpack.tools.models.build_model`
    and :func:`~actpack.tools.models.loss_for` give for a built-in model.

    ``overrides`` go to :func:`~actpack.tools.models.build_model` (built-in
    models only).  ``make_inputs(batch_size, device)`` returns random inputs
    (token ids double as labels for ``hf:`` language models); ``loss(output,
    inputs)`` is the scalar trained on.
    """
    if spec.source == "builtin":
        model, make_inputs = build_model(spec.name, spec.size or "small", **overrides)
        return model, make_inputs, loss_for(spec.name)
    if overrides:
        raise TypeError(f"{spec} takes no overrides")
    lib = _package(spec.source, str(spec))
    if spec.source == "hf":
        model, make_inputs = _build_hf(lib, spec)
        return model, make_inputs, _hf_loss
    if spec.source == "timm":
        model = lib.create_model(spec.name, pretrained=False)
        cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", {})
        shape = tuple(cfg.get("input_size", (3, 224, 224)))
    else:
        model = lib.models.get_model(spec.name, weights=None)
        side = _TORCHVISION_IMAGE_SIZE.get(spec.name, 224)
        shape = (3, side, side)
    return model, _images(shape), _image_loss
