"""`zoo quality`: what each entry learns, measured by multi-query associative recall (MQAR).

Every entry is trained, inside the same small model (`zoo.models.SequenceModel`), on every cell of
the grid in `zoo.tasks.CELLS`, with the same recipe:

- the model: width 64, 2 blocks, 2 heads where the entry has heads, no MLP (as Zoology's recall
  models), a short causal convolution (kernel 4) before every mixer (Zoology's Based recipe, the
  same for every entry), causal entries causal and the others bidirectional, every other
  hyper-parameter the layer's default;
- training: AdamW (weight decay 0.1), a linear warm-up then a cosine schedule, fresh batches drawn
  from a seeded generator at every step, the output head computed at the query positions only;
- the best of a small learning-rate sweep, each run stopped early once its test accuracy reaches
  0.99 (as Zoology does); the rates are tried largest first, and once one of them reaches 0.99 in
  a cell the smaller ones are not trained there (none could beat it), which halves the cost of the
  mechanisms that learn a cell; after the n64-p4 cell, which is swept in full, an entry starts at
  the rate that did best for it in the cell before, and one that fell short there is not retried
  at the others (`transferred`), which halves the cost of the mechanisms that do not;
- accuracy on a fixed test set (its own seed), over the query positions.

The grid is a set of independent jobs (entry x cell x learning rate). They run in this process,
in `--jobs N` local processes, or on a Ray cluster (`--ray ADDRESS`, the optional `ray` extra). The
results file is written after every finished job, so an interrupted run loses at most the jobs in
flight, and a later run skips what the file already holds (same settings) and merges the rest.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from zoo.tasks import CELLS, Cell, mqar

SCHEMA_VERSION = 1
STOP_AT = 0.99


@dataclass(frozen=True)
class Recipe:
    """The training settings shared by every job of a run (part of the results file)."""

    dim: int = 64
    depth: int = 2
    heads: int = 2
    conv: int = 4
    batch: int = 64
    max_steps: int | None = None  # caps every cell's budget (quick trials and tests)
    warmup: float = 0.1
    weight_decay: float = 0.1
    lrs: tuple[float, ...] = (3e-3, 1e-2)
    eval_every: int = 100
    test_examples: int = 512
    seed: int = 0
    threads: int = 1

    def key(self) -> dict:
        """The settings a stored result must match to be reused (everything but threads)."""
        d = asdict(self)
        d.pop("threads")
        d["lrs"] = list(self.lrs)
        return d


# Per-cell step budgets: longer sequences with more pairs take longer to learn.
STEPS = {"smoke": 600, "n64-p4": 1500, "n128-p8": 2500, "n256-p16": 3000, "n256-p32": 4000}


@dataclass(frozen=True)
class Job:
    attention: str
    cell: str
    lr: float

    @property
    def key(self) -> str:
        return f"{self.attention}|{self.cell}|{self.lr:g}"


@dataclass
class Outcome:
    """What one job measured."""

    attention: str
    cell: str
    lr: float
    accuracy: float
    steps: int
    seconds: float
    final_loss: float
    first_loss: float = math.nan
    status: str = "ok"
    curve: list = field(default_factory=list)  # (step, test accuracy) at every evaluation
    # CPU time of the training process (one thread): unlike `seconds` (wall time) it does not grow
    # when the job shares the cores or is paused, so it is the figure to compare entries' costs by.
    cpu_seconds: float = math.nan


def steps_for(cell: str, recipe: Recipe) -> int:
    steps = STEPS[cell]
    return steps if recipe.max_steps is None else min(steps, recipe.max_steps)


def build_model(attention: str, cell: Cell, recipe: Recipe, overrides: dict | None = None):
    from zoo.models import SequenceModel

    return SequenceModel(attention, vocab=cell.vocab, dim=recipe.dim, depth=recipe.depth,
                         heads=recipe.heads, max_len=cell.n, conv=recipe.conv, **(overrides or {}))


def accuracy(model, test, chunk: int = 128) -> float:
    """Fraction of query positions whose argmax logit is the paired value."""
    model.eval()
    right = total = 0
    with torch.no_grad():
        for i in range(0, test.tokens.shape[0], chunk):
            tokens, targets = test.tokens[i:i + chunk], test.targets[i:i + chunk]
            at = targets != -100
            pred = model(tokens, at=at).argmax(-1)
            right += int((pred == targets[at]).sum())
            total += int(at.sum())
    model.train()
    return right / max(total, 1)


def train(job: Job, recipe: Recipe, *, on_step: Callable[[int], None] | None = None,
          overrides: dict | None = None) -> Outcome:
    """Train one model on one cell at one learning rate; deterministic for a given recipe."""
    cpu_start = time.process_time()
    out = _train(job, recipe, on_step=on_step, overrides=overrides)
    out.cpu_seconds = time.process_time() - cpu_start
    return out


def _train(job: Job, recipe: Recipe, *, on_step: Callable[[int], None] | None,
           overrides: dict | None) -> Outcome:
    torch.set_num_threads(recipe.threads)
    cell = CELLS[job.cell]
    steps = steps_for(job.cell, recipe)
    torch.manual_seed(recipe.seed)
    start = time.perf_counter()
    try:
        model = build_model(job.attention, cell, recipe, overrides)
    except Exception as err:  # noqa: BLE001 - recorded, so one entry cannot stop the grid
        return Outcome(job.attention, job.cell, job.lr, 0.0, 0, 0.0, math.nan,
                       status=f"could not build: {type(err).__name__}: {err}"[:300])
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=job.lr, weight_decay=recipe.weight_decay)
    warm = max(int(recipe.warmup * steps), 1)

    def schedule(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(steps - warm, 1)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    test = mqar(recipe.test_examples, n=cell.n, pairs=cell.pairs, vocab=cell.vocab,
                seed=10_000_019 + recipe.seed)
    curve: list[list[float]] = []
    best, loss_value, first_loss, step = 0.0, math.nan, math.nan, 0
    try:
        for step in range(1, steps + 1):
            batch = mqar(recipe.batch, n=cell.n, pairs=cell.pairs, vocab=cell.vocab,
                         seed=recipe.seed * 1_000_003 + step)
            at = batch.queries
            logits = model(batch.tokens, at=at)
            loss = torch.nn.functional.cross_entropy(logits, batch.targets[at])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            loss_value = float(loss.detach())
            if step == 1:
                first_loss = loss_value
            if not math.isfinite(loss_value):
                return Outcome(job.attention, job.cell, job.lr, best, step,
                               time.perf_counter() - start, loss_value, status="diverged (NaN loss)",
                               curve=curve)
            if on_step is not None:
                on_step(1)
            if step % recipe.eval_every == 0 or step == steps:
                acc = accuracy(model, test)
                curve.append([step, round(acc, 4)])
                best = max(best, acc)
                if acc >= STOP_AT:
                    if on_step is not None:
                        on_step(steps - step)
                    break
    except Exception as err:  # noqa: BLE001 - recorded with the reason
        return Outcome(job.attention, job.cell, job.lr, best, step, time.perf_counter() - start,
                       loss_value, status=f"failed: {type(err).__name__}: {err}"[:300], curve=curve)
    final = curve[-1][1] if curve else 0.0
    return Outcome(job.attention, job.cell, job.lr, final, step, time.perf_counter() - start,
                   loss_value, first_loss, curve=curve)


# --- the results file ---------------------------------------------------------------------------

def machine() -> dict:
    from zoo.verify.bench import machine as bench_machine

    return bench_machine()


def load_results(path: Path | None, recipe: Recipe) -> dict:
    """The stored results, or a fresh document; a file from other settings is refused."""
    fresh = {"schema": SCHEMA_VERSION, "task": "mqar", "recipe": recipe.key(),
             "cells": {name: asdict(c) for name, c in CELLS.items()},
             "steps": {c: steps_for(c, recipe) for c in CELLS}, "runs": {}, "machine": None}
    if path is None or not path.exists():
        return fresh
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not a results file ({err}); move it away to start afresh") from None
    if data.get("recipe") != recipe.key():
        raise ValueError(f"{path} holds results for other settings ({data.get('recipe')}); "
                         f"resuming would mix them: use another --out, or move the file away")
    # a cell whose step budget changed is trained again; its old runs are dropped
    budgets = {c: steps_for(c, recipe) for c in CELLS}
    data["runs"] = {k: r for k, r in data["runs"].items() if r.get("budget") == budgets.get(r["cell"])}
    data["steps"], data["cells"] = budgets, {name: asdict(c) for name, c in CELLS.items()}
    return data


def write_results(path: Path, data: dict) -> None:
    """Merge `data`'s runs into the file and write it atomically, under a lock: several `zoo
    quality` processes (say, one per cell) may share one results file, and a crash mid-write
    leaves the previous file intact. Runs in `data` win over stored runs with the same key."""
    import fcntl

    with open(path.with_suffix(path.suffix + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():
            try:
                stored = json.loads(path.read_text())
            except json.JSONDecodeError:
                stored = {}
            if stored.get("recipe") == data["recipe"]:
                budgets = data["steps"]
                kept = {k: r for k, r in stored.get("runs", {}).items()
                        if r.get("budget") == budgets.get(r.get("cell"))}
                data["runs"] = {**kept, **data["runs"]}
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)


def summary(data: dict) -> dict:
    """`{entry: {cell: {"accuracy", "lr", "steps", "seconds", "rising"}}}`: the best learning
    rate per cell; `rising`: that run was still climbing when its step budget ran out
    (`still_rising`)."""
    best: dict = {}
    for run in data["runs"].values():
        cells = best.setdefault(run["attention"], {})
        if run["cell"] not in cells or run["accuracy"] > cells[run["cell"]]["accuracy"]:
            cells[run["cell"]] = run
    return {entry: {cell: {"accuracy": run["accuracy"], "lr": run["lr"], "steps": run["steps"],
                           "seconds": run["seconds"], "status": run["status"],
                           "rising": still_rising(run.get("curve") or [])}
                    for cell, run in cells.items()}
            for entry, cells in best.items()}


RISING_SHARE, RISING_BY = 0.25, 0.05


def still_rising(curve: list) -> bool:
    """A run that ended below STOP_AT with its test accuracy up by RISING_BY or more over the last
    RISING_SHARE of its steps: its score says "not within the budget", not "cannot" (gated linear
    attention at n64-p4 sat at 0.23 for 2,300 steps, then reached 0.90 by step 4,000)."""
    if not curve or curve[-1][1] >= STOP_AT:
        return False
    last_step, last = curve[-1]
    before = [acc for step, acc in curve if step <= last_step * (1 - RISING_SHARE)]
    return bool(before) and last - before[-1] >= RISING_BY


UNTRAINABLE = "does not train on recall"  # the phrase a catalogue note uses to explain it


def untrained(data: dict, cells: dict | None = None) -> list[str]:
    """`entry|cell` pairs where no learning rate got even the answer prior: every run diverged, or
    the best final training loss is not below `ln(vocab / 2)`, the loss of a model that ignores the
    context and spreads its guess over the values' half of the vocabulary.

    A mixer that blocks the residual model from learning that much is broken in training (a
    gradient that explodes and, clipped, freezes everything else, as sac's and smart-bird's
    score-function surrogates did before they used log-probabilities), not merely weak at recall.
    Entries whose catalogue `notes` contain `UNTRAINABLE` (with the reason) are left out.
    """
    from zoo.registry import entry, names

    cells = cells or data["cells"]
    best: dict[tuple[str, str], float] = {}
    for run in data["runs"].values():
        loss = run.get("final_loss", math.nan)
        ok = run["status"] == "ok" and isinstance(loss, (int, float)) and math.isfinite(loss)
        key = (run["attention"], run["cell"])
        best[key] = min(best.get(key, math.inf), loss if ok else math.inf)
    known = set(names())
    return [f"{a}|{c}" for (a, c), loss in sorted(best.items())
            if loss >= math.log(cells[c]["vocab"] / 2)
            and not (a in known and UNTRAINABLE in (entry(a).notes or ""))]


def jobs_for(names: Iterable[str], cells: Iterable[str], recipe: Recipe) -> list[Job]:
    """Cell by cell, entry by entry, the largest learning rate first (see `settled`)."""
    lrs = sorted(recipe.lrs, reverse=True)
    return [Job(n, c, lr) for c in cells for n in names for lr in lrs]


def prioritised(todo: list[Job], runs: dict) -> list[Job]:
    """The jobs cell by cell as `jobs_for` lists them, but within a cell the entries that did best
    in the cell before it first (an entry not yet measured there in the middle, at 0.5): the
    harder cells cost hours per pass over the catalogue, so the comparisons that can still
    separate mechanisms fill in first, and the entries already at the copy-a-value plateau
    (about 1 / pairs) of the easier cell come last. Within an entry, the rate `transferred` tries
    first leads. Nothing is skipped here; only the order changes."""
    order = list(CELLS)
    best: dict[tuple[str, str], float] = {}
    for r in runs.values():
        if r["status"] == "ok":
            key = (r["attention"], r["cell"])
            best[key] = max(best.get(key, 0.0), r["accuracy"])

    first: dict[tuple[str, str], int] = {}  # an entry's jobs stay together, at the place of its first one
    for i, job in enumerate(todo):
        first.setdefault((job.attention, job.cell), i)

    def rank(indexed: tuple[int, Job]) -> tuple:
        i, job = indexed
        at = order.index(job.cell)
        before = order[at - 1] if at > 1 else None  # the smoke cell ranks nothing
        prior = best.get((job.attention, before), 0.5) if before else 0.5
        chosen = _best_before(job, runs)  # the rate that did best in the cell before goes first
        later = chosen is not None and job.lr != chosen[1]
        return (at, -prior, first[(job.attention, job.cell)], later, i)

    return [job for _, job in sorted(enumerate(todo), key=rank)]


def settled(job: Job, runs: dict) -> bool:
    """True when another learning rate already reached the stop accuracy for this entry and cell:
    the sweep's best is then decided, and training this job could not change it."""
    return any(r["attention"] == job.attention and r["cell"] == job.cell and r["lr"] != job.lr
               and r["status"] == "ok" and r["accuracy"] >= STOP_AT for r in runs.values())


TRANSFER_FROM = "n64-p4"  # the last cell swept in full; from the cell after it rates transfer


def _best_before(job: Job, runs: dict) -> tuple[float, float] | None:
    """(accuracy, learning rate) of the entry's best run in the cell before `job.cell`, or None
    when that cell is not after TRANSFER_FROM's sweep or holds no run of the entry yet."""
    order = list(CELLS)
    at = order.index(job.cell)
    if at <= order.index(TRANSFER_FROM):
        return None
    prior = [(r["accuracy"], r["lr"]) for r in runs.values()
             if r["attention"] == job.attention and r["cell"] == order[at - 1]
             and r["status"] == "ok"]
    return max(prior) if prior else None  # a tie goes to the larger rate


def transferred(job: Job, runs: dict) -> bool:
    """True when the sweep of the cell before already chose this entry's rate, so this job (at
    another rate) is not trained. The harder cells cost 10-40 core-hours per pass over the
    catalogue, and a full sweep in each would double that for the mechanisms that do not learn
    them, which are most of the cost. So from the cell after TRANSFER_FROM on:

    - every entry is trained first at the rate that did best for it in the cell before;
    - an entry that reached STOP_AT there and falls short here is also trained at the other rates
      (`settled` skips them once one reaches it): the harder cell may want another rate;
    - an entry that fell short in the cell before is not retried at the other rates, since the
      sweep there, on an easier problem, already found its better one.

    Only the other rates of the last kind are skipped: every entry has a run in every cell."""
    before = _best_before(job, runs)
    if before is None:
        return False
    accuracy, lr = before
    return job.lr != lr and accuracy < STOP_AT


def skipped(job: Job, runs: dict) -> bool:
    """The job need not be trained: `settled` or `transferred`."""
    return settled(job, runs) or transferred(job, runs)


def resolve_cells(cells: list[str] | None) -> list[str]:
    if not cells:
        return list(CELLS)
    import difflib

    out = []
    for c in cells:
        if c not in CELLS:
            close = difflib.get_close_matches(c, list(CELLS), n=3)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ValueError(f"no recall cell named {c!r}{hint} (cells: {', '.join(CELLS)})")
        out.append(c)
    return out


def _run_job(args: tuple) -> dict:
    job, recipe = args
    return asdict(train(job, recipe))


class _Progress:
    """A bar over training steps on a terminal; one line per finished job elsewhere (logs)."""

    def __init__(self, total: int, desc: str):
        from tqdm import tqdm

        self.tty = sys.stderr.isatty()
        self.bar = tqdm(total=total, desc=desc, unit="step", file=sys.stderr, disable=not self.tty,
                        dynamic_ncols=True)
        self.total, self.done, self.start = total, 0, time.perf_counter()

    def advance(self, steps: int) -> None:
        self.done += steps
        self.bar.update(steps)

    def finished(self, out: dict, left: int) -> None:
        label = f"{out['attention']} {out['cell']} lr={out['lr']:g}: {out['accuracy']:.3f}"
        if self.tty:
            self.bar.set_postfix_str(label)
        else:
            pct = 100 * self.done / max(self.total, 1)
            print(f"[{pct:5.1f}% of steps, {time.perf_counter() - self.start:7.0f} s] {label} "
                  f"({out['steps']} steps, {out['seconds']:.0f} s, {out['status']}); {left} jobs left",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        self.bar.close()


def run(names: list[str], *, cells: list[str] | None = None, out: Path | None = None,
        recipe: Recipe | None = None, jobs: int = 1, ray_address: str | None = None) -> dict:
    """Train every (entry, cell, learning rate) job not already in `out`; returns the document."""
    recipe = recipe or Recipe()
    cells = resolve_cells(cells)
    data = load_results(out, recipe)
    todo = prioritised([j for j in jobs_for(names, cells, recipe) if j.key not in data["runs"]],
                       data["runs"])
    data["machine"] = machine()
    data["machine"]["jobs"] = jobs if ray_address is None else f"ray {ray_address}"
    total = sum(steps_for(j.cell, recipe) for j in todo)
    bar = _Progress(total, f"recall: {len(todo)} jobs")

    def record(result: dict) -> None:
        result["date"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        result["budget"] = steps_for(result["cell"], recipe)
        data["runs"][Job(result["attention"], result["cell"], result["lr"]).key] = result
        if out is not None:
            write_results(out, data)

    try:
        if ray_address is not None:
            _run_ray(todo, recipe, ray_address, record, bar, data["runs"])
        elif jobs > 1:
            _run_pool(todo, recipe, jobs, record, bar, data["runs"])
        else:
            for i, job in enumerate(todo):
                if skipped(job, data["runs"]):
                    bar.advance(steps_for(job.cell, recipe))
                    continue
                result = asdict(train(job, recipe, on_step=bar.advance))
                record(result)
                bar.finished(result, len(todo) - i - 1)
    finally:
        bar.close()
    return data


def next_ready(queue: list[Job], running: list[Job]) -> Job | None:
    """The first job in `queue` whose entry has no job in `running` (None if there is none)."""
    busy = {job.attention for job in running}
    return next((job for job in queue if job.attention not in busy), None)


def _run_pool(todo: list[Job], recipe: Recipe, jobs: int, record, bar: _Progress,
              runs: dict) -> None:
    """At most `jobs` in flight, handed out in order, except that a job waits while another job of
    the same entry is in flight: its rate may be settled, or chosen by the cell before
    (`skipped`), once that one finishes. The next independent job takes the free process."""
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    queue = list(todo)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
        running: dict = {}  # future -> job
        while queue or running:
            while len(running) < jobs:
                ready = next_ready(queue, list(running.values()))
                if ready is None:
                    break
                queue.remove(ready)
                if skipped(ready, runs):
                    bar.advance(steps_for(ready.cell, recipe))
                    continue
                running[pool.submit(_run_job, (ready, recipe))] = ready
            if not running:
                continue
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                running.pop(fut)
                result = fut.result()
                bar.advance(steps_for(result["cell"], recipe))
                record(result)
                bar.finished(result, len(queue) + len(running))


def _run_ray(todo: list[Job], recipe: Recipe, address: str, record, bar: _Progress,
             runs: dict) -> None:
    try:
        import ray
    except ImportError:
        raise ImportError("zoo quality --ray needs the optional ray extra: "
                          "pip install 'attention-zoo[ray]'") from None
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False)
    remote = ray.remote(num_cpus=recipe.threads)(_run_job)
    # every job is handed out at once, so only what the results file already decides is skipped
    kept = []
    for job in todo:
        if skipped(job, runs):
            bar.advance(steps_for(job.cell, recipe))
        else:
            kept.append(job)
    todo = kept
    pending = {remote.remote((job, recipe)): job for job in todo}
    left = len(pending)
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            pending.pop(ref)
            result = ray.get(ref)
            left -= 1
            bar.advance(steps_for(result["cell"], recipe))
            record(result)
            bar.finished(result, left)
