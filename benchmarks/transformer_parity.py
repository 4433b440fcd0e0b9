"""Short-run loss parity, bits and gradient noise of strategies on small transformers.

For each model, every strategy trains from the same initial weights on the
same batches for ``--steps`` AdamW steps, once per seed in ``--seeds``; seed
``s`` draws the dropout masks (the same for every strategy: strategies draw
their rounding noise from their own generators, seeded ``1000 + s``).
Reported per strategy:

* ``last-10 loss``: mean training loss of the last 10 steps, averaged over
  the seeds, and its change against exact training (``none``) over the same
  seeds; the ``none`` row gives instead the standard deviation of exact
  training across the seeds' dropout masks: the chaos floor of the figure;
* ``bits/element``, ``vs fp32``: compressed bits per element and the ratio of
  the bytes autograd would hold, from :func:`actpack.measure` on one
  held-out batch.  Dropout's noise is left out on both sides: on the CPU
  dropout saves it as a float tensor, which actpack stores in 1 bit (32x),
  while CUDA saves a bool mask (8x) or, inside fused attention, none; so
  are the op statistics the engine keeps exact (normalization and attention
  statistics).  The last column counts every save, as measured here;
* ``vs bf16``: the same ratio for the model cast to bf16;
* ``gradient variance``: :func:`actpack.gradient_noise` relative variance
  (``--draws`` draws, dropout on, same masks in every draw) on the held-out
  batch at the weights of the first exact run's end.

Models (built from configs, no download, dropout on):

* ``llama``: HF ``LlamaForCausalLM``, 2 layers, width 128, attention dropout 0.1;
* ``gpt2``: HF ``GPT2LMHeadModel``, 2 layers, width 128, dropout 0.1;
* ``encoder``: ``nn.TransformerEncoderLayer`` x2 (width 128, dropout 0.1,
  ``nn.MultiheadAttention``) as a causal byte-level language model;
* ``vit``: the built-in ViT ``tiny`` with dropout 0.1 on Fashion-MNIST
  (batch 128; the language models: batch 16 of 128 tokens).

The language models read byte tokens of the Python standard library's
source (local files, the same on every run of one Python version).
``--no-train`` skips training under the compressed strategies (bits and
gradient noise only, at the exactly trained weights).

Run from the repository root::

    PYTHONPATH=src python benchmarks/transformer_parity.py --models llama gpt2 encoder vit \\
        --strategies none int8 actnn division-tokens division actnn-rows
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import actpack
from actpack.engine import eager
from actpack.tools.data import load_fashion_mnist
from actpack.tools.models import build_model

MODELS = ("llama", "gpt2", "encoder", "vit")
SEQ, VOCAB, WIDTH = 128, 256, 128


@dataclass
class Case:
    """A model factory, its batches and its loss."""

    name: str
    build: Callable[[], nn.Module]
    train: list[tuple[Tensor, ...]]  # one tuple of inputs per step
    held_out: tuple[Tensor, ...]
    loss: Callable[[Any, tuple[Tensor, ...]], Tensor]


# --------------------------------------------------------------------------- #
# Data and models
# --------------------------------------------------------------------------- #


def text_bytes(limit: int = 2_000_000) -> Tensor:
    """Byte tokens of the standard library's ``*.py`` files, in name order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= limit:
            break
    raw = b"".join(chunks)[:limit]
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()


def lm_batches(steps: int, batch: int, seed: int) -> tuple[list[tuple[Tensor]], tuple[Tensor]]:
    tokens = text_bytes()
    split = int(0.9 * tokens.numel())
    gen = torch.Generator().manual_seed(seed)

    def draw(lo: int, hi: int) -> tuple[Tensor]:
        starts = torch.randint(lo, hi - SEQ, (batch,), generator=gen)
        return (torch.stack([tokens[s : s + SEQ] for s in starts.tolist()]),)

    return [draw(0, split) for _ in range(steps)], draw(split, tokens.numel())


def lm_loss(out: Any, inputs: tuple[Tensor, ...]) -> Tensor:
    logits = out.logits if hasattr(out, "logits") else out
    idx = inputs[0]
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), idx[:, 1:].reshape(-1)
    )


class EncoderLM(nn.Module):
    """Causal byte LM made of ``nn.TransformerEncoderLayer`` (``nn.MultiheadAttention``)."""

    def __init__(self, depth: int = 2, dropout: float = 0.1) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, WIDTH)
        self.pos = nn.Embedding(SEQ, WIDTH)
        layer = nn.TransformerEncoderLayer(
            WIDTH, 4, 4 * WIDTH, dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.layers = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB, bias=False)

    def forward(self, idx: Tensor) -> Tensor:
        seq = idx.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(seq, device=idx.device)
        x = self.tok(idx) + self.pos(torch.arange(seq, device=idx.device))
        return self.head(self.norm(self.layers(x, mask=mask, is_causal=True)))


def _llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=352, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=SEQ,
        attention_dropout=0.1, bos_token_id=0, eos_token_id=1, pad_token_id=None,
    )  # fmt: skip
    return LlamaForCausalLM(cfg)


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=VOCAB, n_embd=WIDTH, n_layer=2, n_head=4, n_positions=SEQ,
        resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1, bos_token_id=0, eos_token_id=1,
    )  # fmt: skip
    return GPT2LMHeadModel(cfg)


def _vit() -> nn.Module:
    model, _ = build_model("vit", "tiny", dropout=0.1)
    return model


def build_case(name: str, steps: int, seed: int) -> Case:
    if name == "vit":
        tx, ty, vx, vy = load_fashion_mnist(subset=10_000, test_subset=1_000)
        gen = torch.Generator().manual_seed(seed)
        picks = [torch.randint(0, len(tx), (128,), generator=gen) for _ in range(steps)]
        batches = [(tx[i], ty[i]) for i in picks]
        return Case(
            name,
            _vit,
            batches,
            (vx[:128].clone(), vy[:128].clone()),
            lambda out, inputs: F.cross_entropy(out, inputs[1]),
        )
    builders = {"llama": _llama, "gpt2": _gpt2, "encoder": lambda: EncoderLM()}
    train, held = lm_batches(steps, 16, seed)
    return Case(name, builders[name], train, held, lm_loss)


def _forward(model: nn.Module, inputs: tuple[Tensor, ...]) -> Any:
    # The ViT's batches carry their labels; the models take only the first input.
    return model(inputs[0])


# --------------------------------------------------------------------------- #
# Measurements
# --------------------------------------------------------------------------- #


def train_losses(case: Case, init: dict, strategy: str | actpack.Strategy, seed: int,
                 lr: float) -> tuple[list[float], nn.Module]:  # fmt: skip
    model = case.build()
    model.load_state_dict(init)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    torch.manual_seed(seed)  # same dropout masks for every strategy
    losses = []
    for inputs in case.train:
        with actpack.compress(strategy, model=model):
            loss = case.loss(_forward(model, inputs), inputs)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, model


class _NoiseTally:
    """Counts the dropout noise the engine stores two-valued (1 bit + scale):
    ``(elements, bytes held uncompressed, bytes of the codes)``.

    On the CPU, dropout saves its noise as a float tensor (0 or 1/(1-p));
    on CUDA it saves a bool mask, or nothing inside fused attention.  Left
    out on both sides, the ratio speaks of the activations alone, as on a GPU.
    """

    def __init__(self) -> None:
        self.elements = self.before = self.after = 0

    def __enter__(self) -> _NoiseTally:
        tally, base = self, eager.TwoValued

        class Counted(base):
            @classmethod
            def encode(cls, x: Tensor, check: bool = False):
                code = base.encode(x, check)
                if code is not None:
                    tally.elements += x.numel()
                    tally.before += x.numel() * x.element_size()
                    tally.after += code.nbytes
                return code

        self._base = base
        eager.TwoValued = Counted
        return self

    def __exit__(self, *exc: object) -> None:
        eager.TwoValued = self._base


def bits(
    case: Case, model: nn.Module, strategy: Any, dtype: torch.dtype
) -> tuple[actpack.Report, _NoiseTally]:
    m = copy.deepcopy(model).to(dtype)
    inputs = tuple(t.to(dtype) if t.is_floating_point() else t for t in case.held_out)
    with _NoiseTally() as tally:
        report = actpack.measure(
            m, inputs[0], strategy=strategy, loss_fn=lambda out: case.loss(out, inputs)
        )
    return report, tally


def noise(case: Case, model: nn.Module, strategy: Any, draws: int) -> actpack.NoiseReport:
    model.train()  # dropout on, same masks in every draw
    return actpack.gradient_noise(
        model,
        case.held_out[0],
        strategy=strategy,
        draws=draws,
        loss_fn=lambda out: case.loss(out, case.held_out),
    )


def _without_masks(report: actpack.Report, tally: _NoiseTally) -> tuple[float, float]:
    """(bits per element, ratio) leaving out dropout's noise (see :class:`_NoiseTally`)
    and what the engine passed through as op statistics (normalization and
    attention statistics, and under ``none`` also the noise, kept exact there
    as every other save)."""
    kept = report.passthrough.get("op statistics", 0)
    elements = report.baseline_elements - kept / 4 - tally.elements  # statistics: float32
    before = report.baseline_bytes - kept - tally.before
    compressed = report.compressed_bytes - kept - tally.after
    bits_ = 8 * compressed / elements if elements else 0.0
    return bits_, before / compressed if compressed else float("inf")


def run_model(name: str, strategies: list[tuple[str, Callable[[int], Any]]], args) -> list[dict]:
    case = build_case(name, args.steps, args.seed)
    torch.manual_seed(args.seed)
    init = copy.deepcopy(case.build().state_dict())
    rows = []
    exact_model = None
    for label, make in strategies:
        curves = []
        for s in args.seeds if label == "none" or not args.no_train else ():
            t0 = time.perf_counter()
            # Seed s draws the dropout masks (same for every strategy) and, with
            # an offset, the strategy's rounding noise.
            losses, model = train_losses(case, init, make(1000 + s), s, args.lr)
            curves.append(losses)
            if label == "none" and exact_model is None:
                exact_model = model
            print(f"  {name} {label} seed {s}: last-10 loss {statistics.fmean(losses[-10:]):.4f} "
                  f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)  # fmt: skip
        rows.append({"model": name, "strategy": label, "seeds": args.seeds, "curves": curves,
                     "loss": [statistics.fmean(c[-10:]) for c in curves]})  # fmt: skip
    if exact_model is None:
        raise ValueError("the strategies must include 'none' (the exact reference)")
    for row, (label, make) in zip(rows, strategies):
        rep32, tally32 = bits(case, exact_model, make(1000), torch.float32)
        rep16, tally16 = bits(case, exact_model, make(1000), torch.bfloat16)
        bits32, ratio32 = _without_masks(rep32, tally32)
        row.update(
            bits_measured=rep32.bits_per_element,
            ratio32_measured=rep32.ratio,
            bits=bits32,
            ratio32=ratio32,
            ratio16=_without_masks(rep16, tally16)[1],
            passthrough=rep32.passthrough,
            dropout_noise=[tally32.elements, tally32.before, tally32.after],
        )
        if label != "none" and args.draws:
            rep = noise(case, exact_model, make(1000), args.draws)
            row.update(variance=rep.variance, bias=rep.bias_corrected,
                       layers={k: v[1] for k, v in rep.layers.items()})  # fmt: skip
    return rows


def table(rows: list[dict]) -> str:
    out = [
        "| model | strategy | last-10 loss | vs exact | bits/element | vs fp32 | vs bf16 | "
        "gradient variance | bits (every save, CPU) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    exact = {r["model"]: r["loss"] for r in rows if r["strategy"] == "none"}
    for r in rows:
        base = statistics.fmean(exact[r["model"]])
        loss = statistics.fmean(r["loss"]) if r["loss"] else math.nan
        if r["strategy"] == "none" and len(r["loss"]) > 1:
            spread = f"±{100 * statistics.stdev(r['loss']) / base:.2f}% (seeds)"
        else:
            spread = f"{100 * (loss / base - 1):+.2f}%" if r["loss"] else ""
        var = f"{r['variance']:.3f}" if "variance" in r else ""
        out.append(
            f"| {r['model']} | {r['strategy']} | {loss:.4f} | {spread} | {r['bits']:.2f} | "
            f"{r['ratio32']:.2f}x | {r['ratio16']:.2f}x | {var} | {r['bits_measured']:.2f} |"
        )
    return "\n".join(out)


class _MergedNorms(actpack.RowActNN):
    """Ablation: rows of normalization inputs share ranges like other short rows."""

    alone_ops = frozenset()


class _GroupedStats(actpack.RowActNN):
    """Ablation: per-row statistics (last dim 1, a Python RMSNorm's rsqrt) coded
    in ActNN's contiguous groups instead of kept exact."""

    def encode(self, x, info):
        if x.dim() >= 2 and x.shape[-1] == 1:
            return self.quantize(x, info, self.bits)
        return super().encode(x, info)


class _Every:
    def __contains__(self, op: object) -> bool:
        return True


class _RotateAll(actpack.RowActNN):
    """Ablation: Hadamard rotation of every row-coded tensor, not only matmul inputs."""

    rotate_ops = _Every()


def _division_2bit() -> actpack.Division:
    """Ablation: DIVISION with all its non-spatial inputs at 2 bits (no extra bit)."""
    division = actpack.Division()
    division._rows = actpack.RowActNN(bits=2, sensitive_bits=2, seed=division.seed + 2)
    return division


#: Strategies that have no registry name: the code before this benchmark and ablations.
EXTRA: dict[str, Callable[[], actpack.Strategy]] = {
    "division-tokens": lambda: actpack.Division(sequence="tokens"),  # blocks of 8 tokens
    "division-2bit": _division_2bit,
    "actnn-rows-2bit": lambda: actpack.RowActNN(sensitive_bits=2),  # no extra bit
    "actnn-rows-3bit": lambda: actpack.RowActNN(bits=3),  # 3 bits everywhere
    "actnn-rows-norot": lambda: actpack.RowActNN(rotate=None),
    "actnn-rows-merged-norms": _MergedNorms,
    "actnn-rows-grouped-stats": _GroupedStats,
    "actnn-rows-rotate-all": _RotateAll,
}


def named(name: str) -> Callable[[int], Any]:
    def make(seed: int) -> Any:
        strategy = EXTRA[name]() if name in EXTRA else actpack.resolve(name)
        state = strategy.state_dict()
        if "seed" in state:
            state["seed"] = seed
            strategy.load_state_dict(state)
        return strategy

    return make


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    default = ["none", "int8", "actnn", "division-tokens", "division", "actnn-rows"]
    p.add_argument("--strategies", nargs="+", default=default)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0, help="initial weights and batches")
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0, 1, 2],
        help="dropout masks and rounding noise; losses are averaged over them",
    )
    p.add_argument("--draws", type=int, default=8, help="gradient_noise draws (0: skip)")
    p.add_argument("--no-train", action="store_true",
                   help="train only 'none'; bits and gradient noise for the others")  # fmt: skip
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if "none" in args.strategies:
        args.strategies.remove("none")
    args.strategies.insert(0, "none")
    strategies = [(s, named(s)) for s in args.strategies]
    rows = []
    for name in args.models:
        rows += run_model(name, strategies, args)
        print(table([r for r in rows if r["model"] == name]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
