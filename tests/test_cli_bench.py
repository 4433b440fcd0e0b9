"""``actpack bench`` on CPU, and its checkpointing and batch-search helpers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from actpack.tools import bench, cli
from actpack.tools.models import build_model, loss_for


def test_bench_cpu_table_and_json(tmp_path: Path, capsys) -> None:
    out = tmp_path / "bench.json"
    args = [
        "bench", "--model", "resnet", "--size", "tiny", "--batch-size", "4", "--device", "cpu",
        "--strategies", "actnn", "bf16", "--steps", "2", "--json", str(out),
    ]  # fmt: skip
    assert cli.main(args) == 0
    table = capsys.readouterr().out
    assert "| variant | saved for backward | vs fp32 | time/step | vs none |" in table
    assert "n/a (CPU)" in table and "n/a (GPU only)" in table

    payload = json.loads(out.read_text())
    rows = {r["name"]: r for r in payload["rows"]}
    assert list(rows) == ["none", "actnn", "bf16", "autocast-bf16", "checkpoint", "save_on_cpu"]
    for name in ("none", "actnn", "bf16", "autocast-bf16", "checkpoint"):
        r = rows[name]
        assert r["saved_bytes"] > 0, name
        assert r["time_per_step_s"] > 0 and len(r["times_s"]) == 2, name
        assert r["peak_bytes"] == "n/a (CPU)" and r["max_batch"] == "n/a (GPU only)", name
    none = rows["none"]
    assert none["ratio_vs_fp32"] == pytest.approx(1.0)
    assert none["time_vs_none"] == pytest.approx(1.0)
    assert rows["actnn"]["ratio_vs_fp32"] > 4
    assert 1.5 < rows["bf16"]["ratio_vs_fp32"] <= 2.0
    assert rows["autocast-bf16"]["saved_bytes"] < none["saved_bytes"]
    assert rows["checkpoint"]["saved_bytes"] < none["saved_bytes"]
    assert rows["save_on_cpu"]["saved_bytes"] is None  # no-op on CPU
    assert rows["save_on_cpu"]["time_per_step_s"] is None
    assert payload["environment"]["device"] == "cpu"
    assert payload["environment"]["torch_threads"] == 1  # the default: comparable timings
    assert payload["config"]["label"] == "resnet-tiny"
    for name in ("none", "actnn", "bf16", "autocast-bf16", "checkpoint"):
        times = rows[name]["times_s"]
        assert rows[name]["time_spread"] == pytest.approx(bench.spread(times))


def test_reference_row_is_plain_pytorch(monkeypatch, tmp_path: Path) -> None:
    """The ``none`` row, which every step time is divided by, runs without
    actpack's hooks (timed under ``compress("none")`` it carried the engine's
    own host cost into every ratio); the strategy rows run under them, each
    in its own engine, and the ``none`` row's bytes are still counted."""
    seen: dict[str, object] = {}
    top = torch._C._autograd._top_saved_tensors_default_hooks
    real_step = bench._step

    def step(model, inputs, loss_fn, v):
        with v.step_ctx(), v.forward_ctx():
            seen[v.name] = top(False)
        real_step(model, inputs, loss_fn, v)

    monkeypatch.setattr(bench, "_step", step)
    out = tmp_path / "bench.json"
    argv = ["bench", "--model", "gpt:tiny", "--batch-size", "2", "--strategies", "actnn",
            "int8", "--alternatives", "checkpoint", "--steps", "1", "--warmup", "0",
            "--quiet", "--json", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    payload = json.loads(out.read_text())
    assert seen["none"] is None and seen["checkpoint"] is None
    assert seen["actnn"] is not None and seen["int8"] is not None
    assert seen["actnn"] != seen["int8"]  # one engine per row
    rows = {r["name"]: r for r in payload["rows"]}
    assert rows["none"]["kind"] == "reference" and "plain PyTorch" in rows["none"]["note"]
    assert rows["none"]["saved_bytes"] == rows["none"]["baseline_bytes"] > 0
    assert rows["none"]["time_vs_none"] == pytest.approx(1.0)


@pytest.mark.parametrize("name", ["resnet", "gpt", "vit"])
def test_checkpointed_matches_plain_and_restores(name: str) -> None:
    torch.manual_seed(0)
    model, make_inputs = build_model(name, "tiny")
    model.eval()  # no BatchNorm statistics drift between the two passes
    inputs = make_inputs(2)
    loss_fn = loss_for(name)
    (container,) = bench.block_containers(model)
    assert container is getattr(model, "stages" if name == "resnet" else "blocks")
    keys = list(model.state_dict())

    def grads() -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        loss = loss_fn(model(*inputs), inputs)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    loss_plain, g_plain = grads()
    with bench.checkpointed(model) as blocks:
        assert len(blocks) == len(container)
        assert all("forward" in b.__dict__ for b in blocks)
        loss_ckpt, g_ckpt = grads()
    assert all("forward" not in b.__dict__ for b in container.children())
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(loss_ckpt, loss_plain)
    for a, b in zip(g_ckpt, g_plain):
        torch.testing.assert_close(a, b)


def test_largest_batch_search() -> None:
    calls: list[int] = []

    def fits(b: int) -> bool:
        calls.append(b)
        return b <= 1000

    batch, capped = bench.largest_batch(fits, start=8, limit=1 << 14, tolerance=0)
    assert (batch, capped) == (1000, False)
    assert len(calls) < 30
    assert bench.largest_batch(lambda b: True, start=8, limit=64) == (64, True)
    assert bench.largest_batch(lambda b: b <= 5, start=8, limit=64) == (5, False)
    assert bench.largest_batch(lambda b: False, start=8, limit=64) == (0, False)
    batch, _ = bench.largest_batch(lambda b: b <= 1000, start=8, limit=1 << 14)
    assert 1000 * (1 - 1 / 32) <= batch <= 1000


def test_spread_ignores_one_outlier_round() -> None:
    assert bench.spread([1.0, 1.0, 1.0, 1.0, 2.0]) == 0.0
    assert bench.spread([1.0, 1.1, 0.9, 1.2, 0.8]) == pytest.approx(0.1)


def _row(name: str, kind: str, vs_none: float, spread: float) -> dict:
    return {"name": name, "kind": kind, "time_vs_none": vs_none, "time_spread": spread}


def test_timing_warnings() -> None:
    quiet = [
        _row("none", "actpack", 1.0, 0.01),
        _row("fp16", "actpack", 1.3, 0.02),
        _row("autocast-bf16", "alternative", 0.6, 0.01),  # may well be faster: no warning
        {"name": "save_on_cpu", "kind": "alternative", "time_vs_none": None, "time_spread": None},
    ]
    assert bench.timing_warnings(quiet) == []
    # what a busy machine gave: fp16 and checkpoint "faster" than doing nothing
    busy = quiet + [_row("checkpoint", "alternative", 0.8, 0.03)]
    busy[1] = _row("fp16", "actpack", 0.9, 0.02)
    lines = bench.timing_warnings(busy)
    assert "fp16 0.90x, checkpoint 0.80x" in lines[0] and len(lines) == 2
    noisy = quiet[:1] + [_row("int8", "actpack", 1.5, 0.12)]
    lines = bench.timing_warnings(noisy)
    assert "int8 12%" in lines[0] and "rerun" in lines[-1]


def test_compiles_while_timing_are_warned_of() -> None:
    quiet = [_row("none", "actpack", 1.0, 0.01), _row("actnn", "actpack", 1.3, 0.02)]
    lines = bench.timing_warnings(quiet, compiled=2)
    assert len(lines) == 1 and "2 timed step(s) compiled" in lines[0]
    assert "raise --warmup" in lines[0]


@pytest.mark.parametrize(
    ("compiling_steps", "steps", "compiled_while_timing"),
    [(0, 3, 0), (1, 3, 0), (3, 5, 0), (99, 13, 2)],
)
def test_timed_steps_that_compile_are_timed_again(
    monkeypatch, tmp_path: Path, compiling_steps: int, steps: int, compiled_while_timing: int
) -> None:
    """Mixed precision compiles codec configurations after its first steps
    (the bit widths it picks): a timed step compiled, and its row read 151x
    "slower".  Here the first ``compiling_steps`` steps compile (a fake
    count; one warm-up step, two timed rounds of one row): a timed step that
    compiled is timed again, at most MAX_RETIMES times, and one that still
    compiles is counted."""
    calls = {"steps": 0, "compiles": 0}
    step = bench._step

    def counted(*args, **kwargs):
        calls["steps"] += 1
        if calls["steps"] <= compiling_steps:
            calls["compiles"] += 1
        return step(*args, **kwargs)

    monkeypatch.setattr(bench, "_step", counted)
    monkeypatch.setattr(bench, "compile_count", lambda: calls["compiles"])
    out = tmp_path / "bench.json"
    argv = ["bench", "--model", "gpt:tiny", "--batch-size", "2", "--strategies", "none",
            "--alternatives", "--steps", "2", "--warmup", "1", "--quiet",
            "--json", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    payload = json.loads(out.read_text())
    assert bench.MAX_RETIMES == 5
    assert calls["steps"] == steps
    assert payload["compiled_while_timing"] == compiled_while_timing
    assert len(payload["rows"][0]["times_s"]) == 2


def test_bench_prints_its_warnings(monkeypatch, capsys) -> None:
    monkeypatch.setattr(bench, "timing_warnings", lambda rows, compiled=0: ["timings are off"])
    argv = ["bench", "--model", "gpt:tiny", "--batch-size", "2", "--strategies", "none",
            "--alternatives", "--steps", "1", "--warmup", "0"]  # fmt: skip
    assert cli.main(argv) == 0
    assert "actpack bench: warning: timings are off" in capsys.readouterr().err


def test_bench_under_autocast(tmp_path: Path, capsys) -> None:
    """--autocast bf16: every row's forward and byte count under CPU autocast,
    against the none row under the same autocast; the autocast-only row is dropped."""
    out = tmp_path / "bench.json"
    plain = tmp_path / "plain.json"
    common = [
        "bench", "--model", "gpt", "--size", "tiny", "--batch-size", "2", "--device", "cpu",
        "--strategies", "actnn", "--alternatives", "autocast-bf16", "checkpoint", "--steps", "1",
        "--warmup", "0", "--quiet",
    ]  # fmt: skip
    assert cli.main([*common, "--autocast", "bf16", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "every row under bf16 autocast" in table
    assert "| variant | saved for backward | vs none |" in table
    assert cli.main([*common, "--json", str(plain)]) == 0
    rows = {r["name"]: r for r in json.loads(out.read_text())["rows"]}
    fp32 = {r["name"]: r for r in json.loads(plain.read_text())["rows"]}
    assert list(rows) == ["none", "actnn", "checkpoint"]
    # The none row under autocast holds what the autocast-only row held without it.
    assert rows["none"]["saved_bytes"] == fp32["autocast-bf16"]["saved_bytes"]
    assert rows["none"]["ratio_vs_fp32"] == pytest.approx(1.0)
    assert rows["actnn"]["saved_bytes"] < rows["none"]["saved_bytes"] / 2
    assert all("bf16 autocast" in rows[n]["note"] for n in rows)


@pytest.mark.parametrize(
    "message,fits",
    [
        ("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`", False),
        ("cuDNN error: CUDNN_STATUS_ALLOC_FAILED", False),
        ("Triton Error [CUDA]: out of memory", False),
        ("CUDA error: an illegal memory access was encountered", None),
    ],
)
def test_batch_trial_reads_library_allocation_failures_as_out_of_memory(
    monkeypatch, message: str, fits: bool | None
) -> None:
    """A full GPU reported by cuBLAS/cuDNN/Triton ends the trial like an
    OutOfMemoryError; any other RuntimeError propagates (a real fault)."""
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)

    def trial(batch: int) -> None:
        raise RuntimeError(message)

    if fits is None:
        with pytest.raises(RuntimeError, match="illegal memory access"):
            bench._fits(trial, 8, torch.device("cpu"))
    else:
        assert bench._fits(trial, 8, torch.device("cpu")) is fits
    assert bench._fits(lambda b: None, 8, torch.device("cpu")) is True
