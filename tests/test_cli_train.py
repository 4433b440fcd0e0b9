"""``actpack train`` end to end on a tiny Fashion-MNIST subset, and the IDX loader."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from actpack.tools import cli
from actpack.tools.data import (
    FILES,
    DatasetMissingError,
    find_data_dir,
    load_fashion_mnist,
    read_idx,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SRC = str(Path(__file__).resolve().parents[1] / "src")


def _dataset_or_skip() -> None:
    try:
        find_data_dir()
    except DatasetMissingError:
        pytest.skip(
            "Fashion-MNIST not installed "
            "(apt-get update && apt-get install -y dataset-fashion-mnist)"
        )


def _write_idx(path: Path, data: torch.Tensor) -> None:
    header = bytes([0, 0, 0x08, data.dim()])
    header += b"".join(int(n).to_bytes(4, "big") for n in data.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + data.to(torch.uint8).numpy().tobytes())


def test_read_idx_and_loader_on_synthetic_files(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    images = {
        "train": torch.randint(0, 256, (12, 28, 28), generator=g),
        "t10k": torch.randint(0, 256, (7, 28, 28), generator=g),
    }
    labels = {"train": torch.arange(12) % 10, "t10k": torch.arange(7) % 10}
    for split in ("train", "t10k"):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", images[split])
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", labels[split])
    raw = read_idx(tmp_path / "train-images-idx3-ubyte.gz")
    assert raw.dtype == torch.uint8 and raw.shape == (12, 28, 28)
    assert torch.equal(raw.long(), images["train"])

    tx, ty, vx, vy = load_fashion_mnist(tmp_path)
    assert tx.shape == (12, 1, 28, 28) and tx.dtype == torch.float32
    assert ty.dtype == torch.int64 and torch.equal(ty, labels["train"])
    assert vx.shape == (7, 1, 28, 28) and torch.equal(vy, labels["t10k"])
    tx, ty, vx, vy = load_fashion_mnist(tmp_path, subset=10)
    assert len(tx) == 10 and len(vx) == 2  # subset // 5 test samples


def test_missing_data_dir_gives_install_hint(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "no-such-dir"
    with pytest.raises(DatasetMissingError) as err:
        load_fashion_mnist(missing)
    assert isinstance(err.value, FileNotFoundError)
    assert "apt-get install -y dataset-fashion-mnist" in str(err.value)

    rc = cli.main(["train", "--data", str(missing), "--quiet"])
    assert rc != 0
    assert "apt-get install -y dataset-fashion-mnist" in capsys.readouterr().err


def test_missing_data_exit_code_subprocess(tmp_path: Path) -> None:
    (tmp_path / FILES["train_images"]).write_bytes(b"")  # incomplete directory
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-m", "actpack.tools.cli", "train", "--data", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "apt-get update && apt-get install -y dataset-fashion-mnist" in proc.stderr
    assert "--data DIR" in proc.stderr


def test_unknown_strategy_is_rejected(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--strategies", "none", "no-such-strategy"])
    assert exc.value.code == 2
    assert "no-such-strategy" in capsys.readouterr().err


@pytest.fixture(scope="module")
def resnet_run(tmp_path_factory) -> tuple[dict, Path]:
    _dataset_or_skip()
    out = tmp_path_factory.mktemp("train")
    args = [
        "train", "--model", "resnet", "--size", "tiny", "--width", "8",
        "--subset", "256", "--epochs", "1", "--batch-size", "64",
        "--strategies", "none", "actnn", "--seeds", "0", "1",
        "--json", str(out / "run.json"), "--plot", str(out / "run.png"), "--quiet",
    ]  # fmt: skip
    assert cli.main(args) == 0
    return json.loads((out / "run.json").read_text()), out / "run.png"


def test_train_writes_json_with_every_figure(resnet_run) -> None:
    payload, _ = resnet_run
    assert payload["command"] == "train"
    cfg = payload["config"]
    assert cfg["model"] == "resnet" and cfg["strategies"] == ["none", "actnn"]
    assert cfg["train_samples"] == 256 and cfg["test_samples"] == 51
    env = payload["environment"]
    for key in ("date", "torch", "python", "platform", "cpu_count", "device"):
        assert key in env
    assert env["torch"] == torch.__version__

    assert [(r["strategy"], r["seed"]) for r in payload["runs"]] == [
        ("none", 0), ("actnn", 0), ("none", 1), ("actnn", 1),
    ]  # fmt: skip
    for run in payload["runs"]:
        assert len(run["epochs"]) == 1
        ep = run["epochs"][0]
        for key in ("train_loss", "test_loss", "test_acc", "time_per_step_s", "epoch_time_s"):
            assert isinstance(ep[key], float), key
        assert ep["steps"] == 4
        assert 0.0 <= ep["test_acc"] <= 100.0
        assert ep["peak_bytes"] is None  # CPU
        saved = ep["saved"]
        assert saved["baseline_bytes"] > 0 and saved["compressed_bytes"] > 0
        assert saved["ratio"] == pytest.approx(saved["baseline_bytes"] / saved["compressed_bytes"])
        correct = run["test_correct"]  # per test image, for paired deltas
        assert len(correct) == 51 and set(correct) <= {"0", "1"}
        assert 100 * correct.count("1") / 51 == pytest.approx(run["final_test_acc"])
    by_name = {row["strategy"]: row for row in payload["summary"]}
    assert set(by_name) == {"none", "actnn"}
    accs = {name: by_name[name]["test_acc_mean"] for name in by_name}
    assert by_name["actnn"]["acc_delta_vs_none"] == pytest.approx(accs["actnn"] - accs["none"])
    assert by_name["actnn"]["acc_delta_se"] > 0
    assert by_name["none"]["ratio"] == pytest.approx(1.0)
    assert by_name["actnn"]["ratio"] > 4
    assert by_name["none"]["time_vs_none"] == pytest.approx(1.0)
    assert by_name["actnn"]["seeds"] == [0, 1] and len(by_name["actnn"]["test_accs"]) == 2


def test_train_writes_png(resnet_run) -> None:
    _, png = resnet_run
    data = png.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 1000


def test_strategies_share_weights_and_data_order(resnet_run) -> None:
    """Same seed: identical initial weights and batches, so the first loss is identical
    (compression only changes what backward sees); another seed differs."""
    runs = {(r["strategy"], r["seed"]): r for r in resnet_run[0]["runs"]}
    for seed in (0, 1):
        exact, packed = runs["none", seed], runs["actnn", seed]
        assert exact["init_checksum"] == packed["init_checksum"]
        assert exact["data_order_head"] == packed["data_order_head"]
        assert exact["first_losses"][0] == packed["first_losses"][0]
    assert runs["none", 0]["init_checksum"] != runs["none", 1]["init_checksum"]
    assert runs["none", 0]["data_order_head"] != runs["none", 1]["data_order_head"]
    assert runs["none", 0]["first_losses"][0] != runs["none", 1]["first_losses"][0]


def test_train_vit_tiny(tmp_path: Path, capsys) -> None:
    _dataset_or_skip()
    out = tmp_path / "vit.json"
    args = [
        "train", "--model", "vit", "--size", "tiny", "--subset", "128", "--epochs", "1",
        "--batch-size", "64", "--strategies", "none", "division",
        "--json", str(out),
    ]  # fmt: skip
    assert cli.main(args) == 0
    text = capsys.readouterr().out
    assert "[division seed 0] epoch 1/1" in text
    assert "| strategy | test acc (mean ± std) |" in text
    payload = json.loads(out.read_text())
    assert payload["config"]["optimizer"] == "adamw"
    runs = payload["runs"]
    assert runs[0]["first_losses"][0] == runs[1]["first_losses"][0]
    assert runs[1]["saved"]["ratio"] > 2


def test_one_step_runs_time_no_compiling_step(tmp_path: Path, capsys) -> None:
    """A run's first step compiles the codecs (seconds): it is never timed.
    One step per epoch: the first epoch times none (shown "n/a"), later
    epochs time theirs.  A strategy named twice (in any case) runs once."""
    _dataset_or_skip()
    out = tmp_path / "one.json"
    base = [
        "train", "--model", "resnet", "--size", "tiny", "--width", "8", "--subset", "64",
        "--batch-size", "64", "--strategies", "none", "actnn", "ACTNN", "none",
    ]  # fmt: skip
    assert cli.main([*base, "--epochs", "1", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    payload = json.loads(out.read_text())
    assert payload["config"]["strategies"] == ["none", "actnn"]
    assert [r["strategy"] for r in payload["runs"]] == ["none", "actnn"]
    for run in payload["runs"]:
        assert run["epochs"][0]["steps"] == 1 and run["epochs"][0]["time_per_step_s"] is None
    assert all(row["time_vs_none"] is None for row in payload["summary"])
    assert "n/a (1 step)" in text
    assert cli.main([*base, "--epochs", "2", "--json", str(out), "--quiet"]) == 0
    for run in json.loads(out.read_text())["runs"]:
        first, second = run["epochs"]
        assert first["time_per_step_s"] is None and isinstance(second["time_per_step_s"], float)
        assert run["time_per_step_s"] == second["time_per_step_s"]
