"""Bad command-line input: argparse's one-line error and exit status 2, never a traceback.

Each case runs ``python -m actpack.tools.cli`` as a subprocess, as a user
would; they start together so that the imports of torch overlap.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import actpack
from actpack.tools import cli

SRC = str(Path(__file__).resolve().parents[1] / "src")

# The cases the issue reported, as a user meets them: subprocesses.
CASES = {
    "unknown model": (["report", "--models", "nosuch"], "unknown model 'nosuch'"),
    "unknown size": (["report", "--models", "resnet:huge"], "unknown size 'huge' for resnet"),
    "train batch 0": (["train", "--batch-size", "0"], "--batch-size: '0' is not a positive"),
    "train epochs 0": (["train", "--epochs", "0"], "--epochs: '0' is not a positive integer"),
    "report batch 0": (["report", "--batch-size", "0"], "--batch-size: '0' is not a positive"),
    "bench batch 0": (["bench", "--batch-size", "0"], "--batch-size: '0' is not a positive"),
}
if importlib.util.find_spec("torchvision") is None:
    CASES["torchvision missing"] = (
        ["bench", "--model", "torchvision:resnet50"],
        "torchvision:resnet50 needs torchvision, which is not installed: pip install torchvision",
    )
# The same path, in process (cheaper): argparse exits from inside cli.main.
IN_PROCESS = {
    "bench steps 0": (["bench", "--steps", "0"], "--steps: '0' is not a positive integer"),
    "bench warmup -1": (["bench", "--warmup", "-1"], "'-1' is not a non-negative integer"),
    "train size": (["train", "--size", "huge"], "unknown size 'huge' for resnet; choose from"),
    "bench size": (["bench", "--model", "gpt", "--size", "huge"], "unknown --size 'huge' for gpt"),
    "bench size, default model": (["bench", "--size", "gpt2"], "unknown --size 'gpt2' for resnet"),
    "empty size": (["report", "--models", "gpt:"], "empty size in 'gpt:'; write gpt or gpt:SIZE"),
    "empty size, bench": (["bench", "--model", "vit:"], "empty size in 'vit:'"),
    "train lr": (["train", "--lr", "0"], "--lr: '0' is not a positive number"),
    "train warmup": (["train", "--warmup", "1"], "--warmup: '1' is not a fraction in [0, 1)"),
    "bench size twice": (
        ["bench", "--model", "resnet:tiny", "--size", "small"],
        "--size is for a built-in model given without a size",
    ),
    "hf type": (["report", "--models", "hf:nosuch"], "transformers has no model type 'nosuch'"),
    "hf size": (["report", "--models", "hf:gpt2:huge"], "unknown size 'huge' for hf:gpt2"),
    "hf head": (["report", "--models", "hf:t5"], "no causal-LM, masked-LM or image-class"),
    "empty spec": (["report", "--models", "hf:"], "'hf:' names no model"),
    "device": (["report", "--device", "gpu"], "'gpu' is not a torch device"),
    # Outputs that cannot be written (a folder that is a file) and a width the
    # model cannot take fail before any training or data lookup, not after.
    "train json": (["train", "--json", f"{__file__}/x.json", "--data", "/nonexistent"],
                   f"--json {__file__}/x.json: cannot write there"),
    "bench json": (["bench", "--json", f"{__file__}/x.json"], "--json"),
    "train width": (["train", "--model", "vit", "--width", "7", "--data", "/nonexistent"],
                    "--width 7: dim (7) must be divisible by heads (4)"),
    "bench meta": (["bench", "--device", "meta"], "run on cpu or cuda, not meta"),
    "report meta": (["report", "--device", "meta"], "run on cpu or cuda, not meta"),
}  # fmt: skip
if importlib.util.find_spec("matplotlib") is not None:
    IN_PROCESS["train plot"] = (
        ["train", "--plot", f"{__file__}/x.png", "--data", "/nonexistent"],
        f"--plot {__file__}/x.png: cannot write there",
    )
if not torch.cuda.is_available():
    IN_PROCESS["no cuda"] = (["report", "--device", "cuda"], "CUDA is not available here")


@pytest.fixture(scope="module")
def results() -> dict[str, subprocess.CompletedProcess]:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "actpack.tools.cli", *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for name, (argv, _) in CASES.items()
    }
    done = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        done[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return done


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_argparse_error(results, case: str) -> None:
    argv, message = CASES[case]
    proc = results[case]
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""  # no table of zeros, nothing started
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, proc.stderr
    assert errors[0].startswith(f"actpack {argv[0]}: error: ")
    assert message in errors[0]
    assert proc.stderr.startswith(f"usage: actpack {argv[0]}")


@pytest.mark.parametrize("case", list(IN_PROCESS))
def test_bad_input_in_process(capsys, case: str) -> None:
    argv, message = IN_PROCESS[case]
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    errors = [line for line in captured.err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith(f"actpack {argv[0]}: error: ")
    assert message in errors[0], errors[0]


@pytest.mark.parametrize(
    "exc",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB"),
        RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 5 bytes"),
        RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 5 bytes"),
    ],
)
def test_out_of_memory_is_one_error_line(monkeypatch, capsys, exc) -> None:
    def run_out(args):
        raise exc

    parser, commands = cli.build_parser()
    monkeypatch.setattr(
        cli, "build_parser", lambda: (parser, commands)
    )  # the same parsers, whose report command runs out of memory
    commands["report"].set_defaults(func=run_out)
    assert cli.main(["report"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("actpack report: error: out of memory (")
    assert "use a smaller --batch-size" in err


def test_other_runtime_errors_are_not_taken_for_out_of_memory(monkeypatch) -> None:
    parser, commands = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: (parser, commands))

    def broken(args):
        raise RuntimeError("shape mismatch")

    commands["report"].set_defaults(func=broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        cli.main(["report"])


def test_plot_without_matplotlib_fails_before_training(monkeypatch, capsys, tmp_path) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails, find_spec says absent
    with pytest.raises(SystemExit) as exc:
        # --data points nowhere: the error must come before the data is even looked for
        cli.main(["train", "--plot", str(tmp_path / "x.png"), "--data", str(tmp_path / "none")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--plot needs matplotlib, which is not installed: pip install 'actpack[cli]'" in err
    assert "Fashion-MNIST" not in err


@pytest.mark.parametrize("command", ["report", "train", "bench"])
def test_help_is_plain_text_with_defaults(capsys, command: str) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main([command, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for markup in ("``", ":func:", ":class:", "::"):
        assert markup not in text, markup
    description = text.split("\n\n")[1]
    assert description.strip() and not description.startswith("options:")
    assert "--batch-size BATCH_SIZE" in text
    defaults = {"report": "(default: 8)", "train": "(default: 128)", "bench": "(default: 32)"}
    assert defaults[command] in " ".join(text.split())
    assert "(default: None)" not in text and "(default: False)" not in text
    if command == "bench":
        assert "seed of the weights and inputs (default: 0)" in " ".join(text.split())


@pytest.mark.parametrize("command", ["report", "bench", "train"])
def test_strategy_names_are_read_as_the_api_reads_them(command) -> None:
    # report took only the exact registry spelling (argparse choices) where
    # compress(), bench and train accept any case.
    parser = cli.build_parser()[0]
    args = parser.parse_args([command, "--strategies", "ACTNN", "Division"])
    assert [actpack.resolve(s).name for s in args.strategies] == ["actnn", "division"]
    with pytest.raises(SystemExit):
        parser.parse_args([command, "--strategies", "actnm"])


@pytest.mark.parametrize(
    ("command", "option", "spellings"),
    [
        ("report", "--dtype", {"bfloat16": ["bf16", "BFloat16"], "float16": ["fp16", "half"],
                               "fp32": ["float32"]}),
        ("bench", "--autocast", {"bfloat16": ["bf16"], "float16": ["fp16", "half"]}),
        ("train", "--autocast", {"bfloat16": ["bf16"], "float16": ["fp16"]}),
    ],
)  # fmt: skip
def test_dtypes_take_every_usual_spelling(capsys, command, option, spellings) -> None:
    # Each command spelled bfloat16 its own way (report bfloat16, bench bf16,
    # train bfloat16) and rejected the others'.
    parser = cli.build_parser()[0]
    for canonical, others in spellings.items():
        for text in [canonical, *others]:
            value = getattr(parser.parse_args([command, option, text]), option[2:])
            assert value == ([canonical] if option == "--dtype" else canonical), text
    with pytest.raises(SystemExit):
        parser.parse_args([command, option, "bf17"])
    assert "invalid choice: 'bf17'" in capsys.readouterr().err


def test_bench_and_train_document_autocast_alike(capsys) -> None:
    # bench listed {none,bf16,fp16} and train {none,bfloat16,float16}.
    parser = cli.build_parser()[0]
    shown = {}
    for command in ("bench", "train"):
        with pytest.raises(SystemExit):
            parser.parse_args([command, "--autocast", "bf17"])
        err = capsys.readouterr().err
        shown[command] = err[err.index("invalid choice") :]
        with pytest.raises(SystemExit):
            parser.parse_args([command, "--help"])
        assert "--autocast {none,bfloat16,float16}" in capsys.readouterr().out
    assert shown["bench"] == shown["train"]
    assert "'none', 'bfloat16', 'float16'" in shown["bench"]
