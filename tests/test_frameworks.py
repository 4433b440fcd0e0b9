"""actpack under the training loops users run: Hugging Face ``Trainer`` and Lightning.

The user's change is one line (``actpack.wrap(model)`` before handing the
model over, or ``with actpack.compress():`` around a step's forward).  What
must hold: the loop trains the wrapped model with the hooks active (bytes
saved), ``"none"`` trains bit for bit as the plain loop does (the hooks
change nothing they should not), a lossy strategy leaves the forward's loss
exact (it codes only what backward reads), the saved checkpoint has the
plain model's keys, and the loop's own gradient checkpointing still
recomputes (actpack installs nothing under checkpoint's hooks).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from small_models import tiny_gpt2_config
from torch import nn

import actpack

# --- Hugging Face Trainer -----------------------------------------------------


def _hf_train(tmp_path, strategy: str | None, *, checkpointing: bool = False):
    """Two SGD steps of HF's Trainer on a tiny GPT-2 (batch 4 x 32 tokens):
    (losses logged per step, parameters after, keys of the saved weights,
    the wrapped model's engine or None)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from safetensors.torch import load_file

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(tiny_gpt2_config())
    if strategy is not None:
        actpack.wrap(model, strategy)
    ids = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(1))
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
        optim="sgd", report_to=[], save_strategy="no", logging_steps=1, use_cpu=True,
        disable_tqdm=True, seed=0, data_seed=0, **_checkpointing(transformers, checkpointing),
    )  # fmt: skip
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    keys = sorted(load_file(str(tmp_path / "saved" / "model.safetensors")))
    params = [p.detach().clone() for p in model.parameters()]
    engine = actpack.engine_of(model) if strategy is not None else None
    return losses, params, keys, engine


def _checkpointing(transformers, on: bool) -> dict:
    """TrainingArguments' flag for HF's per-block checkpointing: renamed
    ``activation_checkpointing`` in transformers 5 (the old name warns)."""
    if not on:
        return {}
    fields = transformers.TrainingArguments.__dataclass_fields__
    return {"activation_checkpointing" if "activation_checkpointing" in fields else
            "gradient_checkpointing": True}  # fmt: skip


@pytest.mark.parametrize("checkpointing", [False, True])
def test_hf_trainer_under_none_trains_as_without_actpack(tmp_path, checkpointing):
    losses, params, keys, _ = _hf_train(tmp_path / "plain", None, checkpointing=checkpointing)
    got_losses, got_params, got_keys, engine = _hf_train(
        tmp_path / "none", "none", checkpointing=checkpointing
    )
    assert got_losses == losses and len(losses) == 2
    for want, got in zip(params, got_params, strict=True):
        assert torch.equal(got, want)
    assert got_keys == keys
    assert engine.stats.baseline_bytes > 0  # the hooks ran under the Trainer


@pytest.mark.parametrize("strategy", ["actnn", "actnn-rows", "division"])
def test_hf_trainer_compresses_and_keeps_the_forward_exact(tmp_path, strategy):
    losses, params, keys, _ = _hf_train(tmp_path / "plain", None)
    got_losses, got_params, got_keys, engine = _hf_train(tmp_path / strategy, strategy)
    # The first step's forward is the plain one (codes only feed backward);
    # the second starts from weights updated with noisy gradients.
    assert got_losses[0] == losses[0]
    assert got_keys == keys
    stats = engine.stats
    assert stats.compressed_bytes < stats.baseline_bytes / 2
    # One SGD step of lr 1e-2 from a noisy gradient: the weights moved, and
    # not as the exact step moved them (the codes are lossy).
    start = [p.detach().clone() for p in _fresh_gpt2().parameters()]
    moved = sum((g - s).abs().sum().item() for g, s in zip(got_params, start, strict=True))
    differ = sum((g - w).abs().sum().item() for g, w in zip(got_params, params, strict=True))
    assert moved > 0 and 0 < differ < moved


def _fresh_gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(tiny_gpt2_config())


def test_hf_trainer_gradient_checkpointing_still_recomputes(tmp_path):
    """HF's ``gradient_checkpointing=True`` wraps each block in
    ``torch.utils.checkpoint``: actpack must not turn it off (it installs
    nothing under checkpoint's own hooks), so the bytes autograd holds drop
    as they do without actpack, and the rest is compressed."""
    *_, full = _hf_train(tmp_path / "full", "actnn")
    *_, ckpt = _hf_train(tmp_path / "ckpt", "actnn", checkpointing=True)
    *_, plain_ckpt = _hf_train(tmp_path / "none", "none", checkpointing=True)
    # Checkpointing holds the blocks' inputs only: far less than the full graph.
    # ("none" without op names counts leaves as saves: see README, Known limits.)
    assert (
        ckpt.stats.baseline_bytes + ckpt.stats.leaf_bytes
        == plain_ckpt.stats.baseline_bytes + plain_ckpt.stats.leaf_bytes
    )
    assert ckpt.stats.baseline_bytes < full.stats.baseline_bytes / 2
    assert ckpt.stats.compressed_bytes < ckpt.stats.baseline_bytes


def _hf_train_compiled_t5(tmp_path, strategy: str | None):
    """Two SGD steps of HF's Trainer with ``torch_compile=True`` (aot_eager)
    and per-layer checkpointing on a tiny T5 (dropout on): (losses, parameters
    after).  Dynamo falls back to eager mode for T5's checkpointed layers and
    stacks, so this loop runs compiled graphs and eager code under one
    compiled call."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    torch._dynamo.reset()  # each run compiles its own code (hooks are not guarded on)
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(
        d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=1, num_decoder_layers=1,
        vocab_size=128, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    ))  # fmt: skip
    if strategy is not None:
        actpack.wrap(model, strategy)
    ids = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(1))
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
        optim="sgd", report_to=[], save_strategy="no", logging_steps=1, use_cpu=True,
        disable_tqdm=True, seed=0, data_seed=0, torch_compile=True,
        torch_compile_backend="aot_eager", **_checkpointing(transformers, True),
    )  # fmt: skip
    data = [{"input_ids": row, "labels": row} for row in ids]
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' notes on CPU compile, use_cache
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return losses, [p.detach().clone() for p in model.parameters()]


def test_hf_trainer_compiled_with_gradient_checkpointing(tmp_path, capfd):
    """``Trainer(torch_compile=True)`` plus gradient checkpointing: the eager
    code Dynamo leaves between its graphs saves through actpack's eager hooks,
    which Dynamo compiled frame by frame before (about 20 "Exception ignored in
    StorageWeakRef.__del__" tracebacks in this loop, 28 graph breaks instead
    of 7); under ``"none"`` the weights are the plain compiled loop's bit for
    bit, under a lossy strategy the first loss is the plain one."""
    losses, params = _hf_train_compiled_t5(tmp_path / "plain", None)
    none_losses, none_params = _hf_train_compiled_t5(tmp_path / "none", "none")
    lossy_losses, lossy_params = _hf_train_compiled_t5(tmp_path / "rows", "actnn-rows")
    assert none_losses == losses and len(losses) == 2
    assert all(torch.equal(a, b) for a, b in zip(none_params, params, strict=True))
    assert lossy_losses[0] == losses[0]
    assert any(not torch.equal(a, b) for a, b in zip(lossy_params, params, strict=True))
    err = capfd.readouterr().err
    assert "Exception ignored" not in err and "recompile_limit" not in err


# --- Lightning ------------------------------------------------------------------


def _lightning_fit(strategy: str | None, *, how: str = "wrap", precision: str = "32-true"):
    """Three SGD steps of Lightning's Trainer on an MLP (batch 32, width 256):
    (parameters after, the engine or None)."""
    L = pytest.importorskip("lightning")

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 8))
            self.engine = None
            if strategy is not None and how == "wrap":
                actpack.wrap(self.net, strategy)
                self.engine = actpack.engine_of(self.net)

        def training_step(self, batch, index):
            x, y = batch
            if strategy is not None and how == "compress":
                # Lightning runs backward after training_step returns: the
                # codes outlive the context, as compress allows.
                with actpack.compress(strategy) as self.engine:
                    return nn.functional.cross_entropy(self.net(x), y)
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    module = Module()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(96, 64, generator=gen), torch.randint(0, 8, (96,), generator=gen)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    trainer = L.Trainer(
        max_steps=3, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, precision=precision,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's own tips and deprecations
        trainer.fit(module, loader)
    return [p.detach().clone() for p in module.parameters()], module.engine


@pytest.mark.parametrize("how", ["wrap", "compress"])
def test_lightning_under_none_trains_as_without_actpack(how):
    want, _ = _lightning_fit(None)
    got, engine = _lightning_fit("none", how=how)
    for w, g in zip(want, got, strict=True):
        assert torch.equal(g, w)
    assert engine.stats.baseline_bytes > 0


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("how", ["wrap", "compress"])
def test_lightning_compresses(how, precision):
    want, _ = _lightning_fit(None, precision=precision)
    got, engine = _lightning_fit("actnn", how=how, precision=precision)
    stats = engine.stats
    assert stats.compressed_bytes < stats.baseline_bytes / 2
    differ = sum((g - w).abs().sum().item() for g, w in zip(got, want, strict=True))
    assert differ > 0  # trained on lossy codes, not on exact saves


def test_wrap_refuses_a_lightning_module_whose_step_calls_a_submodule():
    """LightningModule's own forward only passes the call on to nn.Module's,
    which raises: a subclass that defines none is never called by the loop
    (its training_step calls submodules), so hooks on it would never run."""
    L = pytest.importorskip("lightning")

    class Step(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Linear(4, 4)

        def training_step(self, batch, index):
            return self.net(batch).sum()

    class Called(Step):
        def forward(self, x):
            return self.net(x)

    with pytest.raises(TypeError, match="defines no forward"):
        actpack.wrap(Step(), "actnn")
    module = actpack.wrap(Called(), "actnn")  # a forward of its own: its hooks run
    module(torch.randn(2, 4)).sum().backward()
    assert actpack.engine_of(module).stats.leaf_bytes > 0  # the batch, saved by net
