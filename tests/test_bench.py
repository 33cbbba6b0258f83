"""The benchmark harness: the JSON it writes, the environments its workers saw, budgets recorded
rather than fatal, exponents, fraction of peak, the projection bound, and the targets missed."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from zoo.cli import main
from zoo.site.pages import benchmarks_page
from zoo.verify import bench
from zoo.verify.bench import (
    MEMORY_VARS,
    TUNED_VARS,
    caching_allocator,
    fitted_exponent,
    fraction_of_peak,
    projection_bound,
    resolve_names,
    table_rows,
    target_misses,
)


@pytest.mark.slow
def test_bench_writes_results_and_table(tmp_path, capsys, monkeypatch):
    # an allocator setting in the parent's environment must not reach the plain worker
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    out = tmp_path / "bench.json"
    assert main(["bench", "linear-transformer", "--n", "64", "128", "--dim", "32", "--heads", "2",
                 "--repeats", "1", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert {"platform", "torch", "threads", "date", "cpus"} <= set(data["machine"])
    assert data["machine"]["matmul"]["flops_per_s"] > 0
    assert set(data["results"]) == {"sdpa", "linear-transformer"}
    preload = caching_allocator()
    allocators = ["tuned"] + ([preload[0]] if preload else [])
    assert data["settings"]["allocators"] == allocators
    assert data["settings"]["passes"] == ["forward", "forward+backward"]
    for r in data["results"].values():
        assert [p["n"] for p in r["points"]] == [64, 128]
        for p in r["points"]:
            for key in ["time_s", "time_fb_s"] + [f"time{fb}_{a}_s" for a in allocators
                                                  for fb in ("", "_fb")]:
                assert p[key] > 0, (key, p)
            assert p["status"] == p["status_fb"] == "ok"
            assert p["peak_bytes"] >= 0 and p["peak_fb_bytes"] >= 0
            assert p["flops"] > 0
    # forward + backward does more work than forward: at least its FLOPs' worth (not timed)
    envs = data["settings"]["environments"]
    seen = {label: envs[label]["seen"]["variables"] for label in envs}
    assert not any(k.startswith("MALLOC_") or k == "LD_PRELOAD" for k in seen["plain"]), seen
    assert {k: v for k, v in seen["tuned"].items() if k.startswith("MALLOC_")} == TUNED_VARS
    assert {k: v for k, v in seen["memory"].items() if k.startswith("MALLOC_")} == MEMORY_VARS
    assert "MALLOC_ARENA_MAX" in data["settings"]["removed_from_plain"]
    assert envs["plain"]["seen"]["allocators_loaded"] == []
    if preload:  # the preloaded allocator was really loaded into that worker, and only there
        assert envs[preload[0]]["seen"]["allocators_loaded"] == [preload[0]]
        assert "MALLOC_" not in "".join(seen[preload[0]])
    printed = capsys.readouterr().out
    assert "linear-transformer" in printed and "ms @128" in printed and "time exp (decl.)" in printed
    assert "ms fwd+bwd @128" in printed and "tuned ms @128" in printed


@pytest.mark.slow
def test_over_budget_is_recorded_and_the_run_goes_on(tmp_path):
    out = tmp_path / "bench.json"
    assert main(["bench", "softmax-attention", "non-local", "--n", "64", "4096", "--dim", "32",
                 "--heads", "2", "--repeats", "1", "--max-mem", "0.001", "--allocators",
                 "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["settings"]["allocators"] == []
    for name in ("softmax-attention", "non-local"):
        first, second = data["results"][name]["points"]
        assert first["status"] == "ok" and first["status_fb"] == "ok"
        assert second["status"].startswith("over memory budget"), second
        assert second["status_fb"].startswith("over memory budget"), second
        assert second["time_s"] is None and second["time_fb_s"] is None


def test_memory_budget_uses_the_growth_measured_in_the_same_pass():
    # flash-attention as measured: forward + backward peaks 112 MB at n = 1024 and 1.68 GB at 4096
    # (autograd keeps every tile); the catalogue's memory exponent, 1, is the forward pass's. From
    # the declared exponent alone 16384 was predicted at 6.7 GB, under 8 GiB, and the worker was
    # killed for memory; with the measured growth (1.96) it is predicted over and skipped.
    spec = {"time_exp": 2, "mem_exp": 1, "repeats": 0, "dim": 256, "max_time": 60, "max_mem": 8 * 2**30}
    before = {"n": 1024, "status": "ok", "time_s": 0.4, "peak_bytes": 111935488}
    prev = {"n": 4096, "status": "ok", "time_s": 2.0, "peak_bytes": 1684860928}
    assert bench._budget(prev, 16384, spec) is None  # the declared exponent alone
    assert bench._budget(prev, 16384, spec, before).startswith("over memory budget")
    # growth slower than declared never lowers the prediction below the declared exponent's
    spec_quad = {**spec, "mem_exp": 2, "max_mem": 2**30}
    flat = {**before, "peak_bytes": prev["peak_bytes"]}
    assert bench._budget({**prev, "peak_bytes": 2**27}, 16384, spec_quad, flat).startswith("over")
    assert bench._budget({**prev, "peak_bytes": 2**25}, 16384, spec_quad, flat) is None


def test_a_worker_killed_in_one_pass_keeps_the_passes_it_reported(monkeypatch):
    # each pass is its own line: a worker killed in forward + backward at n = 128 keeps that
    # length's forward point and the flops line, and the killed pass says why
    ok = {"n": 128, "status": "ok", "time_s": 0.1, "peak_bytes": 10}
    lines = [{"seen": {}}, {"n": 64, "forward": {**ok, "n": 64}}, {"n": 64, "fb": {**ok, "n": 64}},
             {"n": 64, "flops": 7}, {"n": 128, "forward": ok}, {"n": 128, "flops": 9}]
    monkeypatch.setattr(bench, "_worker_lines", lambda *a: (lines, "worker exited with -9"))
    out, _ = bench._run_worker("x", {"ns": [64, 128], "modes": ["forward", "fb"]}, 1, {})
    assert [p["forward"]["status"] for p in out] == ["ok", "ok"]
    assert [p["fb"]["status"] for p in out] == ["ok", "worker exited with -9"]
    assert [p["flops"] for p in out] == [7, 9]


def test_update_replaces_the_named_entries_and_records_the_rerun(tmp_path, capsys):
    settings = {"ns": [64], "dim": 32, "heads": 2, "backward": True, "repeats": 1, "device": "cpu",
                "threads": 2, "decode": False, "allocators": []}
    sdpa_old, sdpa_new = {"points": [{"n": 64, "time_s": 1.0}]}, {"points": [{"n": 64, "time_s": 2.0}]}
    old = {"machine": {"date": "2026-12-01T00:00:00+00:00"}, "settings": dict(settings),
           "results": {"sdpa": sdpa_old, "a": {"points": ["old a"]}, "b": {"points": ["old b"]}}}
    new = {"machine": {"date": "2026-12-03T00:00:00+00:00", "matmul": {"flops_per_s": 2e11}},
           "settings": dict(settings), "results": {"sdpa": sdpa_new, "a": {"points": ["new a"]}}}
    got = bench.update(old, new, ["a"], "killed for memory before the budget fix")
    assert got["results"]["a"] == {"points": ["new a"]} and got["results"]["b"] == {"points": ["old b"]}
    assert got["results"]["sdpa"] == sdpa_old  # one baseline for the table
    (rerun,) = got["settings"]["reruns"]
    assert rerun["ids"] == ["a"] and rerun["date"].startswith("2026-12-03")
    assert rerun["baseline"] == sdpa_new and "budget fix" in rerun["reason"]
    assert old["results"]["a"] == {"points": ["old a"]}  # the input is not changed
    with pytest.raises(ValueError, match=r"dim \(64 against 32\)"):
        bench.update(old, {**new, "settings": {**settings, "dim": 64}}, ["a"], "why")
    with pytest.raises(ValueError, match="--reason"):
        bench.update(old, new, ["a"], " ")
    # the CLI refuses before measuring anything: no file, no ids, no reason
    assert main(["bench", "a", "--update", "--out", str(tmp_path / "none.json")]) == 1
    (tmp_path / "r.json").write_text(json.dumps(old))
    assert main(["bench", "--update", "--out", str(tmp_path / "r.json")]) == 1
    assert main(["bench", "linear-transformer", "--update", "--out", str(tmp_path / "r.json")]) == 1
    err = capsys.readouterr().err
    assert "existing --out file" in err and "needs --reason" in err
    # on the page, with the committed results: which entries, when, why
    committed = json.loads((Path(__file__).resolve().parents[1] / "benchmarks/results.json").read_text())
    again = json.loads(json.dumps(committed))
    again["machine"]["date"] = "2031-01-02T03:04:05+00:00"
    page = benchmarks_page([], bench.update(committed, again, ["performer"], "a planted reason"))
    assert "Measured again on 2031-01-02: performer" in page and "a planted reason" in page
    assert "Measured again" not in benchmarks_page([], committed) or committed["settings"].get("reruns")


def test_fitted_exponent_uses_the_two_longest_measured_lengths():
    pts = [{"n": 100, "time_s": 1.0, "status": "ok"}, {"n": 200, "time_s": 4.0, "status": "ok"},
           {"n": 400, "time_s": 16.0, "status": "ok"}, {"n": 800, "status": "over time budget"}]
    assert fitted_exponent(pts, "time_s") == pytest.approx(2.0)
    assert fitted_exponent(pts[:1], "time_s") is None


def _point(n, fwd, fb, flops=None, status="ok"):
    ok = status == "ok"
    return {"n": n, "time_s": fwd if ok else None, "time_fb_s": fb if ok else None,
            "time_tuned_s": fwd / 2 if ok else None, "time_fb_tuned_s": fb / 2 if ok else None,
            "status": status, "status_fb": status, "status_tuned": status, "status_fb_tuned": status,
            "peak_bytes": 2**20 if ok else None, "peak_fb_bytes": 2**21 if ok else None,
            "flops": flops}


def _data():
    """dim 256, n 16384, matmul at 1e11 FLOP/s; SDPA at 1.718 s forward, 5.154 s fwd+bwd."""
    def result(decl, *points):
        return {"declared": {"time": decl, "memory": decl}, "fitted": {"time": None, "memory": None},
                "points": list(points)}
    return {"machine": {"matmul": {"flops_per_s": 1e11, "size": 2048, "threads": 2}},
            "settings": {"ns": [4096, 16384], "dim": 256, "heads": 4, "backward": True,
                         "allocators": ["tuned"]},
            "results": {
                "sdpa": result(2, _point(4096, 0.1, 0.3), _point(16384, 1.718, 5.154)),
                # 20x forward, 10x fwd+bwd: meets both
                "lin-ok": result(1, _point(16384, 0.0859, 0.5154)),
                # 12x forward, 5x fwd+bwd: misses the training target only
                "lin-slow-fb": result(1, _point(16384, 0.14317, 1.0308)),
                # a kernel entry, 20x and 10x, but 3e9 FLOPs in 0.0859 s = 0.349 of 1e11
                "kern": result(1, _point(16384, 0.0859, 0.5154, flops=3e9)),
                # quadratic: no speed target; 2e9 FLOPs in 0.004 s at 1e11 = 5.0
                "quad": result(2, _point(16384, 1.0, 3.0, flops=2e9)),
                "lin-over": result(1, _point(16384, 0, 0, status="over time budget (predicted 99 s)")),
            }}


def test_fraction_of_peak_by_hand():
    data = _data()
    assert fraction_of_peak(data, "kern", 16384) == pytest.approx(3e9 / 0.0859 / 1e11)
    assert fraction_of_peak(data, "quad", 16384) == pytest.approx(0.02)
    assert fraction_of_peak(data, "lin-ok", 16384) is None  # no FLOPs counted
    assert fraction_of_peak(data, "lin-over", 16384) is None  # not measured
    del data["machine"]["matmul"]
    assert fraction_of_peak(data, "kern", 16384) is None


def test_projection_bound_by_hand():
    b = projection_bound(_data())
    # 4 * 16384 * 256^2 multiply-adds = 8.59e9 FLOPs = 0.0859 s at 1e11 FLOP/s
    assert b["flops"] == 8 * 16384 * 256 * 256 and b["seconds"] == pytest.approx(0.08589934592)
    assert b["forward"] == pytest.approx(1.718 / 0.08589934592)
    assert b["fb"] == pytest.approx(5.154 / (3 * 0.08589934592))


def test_target_misses_and_the_page_lists_them():
    data = _data()
    misses = {(m["id"], m["target"].split()[-1]) for m in target_misses(data, ["kern"])}
    assert misses == {("lin-slow-fb", "forward+backward"), ("kern", "forward"),
                      ("lin-over", "forward"), ("lin-over", "forward+backward")}
    by = {(m["id"], m["target"]): m["measured"] for m in target_misses(data, ["kern"])}
    assert by[("lin-slow-fb", ">= 8x SDPA forward+backward")] == pytest.approx(5.0, rel=1e-3)
    assert by[("kern", ">= 0.5 of the matmul rate forward")] == pytest.approx(0.349, rel=1e-2)
    assert by[("lin-over", ">= 10x SDPA forward")] is None
    entries = [SimpleNamespace(id=i, kernel=i == "kern", family="kernel") for i in data["results"]]
    page = benchmarks_page(entries, {**data, "machine": {
        **data["machine"], "processor": "x86_64", "cpus": 2, "platform": "Linux", "torch": "2.13",
        "python": "3.11", "threads": 2, "date": "2026-12-03T10:00:00+00:00"}, "settings": {
        **data["settings"], "repeats": 5, "passes": ["forward", "forward+backward"],
        "environments": {"plain": {"label": "plain", "set": {}},
                         "tuned": {"label": "glibc tuned", "set": TUNED_VARS}}}})
    targets = page.split("## Targets")[1].split("##")[0]
    assert "`lin-slow-fb` | >= 8x SDPA forward+backward | 5.0x" in targets
    assert "`kern` | >= 0.5 of the matmul rate forward | 0.35" in targets
    assert "`lin-over` | >= 10x SDPA forward | not measured" in targets
    assert "lin-ok" not in targets and "quad" not in targets
    assert "at most 20.0x in the forward pass, and 20.0x in forward + backward" in page
    assert "## Forward + backward" in page and "2026-12-03" in page and "MALLOC_MMAP_MAX_=0" in page


def test_table_marks_budget_and_speedup():
    header, rows = table_rows(_data())
    assert header[-2:] == ["x SDPA @16384", "of peak @16384"] and "tuned ms @16384" in header
    rows = {r[0]: r for r in rows}
    assert rows["sdpa"][-2] == "1.0" and rows["lin-ok"][-2] == "20.0" and rows["kern"][-1] == "0.35"
    assert rows["lin-over"][2] == "over budget" and rows["lin-over"][-2] == "-"
    header, rows = table_rows(_data(), "fb")
    rows = {r[0]: r for r in rows}
    assert header[-1] == "x SDPA fwd+bwd @16384" and rows["lin-slow-fb"][-1] == "5.0"
    assert rows["lin-ok"][2] == "515.4" and rows["lin-ok"][3] == "257.7"  # plain, then tuned


def test_unknown_names_and_globs():
    assert "linear-transformer" in resolve_names(["linear-*"])
    with pytest.raises(LookupError):
        resolve_names(["no-such-*"])


@pytest.mark.slow
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
        assert all(p["status_decode"] == "ok" and p["time_decode_s"] > 0 for p in r["points"]), r
        sizes = [p["state_bytes"] for p in r["points"]]
        # the baseline's KV cache holds 2 h d floats per earlier token; linear attention a fixed state
        if name == "linear-transformer":
            assert sizes[0] == sizes[1] > 0 and r["declared"] == {"time": 0, "memory": 0}
        else:
            assert sizes == [2 * 32 * n * 4 for n in (15, 47)], sizes
    assert "one decoding step" in capsys.readouterr().out
    from zoo.site.pages import _bench_decoding

    page = "\n".join(_bench_decoding(data))
    assert "state MiB @48" in page and "| linear-transformer |" in page and "| sdpa |" in page


def test_decode_bench_refuses_what_cannot_decode(capsys):
    assert main(["bench", "--decode", "non-local", "--n", "16"]) == 1
    assert "not autoregressive: non-local" in capsys.readouterr().err


def test_public_table_shows_both_passes_and_failures():
    from zoo.site.pages import _bench_public

    machine = {"processor": "x86_64", "cpus": 2, "torch": "2.13.0", "date": "2026-12-03T00:00:00"}
    rows = [{"entry": "bigbird", "n": 4096, "settings": "s", "ours_s": 0.1, "public_s": 0.2,
             "ratio": 2.0, "ours_fb_s": 0.3, "public_fb_s": 0.3, "ratio_fb": 1.0},
            {"entry": "reformer", "n": 4096, "settings": "s", "ours_s": 0.2, "public_s": 0.1,
             "ratio": 0.5, "error_fb": "ValueError: no"}]
    page = "\n".join(_bench_public({"machine": machine, "threads": 2, "environment": "plain", "rows": rows}))
    assert "| `bigbird` | 4096 | s | 100.0 | 200.0 | 2.00 | 300.0 | 300.0 | 1.00 |" in page
    assert "| `reformer` | 4096 | s | 200.0 | 100.0 | 0.50 | failed: ValueError |  |  |" in page
    old = [{"entry": "linformer", "n": 4096, "settings": "s", "ours_s": 0.1, "public_s": 0.1, "ratio": 1.0}]
    assert "| `linformer` | 4096 | s | 100.0 | 100.0 | 1.00 | - |  |  |" in "\n".join(
        _bench_public({"machine": machine, "rows": old}))
