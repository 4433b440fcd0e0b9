"""`actpack report`: the table the README's main job prints."""

import re

import pytest

from actpack.tools.cli import main, report_rows


def test_report_prints_a_row_per_model_and_strategy(capsys):
    assert main(["report", "--models", "resnet:tiny", "gpt:tiny", "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| resnet") or "| gpt" in line]
    assert len(rows) == 2 * 7
    ratios = {r.split("|")[3].strip(): float(r.split("|")[6].strip()[:-1]) for r in rows[:7]}
    assert ratios["none"] == 1.0
    assert ratios["actnn"] > ratios["int8"] > ratios["bf16"] > 1.0
    # The default codes a CNN as actnn does (conv maps in ActNN's groups).
    assert ratios["actnn-rows"] > ratios["int8"]


def test_report_rows_bits_per_element_matches_ratio():
    (row,) = report_rows("resnet:tiny", 2, ["actnn"])
    # fp32 baseline: 32 bits per element, so ratio * bits/element == 32
    assert row["ratio"] * row["bits_per_element"] == pytest.approx(32.0)


def test_report_rejects_unknown_strategy(capsys):
    with pytest.raises(SystemExit):
        main(["report", "--strategies", "bogus"])
    assert re.search(r"argument --strategies: .*bogus", capsys.readouterr().err)
