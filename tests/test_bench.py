"""The benchmark harness: the JSON it writes, budgets recorded rather than fatal, exponents."""

import json

import pytest

from zoo.cli import main
from zoo.verify.bench import fitted_exponent, resolve_names, table_rows


def test_bench_writes_results_and_table(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "linear-transformer", "--n", "64", "128", "--dim", "32", "--heads", "2",
                 "--repeats", "1", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert {"platform", "torch", "threads", "date", "cpus"} <= set(data["machine"])
    assert set(data["results"]) == {"sdpa", "linear-transformer"}
    for r in data["results"].values():
        assert [p["n"] for p in r["points"]] == [64, 128]
        assert all(p["status"] == "ok" and p["time_s"] > 0 for p in r["points"])
        assert all(p["peak_bytes"] is not None and p["peak_bytes"] >= 0 for p in r["points"])
    printed = capsys.readouterr().out
    assert "linear-transformer" in printed and "ms @128" in printed and "time exp (decl.)" in printed


def test_over_budget_is_recorded_and_the_run_goes_on(tmp_path):
    out = tmp_path / "bench.json"
    assert main(["bench", "softmax-attention", "non-local", "--n", "64", "4096", "--dim", "32",
                 "--heads", "2", "--repeats", "1", "--max-mem", "0.001", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    for name in ("softmax-attention", "non-local"):
        first, second = data["results"][name]["points"]
        assert first["status"] == "ok"
        assert second["status"].startswith("over memory budget"), second


def test_fitted_exponent_uses_the_two_longest_measured_lengths():
    pts = [{"n": 100, "time_s": 1.0, "status": "ok"}, {"n": 200, "time_s": 4.0, "status": "ok"},
           {"n": 400, "time_s": 16.0, "status": "ok"}, {"n": 800, "status": "over time budget"}]
    assert fitted_exponent(pts, "time_s") == pytest.approx(2.0)
    assert fitted_exponent(pts[:1], "time_s") is None


def test_table_marks_budget_and_speedup():
    data = {"settings": {"ns": [8, 16]}, "results": {
        "sdpa": {"declared": {"time": 2, "memory": 2}, "fitted": {"time": 2.0, "memory": 2.0},
                 "points": [{"n": 8, "time_s": 0.004, "peak_bytes": 2**20, "status": "ok"},
                            {"n": 16, "time_s": 0.016, "peak_bytes": 2**22, "status": "ok"}]},
        "x": {"declared": {"time": 1, "memory": 1}, "fitted": {"time": None, "memory": None},
              "points": [{"n": 8, "time_s": 0.002, "peak_bytes": 2**20, "status": "ok"},
                         {"n": 16, "status": "over time budget (predicted 99 s)"}]}}}
    header, rows = table_rows(data)
    assert header[-1] == "x SDPA @16"
    assert rows[0][-1] == "1.0" and rows[1][2] == "over budget" and rows[1][-1] == "-"


def test_unknown_names_and_globs():
    assert "linear-transformer" in resolve_names(["linear-*"])
    with pytest.raises(LookupError):
        resolve_names(["no-such-*"])


def test_decode_bench_writes_results(tmp_path, capsys):
    """Tiny sizes only: the JSON is well formed, every point ran and records its state's size."""
    out = tmp_path / "decoding.json"
    assert main(["bench", "--decode", "linear-transformer", "--n", "16", "48",
                 "--dim", "32", "--heads", "2", "--repeats", "1", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["settings"]["decode"] is True
    assert set(data["results"]) == {"sdpa", "linear-transformer"}
    for name, r in data["results"].items():
        assert [p["n"] for p in r["points"]] == [16, 48]
        assert all(p["status"] == "ok" and p["time_s"] > 0 for p in r["points"]), r
        sizes = [p["state_bytes"] for p in r["points"]]
        # the baseline's KV cache holds 2 h d floats per earlier token; linear attention a fixed state
        if name == "linear-transformer":
            assert sizes[0] == sizes[1] > 0 and r["declared"] == {"time": 0, "memory": 0}
        else:
            assert sizes == [2 * 32 * n * 4 for n in (15, 47)], sizes
    assert "one decoding step" in capsys.readouterr().out


def test_decode_bench_refuses_what_cannot_decode(capsys):
    assert main(["bench", "--decode", "non-local", "--n", "16"]) == 1
    assert "not autoregressive: non-local" in capsys.readouterr().err
