"""The `zoo` command: list, show, check (and its failures, line-numbered)."""

import subprocess
import sys
from pathlib import Path

from zoo.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_list_filters(capsys):
    assert main(["list", "--autoregressive", "yes"]) == 0
    out = capsys.readouterr().out
    assert "linear-transformer" in out and "efficient-attention" not in out
    assert main(["list", "--family", "exact"]) == 0
    out = capsys.readouterr().out
    assert "softmax-attention" in out and "linear-transformer" not in out
    assert main(["list", "*local*"]) == 0
    assert "non-local" in capsys.readouterr().out


def test_show_prints_card_source_and_usage(capsys):
    assert main(["show", "efficient-attention"]) == 0
    out = capsys.readouterr().out
    assert "Efficient Attention: Attention with Linear Complexities" in out
    assert "zoo/entries/efficient_attention.py" in out
    assert 'zoo.create("efficient-attention", dim=64' in out


def test_show_unknown(capsys):
    assert main(["show", "performr"]) == 1
    assert "no catalogue entry named 'performr'" in capsys.readouterr().err


def test_check_passes_on_the_repository(capsys):
    assert main(["check"]) == 0
    assert " 0 failed" in capsys.readouterr().out


def test_check_fails_line_numbered(tmp_path, capsys):
    text = (ROOT / "catalog.yaml").read_text()
    first = text.index("- id: ")
    block = text[first:text.index("\n- id: ", first) + 1]
    bad = tmp_path / "dup.yaml"
    bad.write_text(text + "\n" + block)
    assert main(["check", "--catalog", str(bad)]) == 1
    err = capsys.readouterr().err
    dup_line = (text + "\n").count("\n") + 1
    assert f"dup.yaml:{dup_line}: duplicate id" in err
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text(text.replace("  venue: NeurIPS 2017\n", "  venue: NeurIPS 2017\n  wibble: 1\n",
                                    1))
    assert main(["check", "--catalog", str(unknown)]) == 1
    err = capsys.readouterr().err
    line = text[:text.index("  venue: NeurIPS 2017")].count("\n") + 2
    assert f"unknown.yaml:{line}: softmax-attention: unknown key 'wibble'" in err


def test_python_dash_m():
    out = subprocess.run([sys.executable, "-m", "zoo", "list"], capture_output=True, text=True,
                         check=True).stdout
    assert "softmax-attention" in out


def test_pattern_draws_the_causal_map_in_the_terminal(capsys, tmp_path):
    assert main(["pattern", "linear-transformer", "--causal", "--n", "6",
                 "--out", str(tmp_path / "p.png")]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines()[1:] if len(line) == 12]
    assert len(rows) == 6
    for i, row in enumerate(rows):  # nothing above the diagonal, something on it
        assert row[2 * (i + 1):].strip() == "" and row[2 * i] != " "
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["pattern", "efficient-attention", "--causal"]) == 1
    assert "not autoregressive" in capsys.readouterr().err


def test_progress_off_a_terminal_is_one_line_per_step(capsys):
    """In a log file (no terminal) long work still reports: the count, the label and the time."""
    from zoo.verify.progress import progress_bar

    with progress_bar(2, "benchmarking") as step:
        step("sdpa")
        step("performer")
    err = capsys.readouterr().err.splitlines()
    assert [line.split(",")[0] for line in err] == ["benchmarking: 1/2 done (sdpa)",
                                                    "benchmarking: 2/2 done (performer)"]
