"""`zoo quality` end to end on a few steps: the loss falls, the JSON is well formed and resumes,
the same seed gives the same accuracy, and bad input gets a clear error."""

import json

import pytest

import zoo
from zoo.cli import main
from zoo.verify import quality
from zoo.verify.quality import Job, Recipe

QUICK = Recipe(batch=16, max_steps=30, eval_every=15, test_examples=64, lrs=(1e-2,))


@pytest.mark.parametrize("attention", ["softmax-attention", "linear-transformer"])
def test_a_few_steps_on_the_smoke_cell_lower_the_loss(attention):
    out = quality.train(Job(attention, "smoke", 1e-2), QUICK)
    assert out.status == "ok" and out.steps == 30
    assert out.final_loss < out.first_loss - 0.3, (out.first_loss, out.final_loss)
    assert 0.0 <= out.accuracy <= 1.0 and [s for s, _ in out.curve] == [15, 30]
    assert 0 < out.cpu_seconds <= out.seconds * 1.5  # one torch thread: CPU time about wall time


def test_the_same_seed_gives_the_same_accuracy():
    a = quality.train(Job("linear-transformer", "smoke", 1e-2), QUICK)
    b = quality.train(Job("linear-transformer", "smoke", 1e-2), QUICK)
    assert (a.accuracy, a.final_loss, a.curve) == (b.accuracy, b.final_loss, b.curve)


def test_results_file_is_well_formed_and_a_second_run_resumes(tmp_path, monkeypatch):
    path = tmp_path / "quality.json"
    quality.run(["softmax-attention"], cells=["smoke"], out=path, recipe=QUICK)
    data = json.loads(path.read_text())
    assert data["task"] == "mqar" and data["recipe"] == QUICK.key()
    assert set(data["runs"]) == {"softmax-attention|smoke|0.01"}
    run = data["runs"]["softmax-attention|smoke|0.01"]
    assert {"accuracy", "lr", "steps", "seconds", "status", "curve", "date", "budget"} <= set(run)
    assert data["machine"]["cpus"] >= 1 and data["cells"]["smoke"]["pairs"] == 4
    summary = quality.summary(data)
    assert summary["softmax-attention"]["smoke"]["accuracy"] == run["accuracy"]

    trained = []
    real = quality.train
    monkeypatch.setattr(quality, "train", lambda job, recipe, **kw: trained.append(job) or real(
        job, recipe, **kw))
    quality.run(["softmax-attention", "linear-transformer"], cells=["smoke"], out=path,
                recipe=QUICK)
    assert [j.attention for j in trained] == ["linear-transformer"]  # the stored job is skipped
    merged = json.loads(path.read_text())
    assert set(merged["runs"]) == {"softmax-attention|smoke|0.01", "linear-transformer|smoke|0.01"}
    assert merged["runs"]["softmax-attention|smoke|0.01"] == run


def test_a_file_from_other_settings_is_not_mixed_in(tmp_path):
    path = tmp_path / "quality.json"
    quality.run(["softmax-attention"], cells=["smoke"], out=path, recipe=QUICK)
    with pytest.raises(ValueError, match="other settings"):
        quality.run(["softmax-attention"], cells=["smoke"], out=path,
                    recipe=Recipe(batch=8, max_steps=30, lrs=(1e-2,)))


def test_an_entry_that_cannot_be_built_is_recorded_not_fatal():
    out = quality.train(Job("softmax-attention", "smoke", 1e-2), QUICK, overrides={"nosuch": 1})
    assert out.status.startswith("could not build: TypeError") and out.accuracy == 0.0


@pytest.mark.slow
def test_local_processes_give_the_same_results_as_one_process():
    tiny = Recipe(batch=8, max_steps=8, eval_every=8, test_examples=32, lrs=(3e-3, 1e-2))
    one = quality.run(["linear-transformer"], cells=["smoke"], recipe=tiny)
    two = quality.run(["linear-transformer"], cells=["smoke"], recipe=tiny, jobs=2)
    strip = lambda d: {k: (r["accuracy"], r["final_loss"]) for k, r in d["runs"].items()}  # noqa: E731
    assert strip(one) == strip(two)


@pytest.mark.parametrize("argv, message", [
    (["quality", "performr", "--cells", "smoke"], "did you mean 'performer'"),
    (["quality", "performer", "--cells", "smok"], "no recall cell named 'smok'"),
])
def test_cli_errors_name_the_problem(argv, message, capsys):
    assert main(argv) == 1
    assert message in capsys.readouterr().err


def test_a_cell_whose_budget_changed_is_trained_again(tmp_path, monkeypatch):
    path = tmp_path / "quality.json"
    quality.run(["linear-transformer"], cells=["smoke"], out=path, recipe=QUICK)
    monkeypatch.setitem(quality.STEPS, "smoke", 20)
    data = quality.run(["linear-transformer"], cells=["smoke"], out=path, recipe=QUICK)
    assert data["runs"]["linear-transformer|smoke|0.01"]["steps"] == 20
    assert data["steps"]["smoke"] == 20


@pytest.mark.slow
def test_jobs_handed_to_a_ray_cluster_come_back_into_the_same_json(tmp_path):
    """A local Ray instance started and stopped by the test; the jobs run on its workers and
    their results land in the same JSON as a local run's."""
    ray = pytest.importorskip("ray", reason="the optional ray extra is not installed")
    import tempfile

    # Ray's socket paths must stay under 107 bytes: a short folder of its own under /tmp
    temp_dir = tempfile.mkdtemp(prefix="zr", dir="/tmp")
    ray.init(num_cpus=1, include_dashboard=False, _temp_dir=temp_dir, _node_ip_address="127.0.0.1",
             log_to_driver=False)
    try:
        tiny = Recipe(batch=8, max_steps=8, eval_every=8, test_examples=32, lrs=(3e-3, 1e-2))
        path = tmp_path / "quality.json"
        data = quality.run(["linear-transformer"], cells=["smoke"], out=path, recipe=tiny,
                           ray_address="local")
        local = quality.run(["linear-transformer"], cells=["smoke"], recipe=tiny)
        assert set(data["runs"]) == set(local["runs"]) == {"linear-transformer|smoke|0.003",
                                                           "linear-transformer|smoke|0.01"}
        for k, r in local["runs"].items():
            assert data["runs"][k]["accuracy"] == r["accuracy"]
            assert data["runs"][k]["final_loss"] == r["final_loss"]
        assert json.loads(path.read_text())["machine"]["jobs"] == "ray local"
    finally:
        ray.shutdown()
        import shutil

        shutil.rmtree(temp_dir, ignore_errors=True)


def test_a_cell_settled_by_one_learning_rate_skips_the_others(tmp_path, monkeypatch):
    """Rates go largest first; once one reaches the stop accuracy the smaller ones are not run,
    and a rate that falls short leaves the next one to be tried."""
    trained = []

    def fake(job, recipe, **kw):
        trained.append((job.attention, job.lr))
        acc = 1.0 if job.attention == "softmax-attention" else 0.5
        return quality.Outcome(job.attention, job.cell, job.lr, acc, 10, 0.1, 1.0, 2.0)

    monkeypatch.setattr(quality, "train", fake)
    recipe = Recipe(batch=16, max_steps=30, eval_every=15, test_examples=64, lrs=(3e-3, 1e-2))
    path = tmp_path / "quality.json"
    quality.run(["softmax-attention", "linear-transformer"], cells=["smoke"], out=path,
                recipe=recipe)
    assert trained == [("softmax-attention", 1e-2), ("linear-transformer", 1e-2),
                       ("linear-transformer", 3e-3)]
    assert set(json.loads(path.read_text())["runs"]) == {
        "softmax-attention|smoke|0.01", "linear-transformer|smoke|0.01",
        "linear-transformer|smoke|0.003"}
    assert quality.settled(Job("softmax-attention", "smoke", 3e-3), quality.load_results(
        path, recipe)["runs"])


def test_the_committed_results_are_consistent():
    """benchmarks/quality.json, as `make quality` writes it: today's recipe and budgets, keys that
    match their runs, known entries and cells, curves that end at the recorded accuracy, and a run
    that stopped before its budget only because it reached the stop accuracy."""
    from pathlib import Path

    import zoo
    from zoo.tasks import CELLS

    data = json.loads((Path(__file__).resolve().parents[1] / "benchmarks" / "quality.json").read_text())
    assert data["recipe"] == Recipe().key() and data["steps"] == quality.STEPS
    assert data["runs"], "no runs committed"
    for key, run in data["runs"].items():
        assert key == Job(run["attention"], run["cell"], run["lr"]).key
        assert run["attention"] in zoo.names() and run["cell"] in CELLS
        assert run["lr"] in Recipe().lrs and run["budget"] == quality.STEPS[run["cell"]]
        assert 0 <= run["steps"] <= run["budget"] and 0.0 <= run["accuracy"] <= 1.0
        if run["status"] == "ok":
            assert run["curve"] and run["curve"][-1] == [run["steps"], round(run["accuracy"], 4)], key
            if run["steps"] < run["budget"]:
                assert run["accuracy"] >= quality.STOP_AT, key


def test_harder_cells_train_the_entries_that_did_best_in_the_cell_before_first():
    def run(name, cell, acc, lr=0.01, status="ok"):
        return {"attention": name, "cell": cell, "lr": lr, "accuracy": acc, "status": status}

    runs = {"a": run("linformer", "n64-p4", 0.25), "b": run("performer", "n64-p4", 0.98),
            "c": run("linformer", "n64-p4", 0.3, lr=0.003),
            "d": run("sac", "n64-p4", 0.9, status="failed")}
    names = ["linformer", "performer", "sac", "softmax-attention"]
    todo = quality.prioritised(quality.jobs_for(names, ["n64-p4", "n128-p8"], Recipe()), runs)
    assert [j.attention for j in todo[:8]] == [n for n in names for _ in (0, 1)]  # unchanged order
    assert [(j.attention, j.lr) for j in todo[8:]] == [
        ("performer", 0.01), ("performer", 0.003),  # 0.98 before
        ("sac", 0.01), ("sac", 0.003),  # a failed run says nothing: 0.5, in list order
        ("softmax-attention", 0.01), ("softmax-attention", 0.003),  # not run before: 0.5
        ("linformer", 0.003), ("linformer", 0.01)]  # its best before, 0.3 at 0.003, is last


def test_after_the_full_sweep_an_entry_keeps_the_rate_its_cell_before_chose():
    """From n128-p8 on: the rate that did best in the cell before is trained first; the others
    are trained only for an entry that reached the stop accuracy there (the harder cell may want
    another rate) and are otherwise skipped; n64-p4 and the smoke cell are swept in full."""
    def run(name, cell, acc, lr):
        return {"attention": name, "cell": cell, "lr": lr, "accuracy": acc, "status": "ok"}

    runs = {str(i): r for i, r in enumerate([
        run("linformer", "n64-p4", 0.25, 0.01), run("linformer", "n64-p4", 0.3, 0.003),
        run("performer", "n64-p4", 0.995, 0.01), run("performer", "n64-p4", 0.97, 0.003),
        run("linformer", "smoke", 0.2, 0.01), run("linformer", "n128-p8", 0.2, 0.003)])}
    skip = {(n, c, lr) for n in ("linformer", "performer", "softmax-attention")
            for c in ("smoke", "n64-p4", "n128-p8", "n256-p16") for lr in (0.01, 0.003)
            if quality.transferred(Job(n, c, lr), runs)}
    assert skip == {("linformer", "n128-p8", 0.01), ("linformer", "n256-p16", 0.01)}
    assert not quality.skipped(Job("performer", "n128-p8", 0.003), runs)  # reached 0.99 before
    runs["p"] = run("performer", "n128-p8", 0.991, 0.01)
    assert quality.skipped(Job("performer", "n128-p8", 0.003), runs)  # now settled


def test_the_pool_keeps_an_entrys_rates_apart_so_the_first_can_decide_the_second():
    q = [Job("a", "n128-p8", 0.01), Job("a", "n128-p8", 0.003), Job("b", "n128-p8", 0.01)]
    assert quality.next_ready(q, []) == q[0]
    assert quality.next_ready(q[1:], [q[0]]) == q[2]  # a's second rate waits for its first
    assert quality.next_ready(q[1:2], [q[0]]) is None
    assert quality.next_ready(q[1:2], [q[2]]) == q[1]


def test_every_committed_entry_learns_at_least_which_tokens_answer():
    """A run whose loss never falls below the context-free prior is a training defect (sac and
    smart-bird's exploding surrogate gradients), unless the entry's notes explain it."""
    from pathlib import Path

    data = json.loads((Path(__file__).resolve().parents[1] / "benchmarks" / "quality.json").read_text())
    assert quality.untrained(data) == []


def test_the_prior_check_flags_a_mixer_that_stops_training():
    import math

    cells = {"n64-p4": {"vocab": 1024}}

    def run(name, loss, status="ok"):
        return {"attention": name, "cell": "n64-p4", "lr": 0.01, "final_loss": loss, "status": status}

    prior = math.log(512)
    data = {"runs": {"a": run("softmax-attention", 0.01), "b": run("linear-transformer", prior + 0.5),
                     "c": run("linear-transformer", prior + 0.1), "d": run("performer", math.nan,
                                                                           "diverged (NaN loss)"),
                     "e": run("performer", prior - 0.01), "f": run("sac", math.inf)}}
    assert quality.untrained(data, cells) == ["linear-transformer|n64-p4", "sac|n64-p4"]


def test_the_quality_page_shows_the_ordering_from_the_data():
    from zoo.site.quality import ordering_section

    def run(name, cell, acc):
        return {"attention": name, "cell": cell, "lr": 0.01, "accuracy": acc, "steps": 10,
                "seconds": 1.0, "status": "ok"}

    data = {"cells": {"smoke": {"pairs": 4}, "n64-p4": {"pairs": 4}, "n128-p8": {"pairs": 8}},
            "runs": {f"{n}|{c}": run(n, c, a) for n, c, a in [
                ("softmax-attention", "n64-p4", 0.996), ("linear-transformer", "n64-p4", 0.9),
                ("softmax-attention", "n128-p8", 0.991), ("performer", "n128-p8", 0.5)]}}
    lines = ordering_section(quality.summary(data), data)
    rows = [x for x in lines if x.startswith("| `n")]
    assert rows == ["| `n64-p4` | 4 | 1.00 | 0.90 | - | +0.10 |",
                    "| `n128-p8` | 8 | 0.99 | - | 0.50 | +0.49 |"]


def test_a_run_still_climbing_at_its_budget_is_marked_on_the_page():
    """still_rising by hand-built curves, and the Quality table's arrow on the run it flags."""
    from zoo.site.quality import quality_page

    flat = [[s, 0.23] for s in range(100, 1600, 100)]
    climbing = [[s, 0.23] for s in range(100, 1100, 100)] + [[1100, 0.3], [1500, 0.4]]
    assert not quality.still_rising(flat) and not quality.still_rising([])
    assert quality.still_rising(climbing)
    assert not quality.still_rising(climbing[:-1] + [[1500, 0.995]])  # done, not climbing
    assert not quality.still_rising([[100, 0.5]])  # one evaluation: too short to say
    run = {"attention": "linear-transformer", "cell": "smoke", "lr": 0.01, "accuracy": 0.4,
           "steps": 1500, "seconds": 1.0, "status": "ok", "curve": climbing}
    data = {"recipe": {**QUICK.key(), "dim": 64, "depth": 2, "heads": 2, "conv": 4},
            "machine": {}, "steps": {"smoke": 1500},
            "cells": {"smoke": {"n": 64, "pairs": 4, "vocab": 256}},
            "runs": {"linear-transformer|smoke|0.01": run,
                     "softmax-attention|smoke|0.01": {**run, "attention": "softmax-attention",
                                                      "accuracy": 0.23, "curve": flat}}}
    entries = [zoo.entry("linear-transformer"), zoo.entry("softmax-attention")]
    rows = {line.split("|")[1].strip(): line for line in quality_page(entries, data, None).split("\n")
            if line.startswith("| [`")}
    assert "0.40 ↑" in rows["[`linear-transformer`](entries/linear-transformer.md)"]
    assert "↑" not in rows["[`softmax-attention`](entries/softmax-attention.md)"]
