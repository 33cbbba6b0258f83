"""The `zoo` command: list, show, check (and its failures, line-numbered)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from zoo.catalog import parse
from zoo.cli import main
from zoo.scaffold import suggested_test_command

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


@pytest.mark.slow
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


# --- the contributor's gate refuses mistakes (issue 18, items 6 and 7) ---------------------------

def test_unknown_ids_are_errors_with_close_matches(capsys):
    assert main(["check", "cosfomer"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: no catalogue entry named 'cosfomer'") and "0 passed" not in err
    assert main(["check", "performr", "--schema-only"]) == 1
    assert "did you mean 'performer'" in capsys.readouterr().err
    assert main(["claims", "nosuch"]) == 1
    assert "no catalogue entry named 'nosuch'" in capsys.readouterr().err
    assert main(["claims", "linear-transformr"]) == 1
    assert "did you mean 'linear-transformer'" in capsys.readouterr().err


def test_check_runs_the_quick_claims_and_catches_a_false_linear_memory_claim(tmp_path, capsys):
    # softmax-attention builds the n x n score matrix; a card that claims linear memory must fail.
    text = (ROOT / "catalog.yaml").read_text()
    start = text.index("- id: softmax-attention")
    end = text.index("\n- id: ", start)
    block = text[start:end]
    assert "scaling: {time: 2, memory: 2}" in block
    false = tmp_path / "catalog.yaml"
    false.write_text(text[:start] + block.replace("scaling: {time: 2, memory: 2}",
                                                  "scaling: {time: 2, memory: 1}") + text[end:])
    assert main(["check", "softmax-attention", "--catalog", str(false)]) == 1
    out = capsys.readouterr().out
    assert "FAIL softmax-attention" in out and "memory grows as n^2.00" in out
    assert "declares n^1" in out
    # and the true card passes, so it is the false claim that fails
    assert main(["check", "softmax-attention"]) == 0
    assert "ok   softmax-attention" in capsys.readouterr().out


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """A scratch copy of what `zoo new` writes into: catalog.yaml, zoo/entries/, tests/entries/."""
    (tmp_path / "zoo" / "entries").mkdir(parents=True)
    (tmp_path / "tests" / "entries").mkdir(parents=True)
    (tmp_path / "catalog.yaml").write_text((ROOT / "catalog.yaml").read_text())
    monkeypatch.setattr("zoo.catalog.catalog_path", lambda: tmp_path / "catalog.yaml")
    return tmp_path


@pytest.mark.parametrize("bad, words", [
    ("sigmoid-attention\n", "kebab-case"),
    ("Sigmoid_Attention", "kebab-case"),
    ("sigmoid attention", "kebab-case"),
    ("sigmoid--attention", "kebab-case"),
    ("a" * 300, "at most 64 characters"),
], ids=["trailing-newline", "case-and-underscore", "space", "double-dash", "300-chars"])
def test_new_refuses_bad_ids(repo, capsys, bad, words):
    before = (repo / "catalog.yaml").read_text()
    assert main(["new", bad, "--title", "T"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and words in err and "Traceback" not in err
    assert (repo / "catalog.yaml").read_text() == before
    assert list((repo / "zoo" / "entries").iterdir()) == []


def test_new_escapes_the_title_so_the_yaml_parses(repo, capsys):
    title = r'Back\slash and "quotes": a \n that is not a newline'
    assert main(["new", "sigmoid-attention", "--title", title]) == 0
    out = capsys.readouterr().out
    records = parse((repo / "catalog.yaml").read_text())
    assert records[-1]["id"] == "sigmoid-attention" and records[-1]["title"] == title
    # the entry file is valid Python whose docstring starts with the title, unchanged
    source = (repo / "zoo" / "entries" / "sigmoid_attention.py").read_text()
    assert ast.get_docstring(ast.parse(source)).splitlines()[0] == title
    assert 'pytest -k "sigmoid_attention or sigmoid-attention"' in out


def test_new_suggests_a_test_command_that_selects_the_entry_own_tests():
    # `-k a -k b` keeps only the last -k; one expression must pick the entry's file (underscores)
    # and the catalogue-wide tests parametrised by its id (hyphens). Checked on a real entry.
    cmd = suggested_test_command("linear-transformer")
    expr = cmd.split("-k ", 1)[1].strip('"')
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:xdist",
                           "-k", expr, "tests/entries/test_linear_transformer.py",
                           "tests/test_contract.py"], cwd=ROOT, capture_output=True, text=True)
    ids = [line for line in proc.stdout.splitlines() if "::" in line]
    assert any(i.startswith("tests/entries/test_linear_transformer.py::") for i in ids), proc.stdout
    assert any("test_contract.py::" in i and "[linear-transformer" in i for i in ids), proc.stdout
    assert not any("[softmax-attention" in i for i in ids)
    assert suggested_test_command("performer") == 'pytest -k "performer"'


def test_show_and_pattern_give_one_line_for_an_entry_that_raises_on_import(tmp_path, monkeypatch,
                                                                           capsys):
    import zoo.entries

    broken = tmp_path / "linear_transformer.py"
    broken.write_text("import torch\n\nx = 1\nraise RuntimeError('planted: cannot import')\n")
    monkeypatch.setattr(zoo.entries, "__path__", [str(tmp_path), *zoo.entries.__path__])
    monkeypatch.delitem(sys.modules, "zoo.entries.linear_transformer", raising=False)
    monkeypatch.setattr("zoo.catalog.ENTRIES_DIR", tmp_path)
    for argv in (["show", "linear-transformer"], ["pattern", "linear-transformer"]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error:"), err
        assert f"{broken}:4:" in err and "RuntimeError: planted: cannot import" in err


def test_pattern_into_a_closed_pipe_prints_no_traceback():
    # far more than a pipe buffer (64 KiB), so the writes meet the closed pipe
    proc = subprocess.Popen([sys.executable, "-m", "zoo", "pattern", "linear-transformer", "--n", "300"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
