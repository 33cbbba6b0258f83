"""The benchmark harness behind `zoo bench`: wall time and peak memory of every entry, measured the
same way, against a multi-head layer built on `scaled_dot_product_attention` (id `sdpa`).

How it measures:
- Each entry runs in its own worker processes (`python -m zoo.verify.bench worker`: one for peak memory,
  one for time), lengths in increasing order, so a crash or an out-of-memory kill loses one
  entry's row, not the run.
- Time: median of `repeats` forward (or forward + backward) passes after two warm-up passes (one
  when a pass takes over 5 s; passes under 0.1 s are repeated for about a quarter second, up to
  50, so that a median of milliseconds is not set by the scheduler). On CPU every timed pass
  starts with cold caches (a 64 MiB buffer, twice this machine kind's L3, is overwritten before
  it, as Triton's `do_bench` clears the GPU's L2): a layer of a few milliseconds would otherwise
  run at n = 4096 from the cache its identical previous pass filled and at n = 16384 from memory,
  and its fitted exponent would measure the cache. The worker's glibc keeps freed memory for
  reuse (`MALLOC_MMAP_MAX_=0`, a large `MALLOC_TRIM_THRESHOLD_`), as a caching allocator does.
  With glibc's defaults every block over 32 MiB is mapped fresh and unmapped on each pass, and
  the kernel's page faults on those fresh pages add a cost that grows with the intermediates, not
  with the arithmetic (measured at dim 256, 4 heads, one thread, 4096 -> 16384: the projections
  alone have a time exponent of 1.10 with the defaults and 1.02 without the faults; the SDPA
  layer 1.97 either way).
- Peak memory (CPU): the process's resident-set high-water mark (`VmHWM`), reset before each
  measurement through `/proc/self/clear_refs`, minus the resident size just before the pass; it
  counts everything the pass allocates, torch's allocator and temporaries included. The worker
  runs with glibc told to map every block over 64 KiB on its own and return freed memory at once
  (`MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`), so memory kept from an earlier pass does
  not hide the next pass's peak. On CUDA:
  `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`.
- Decoding (`decode=True`, `zoo bench --decode`): every autoregressive entry, built causal, is given a
  context of `n - 1` tokens (`step` on chunks of `PREFILL_CHUNK`, not timed), then one `step` on a
  single token is timed and its peak memory measured as above, from the same state each time (a
  step does not change the state it is given; the contract checks it). The baseline is the SDPA
  layer with a KV cache. Each point also records the state's size in bytes.
- Budgets: a length whose predicted time or memory (from the previous length and the declared
  exponent) exceeds `--max-time` / `--max-mem` is recorded as over budget and skipped, as are the
  longer ones; a worker that dies or overruns is recorded as such, and the run goes on.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from zoo.core.decoding import extend_kv, offset_causal
from zoo.core.shell import MultiHead

BASELINE = "sdpa"
PREFILL_CHUNK = 2048  # tokens per step call while building a decoding context
FLUSH_BYTES = 64 << 20  # written before each timed CPU pass: twice the L3 cache of this machine kind
# glibc: serve every block over 64 KiB by mmap and give freed memory back at once, so the
# resident size follows what is live and one worker can measure several lengths in a row.
WORKER_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
# glibc for timing: never mmap (so large blocks come from the heap and are reused) and never trim,
# so passes after the warm-up reuse memory instead of faulting in fresh pages.
TIME_ENV = {**os.environ, "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2 ** 40)}


class SDPABaseline(MultiHead):
    """Multi-head attention on torch's fused `scaled_dot_product_attention`: the speed baseline."""

    def __init__(self, dim: int, *, heads: int = 8, dim_head: int | None = None,
                 causal: bool = False):
        super().__init__(dim, heads=heads, dim_head=dim_head, causal=causal)

    def attend(self, q, k, v, mask=None):
        attn_mask = None if mask is None else mask[:, None, None, :]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                              is_causal=self.causal and mask is None)

    def attend_step(self, q, k, v, cache, mask=None, start=0):
        """Decoding with a KV cache: the new queries read every cached key up to their position."""
        k, v, mask = cache = extend_kv(cache, k, v, mask, start)
        allowed = None if q.shape[2] == 1 and mask is None else offset_causal(q.shape[2], start, q.device)
        if mask is not None:
            allowed = allowed & mask[:, None, None, :]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed), cache


# --- inside the worker ----------------------------------------------------------------------

def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def _build(name: str, dim: int, heads: int, n: int, causal: bool = False):
    import inspect

    from zoo.registry import accepted_keywords, entry, load

    if name == BASELINE:
        return SDPABaseline(dim, heads=heads, causal=causal), "sequence"
    e = entry(name)
    cls = load(name)
    accepted = accepted_keywords(cls)
    kwargs: dict = {"dim": dim, **({"causal": True} if causal else {})}
    if "heads" in accepted:
        kwargs["heads"] = heads
    if "max_len" in accepted:
        kwargs["max_len"] = max(n, inspect.signature(cls).parameters["max_len"].default or 0)
    if "max_size" in accepted and e.input == "image":  # image layers bound to a side length
        side = round(math.sqrt(n))
        kwargs["max_size"] = max(side, inspect.signature(cls).parameters["max_size"].default or 0)
    return cls(**kwargs), e.input


def recomputes(layer) -> bool:
    """Whether the layer decodes by the shell's generic fallback (each step runs the whole prefix)."""
    cls = type(layer)
    return (isinstance(layer, MultiHead) and cls.decode is MultiHead.decode
            and cls.attend_step is MultiHead.attend_step)


def prefill(layer, x: torch.Tensor, chunk: int = PREFILL_CHUNK):
    """The decoding state after `x` `(b, n, dim)`, built by `step` on chunks of `chunk` tokens (in
    one call for a layer that recomputes the prefix anyway: chunks would run it again each time)."""
    chunk = max(x.shape[1], 1) if recomputes(layer) else chunk
    state = None
    with torch.no_grad():
        for s in range(0, x.shape[1], chunk):
            _, state = layer.step(x[:, s:s + chunk], state)
    return state


def measure(name: str, n: int, *, dim: int, heads: int, backward: bool, repeats: int,
            device: str, decode: bool = False) -> dict:
    """One (entry, n) measurement in this process; with `decode`, of one token's `step` after a
    context of `n - 1` tokens."""
    torch.manual_seed(0)
    layer, kind = _build(name, dim, heads, n, causal=decode)
    layer = layer.to(device)
    layer.train(backward and not decode)
    side = round(math.sqrt(n))
    shape = (1, dim, side, side) if kind == "image" else (1, n, dim)
    x = torch.randn(shape, device=device, requires_grad=backward and not decode)
    state = prefill(layer, x[:, :-1]) if decode and n > 1 else None
    extra = {} if not decode else {"state_bytes": 0 if state is None else state.numel() * x.element_size()}

    def run():
        if decode:
            with torch.no_grad():
                layer.step(x[:, -1:], state)
        elif backward:
            layer(x).sum().backward()
            layer.zero_grad(set_to_none=True)
            x.grad = None
        else:
            with torch.no_grad():
                layer(x)
        if device == "cuda":
            torch.cuda.synchronize()

    cpu = device == "cpu" and Path("/proc/self/clear_refs").exists()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    elif cpu:
        _reset_peak()
        before = _status_kb("VmRSS") * 1024
    start = time.perf_counter()
    run()  # warm-up, and the pass whose peak memory is recorded
    first = time.perf_counter() - start
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - before
    elif cpu:
        peak = _status_kb("VmHWM") * 1024 - before
    else:
        peak = None
    times = [first] if repeats == 0 else []
    if 0 < repeats and first < 5:
        run()  # a second warm-up: the allocator reaches its steady state (page faults settle)
    count = repeats if first < 30 else min(repeats, 1)
    if repeats and first < 0.1:  # short passes: about a quarter second of them, so that a median
        # of milliseconds is not set by the scheduler
        count = max(count, min(50, math.ceil(0.25 / max(first, 1e-4))))
    # every timed pass starts with cold caches: a write over more memory than the last-level cache
    # holds, so that a pass does not read what the identical pass before it left in the cache
    scratch = torch.empty(FLUSH_BYTES // 4) if device == "cpu" and repeats else None
    for _ in range(count):
        if scratch is not None:
            scratch.zero_()
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return {"n": side * side if kind == "image" else n, "time_s": statistics.median(times),
            "peak_bytes": peak, "status": "ok", **extra}


def worker(spec: dict) -> None:
    """Measure one entry at each n in order, one JSON line per n on stdout."""
    torch.set_num_threads(spec["threads"])
    prev = None
    for n in spec["ns"]:
        if str(n) in spec.get("skip", {}):
            prev = {"n": n, "status": spec["skip"][str(n)]}
            print(json.dumps(prev), flush=True)
            continue
        if prev is not None and prev["status"] == "ok":
            grow = n / prev["n"]
            # The memory worker (repeats 0) times only a cold first pass: it judges memory only.
            t_pred = prev["time_s"] * grow ** max(spec["time_exp"], 1) if spec["repeats"] else 0.0
            m_pred = (prev["peak_bytes"] or 0) * grow ** spec["mem_exp"]
            if t_pred > spec["max_time"]:
                prev = {"n": n, "status": f"over time budget (predicted {t_pred:.0f} s)"}
            elif m_pred > spec["max_mem"]:
                prev = {"n": n, "status": f"over memory budget (predicted {m_pred / 2**20:.0f} MiB)"}
            else:
                prev = None
            if prev is not None:
                print(json.dumps(prev), flush=True)
                continue
        elif prev is not None:
            print(json.dumps({"n": n, "status": prev["status"]}), flush=True)
            continue
        try:
            prev = measure(spec["name"], n, dim=spec["dim"], heads=spec["heads"],
                           backward=spec["backward"], repeats=spec["repeats"], device=spec["device"],
                           decode=spec.get("decode", False))
        except Exception as err:  # noqa: BLE001 - recorded, and the run goes on
            prev = {"n": n, "status": f"error: {type(err).__name__}: {str(err)[:200]}"}
        print(json.dumps(prev), flush=True)


# --- the parent -------------------------------------------------------------------------------

def fitted_exponent(points: list[dict], key: str) -> float | None:
    """Exponent of n between the two longest lengths that were measured."""
    ok = [p for p in points if p.get("status") == "ok" and p.get(key)]
    if len(ok) < 2 or ok[-1][key] <= 0 or ok[-2][key] <= 0:
        return None
    return math.log(ok[-1][key] / ok[-2][key]) / math.log(ok[-1]["n"] / ok[-2]["n"])


def machine() -> dict:
    return {
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _run_worker(name: str, spec: dict, timeout: float, env: dict) -> list[dict]:
    """One worker process; whatever it did not report is recorded with the reason."""
    cmd = [sys.executable, "-m", "zoo.verify.bench", "worker", json.dumps({**spec, "name": name})]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        lines, reason = proc.stdout, (f"worker exited with {proc.returncode}"
                                      f"{' (killed: out of memory?)' if proc.returncode < 0 else ''}"
                                      f": {proc.stderr.strip()[-200:]}")
    except subprocess.TimeoutExpired as err:
        lines = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        reason = f"over time budget (worker stopped after {timeout:.0f} s)"
    points = {p["n"]: p for p in map(json.loads, filter(lambda s: s.startswith("{"),
                                                           lines.splitlines()))}
    out = []
    for n in spec["ns"]:
        p = points.get(n) or points.get(round(math.sqrt(n)) ** 2)
        out.append(p or {"n": n, "status": reason})
    return out


def run_entry(name: str, spec: dict, timeout: float) -> list[dict]:
    """Peak memory from one worker (glibc returning memory at once, one pass per length), then
    time from another whose glibc keeps memory for reuse (`TIME_ENV`; returning memory at once
    slows the allocation-heavy references, not SDPA's fused kernel). Lengths the first finds over
    budget, or failing, are not run again."""
    memory = _run_worker(name, {**spec, "repeats": 0}, timeout, WORKER_ENV)
    skip = {str(n): p["status"] for n, p in zip(spec["ns"], memory, strict=True)
            if p["status"] != "ok"}
    timing = _run_worker(name, {**spec, "skip": skip}, timeout, TIME_ENV)
    for m, p in zip(memory, timing, strict=True):
        p["peak_bytes"] = m.get("peak_bytes") if m["status"] == "ok" else None
        if "state_bytes" in m:
            p["state_bytes"] = m["state_bytes"]
    return timing




def resolve_names(patterns: list[str]) -> list[str]:
    """Ids (or fnmatch globs) -> catalogue ids, in catalogue order; unknown names raise."""
    import fnmatch

    from zoo.registry import entry, names

    if not patterns:
        return names()
    out: list[str] = []
    for p in patterns:
        hits = [i for i in names() if fnmatch.fnmatchcase(i, p)] if any(c in p for c in "*?[") \
            else [entry(p).id]
        if not hits:
            raise LookupError(f"no catalogue entry matches {p!r}")
        out += [h for h in hits if h not in out]
    return out


def declared_exponents(name: str, decode: bool) -> dict:
    """`{time, memory}` exponents to budget with: the catalogue's `scaling`, or with `decode` its
    `decoding` (step FLOPs as time, state size as memory); the baseline's are softmax's."""
    from zoo.registry import entry

    if decode:
        d = {"step": 1, "state": 1} if name == BASELINE else dict(entry(name).decoding or {})
        if "step" not in d:
            raise LookupError(f"{name} declares no decoding in the catalogue")
        return {"time": d["step"], "memory": d["state"]}
    return {"time": 2, "memory": 2} if name == BASELINE else dict(entry(name).scaling)


def run(names: list[str], *, ns: list[int], dim: int = 256, heads: int = 4, backward: bool = False,
        repeats: int = 5, device: str = "cpu", threads: int | None = None,
        max_time: float = 60.0, max_mem: float = 8 * 2**30, decode: bool = False,
        progress=None) -> dict:
    """Benchmark the SDPA baseline and `names`; returns the JSON-ready results. With `decode`,
    one token's `step` after each context length (the baseline with a KV cache)."""
    threads = threads or torch.get_num_threads()
    base = {"ns": sorted(ns), "dim": dim, "heads": heads, "backward": backward,
            "repeats": repeats, "device": device, "threads": threads, "max_time": max_time,
            "max_mem": max_mem, "decode": decode}
    results = {}
    for name in [BASELINE, *names]:
        declared = declared_exponents(name, decode)
        # a step's peak memory grows as the larger of the state and the step's own work
        spec = {**base, "time_exp": declared["time"],
                "mem_exp": max(declared["memory"], declared["time"]) if decode else declared["memory"]}
        timeout = 60 + len(ns) * max_time * (repeats + 2)
        points = run_entry(name, spec, timeout)
        results[name] = {
            "declared": {"time": declared["time"], "memory": declared["memory"]},
            "fitted": {"time": fitted_exponent(points, "time_s"),
                       "memory": fitted_exponent(points, "state_bytes" if decode else "peak_bytes")},
            "points": points,
        }
        if progress:
            progress(name)
    return {"machine": machine(), "settings": {k: v for k, v in base.items()},
            "results": results}


def table_rows(data: dict) -> tuple[list[str], list[list[str]]]:
    """A printable table: time and peak memory per n, fitted vs declared exponents, speed-up."""
    ns = data["settings"]["ns"]
    base = {p["n"]: p for p in data["results"][BASELINE]["points"]}
    header = (["entry"] + [f"ms @{n}" for n in ns] + [f"MiB @{n}" for n in ns]
              + ["time exp (decl.)", "mem exp (decl.)", f"x SDPA @{ns[-1]}"])
    rows = []
    for name, r in data["results"].items():
        pts = {p["n"]: p for p in r["points"]}
        by_n = [pts.get(n) or pts.get(round(math.sqrt(n)) ** 2) or {} for n in ns]
        ms = [f"{p['time_s'] * 1e3:.1f}" if p.get("status") == "ok" else _short(p) for p in by_n]
        mib = [f"{p['peak_bytes'] / 2**20:.1f}" if p.get("status") == "ok"
               and p.get("peak_bytes") is not None else "-" for p in by_n]
        fit = {k: "-" if v is None else f"{v:.2f}" for k, v in r["fitted"].items()}
        last, b = by_n[-1], base.get(ns[-1], {})
        speed = (f"{b['time_s'] / last['time_s']:.1f}" if last.get("status") == "ok"
                 and b.get("status") == "ok" else "-")
        rows.append([name, *ms, *mib, f"{fit['time']} ({r['declared']['time']})",
                     f"{fit['memory']} ({r['declared']['memory']})", speed])
    return header, rows


def _short(p: dict) -> str:
    status = p.get("status", "not run")
    return "over budget" if status.startswith("over") else status.split(":")[0]


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    worker(json.loads(sys.argv[2]))
