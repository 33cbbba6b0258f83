"""The benchmark harness behind `zoo bench`: wall time, peak memory and FLOPs of every entry,
measured the same way, against a multi-head layer built on `scaled_dot_product_attention` (id
`sdpa`), forward and forward + backward.

How it measures:
- Each entry runs in its own worker processes (`python -m zoo.verify.bench worker`: one for peak
  memory and FLOPs, then one per timing environment), lengths in increasing order, so a crash or
  an out-of-memory kill loses one entry's row, not the run.
- The headline time is the process a user has (`plain`): glibc's default allocator, the parent's
  environment with every `MALLOC_*` variable and `LD_PRELOAD` removed, the threads torch picks.
  Beside it, labelled, the same passes with an allocator that keeps freed memory for reuse:
  `tuned` is glibc told never to serve a block by mmap and never to trim the heap
  (`MALLOC_MMAP_MAX_=0`, `MALLOC_TRIM_THRESHOLD_` = 1 TiB), as PyTorch's CPU performance notes
  describe; and, where `ldconfig` finds `libjemalloc.so` or `libtcmalloc.so`, that caching
  allocator preloaded (`LD_PRELOAD`). With glibc's defaults every block over 32 MiB is mapped
  fresh and unmapped on each pass, and the page faults on those fresh pages add a cost that grows
  with the intermediates, not with the arithmetic: the allocation-heavy references pay it, SDPA's
  fused kernel barely does. Each worker reports the variables it saw (`settings.environments`).
- Time: median of `repeats` passes after two warm-up passes (one when a pass takes over 5 s;
  passes under 0.1 s are repeated for about a quarter second, up to 50, so that a median of
  milliseconds is not set by the scheduler), forward (`time_s`, no grad, eval mode) and forward +
  backward of `sum()` (`time_fb_s`, train mode). On CPU every timed pass starts with cold caches
  (a 64 MiB buffer, twice this machine kind's L3, is overwritten before it, as Triton's
  `do_bench` clears the GPU's L2): a layer of a few milliseconds would otherwise run at n = 4096
  from the cache its identical previous pass filled and at n = 16384 from memory.
- Peak memory (CPU): the process's resident-set high-water mark (`VmHWM`), reset before each
  measurement through `/proc/self/clear_refs`, minus the resident size just before the pass
  (`peak_bytes` forward, `peak_fb_bytes` forward + backward); it counts everything the pass
  allocates. The memory worker runs with glibc told to map every block over 64 KiB on its own and
  return freed memory at once (`MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`), so memory kept
  from an earlier pass does not hide the next pass's peak. On CUDA: `torch.cuda.max_memory_allocated`
  after `reset_peak_memory_stats`.
- FLOPs: one forward pass per length in the memory worker under `FlopCounterMode` (with SDPA's
  math backend, since the counter does not see torch's fused CPU kernel). Over the plain forward
  time and the machine's float32 matmul rate measured at the start of the same run (best of a few
  `MATMUL_SIZE`-square products at the run's thread count, in a plain process) it gives the
  fraction of peak (`fraction_of_peak`).
- Decoding (`decode=True`, `zoo bench --decode`, its own results file): every autoregressive entry,
  built causal, is given a context of `n - 1` tokens (`step` on chunks of `PREFILL_CHUNK`, not
  timed), then one `step` on a single token is timed (plain process) and its peak memory measured
  as above, from the same state each time (a step does not change the state it is given; the
  contract checks it). The baseline is the SDPA layer with a KV cache. Each point also records the
  state's size in bytes (`state_bytes`), whose exponent is the fitted memory exponent.
- Budgets: a length whose predicted time or memory (from the previous length and the declared
  exponent) exceeds `--max-time` / `--max-mem` is recorded as over budget and skipped, as are the
  longer ones; a worker that dies or overruns is recorded as such, and the run goes on. Memory is
  predicted per pass with the larger of the declared exponent and the growth measured over the
  pass's two previous lengths: the declared exponent is the forward pass's, and a backward pass
  can grow faster (flash-attention's autograd keeps every tile, so its forward + backward is
  quadratic where its forward is linear; predicted from the declared 1, it was killed for memory).
  Each pass is reported as it finishes, so a worker killed in one pass keeps the others.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F

from zoo.core.decoding import extend_kv, offset_causal
from zoo.core.shell import MultiHead

BASELINE = "sdpa"
FLUSH_BYTES = 64 << 20  # written before each timed CPU pass: twice the L3 cache of this machine kind
MATMUL_SIZE = 2048  # the square float32 matmul whose rate is the machine's peak
PREFILL_CHUNK = 2048  # tokens per step call while building a decoding context
# pass -> key infix: time_s / time_fb_s / time_decode_s, peak_bytes / peak_fb_bytes / ...
MODES = {"forward": "", "fb": "_fb", "decode": "_decode"}
TARGET_N = 16384  # where the targets are set
TARGETS = {"linear_forward": 10.0, "linear_fb": 8.0, "kernel_fraction": 0.5}
# glibc for the memory worker: serve every block over 64 KiB by mmap and give freed memory back at
# once, so the resident size follows what is live and one worker can measure several lengths.
MEMORY_VARS = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
# glibc tuned for timing: never mmap (large blocks come from the heap and are reused) and never
# trim, so passes after the warm-up reuse memory instead of faulting in fresh pages.
TUNED_VARS = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2 ** 40)}
CACHING_ALLOCATORS = ("jemalloc", "tcmalloc")
# The tuned environment as one dict, for `benchmarks/compare_public.py` (which still times there).
TIME_ENV = {**os.environ, **TUNED_VARS}


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

# --- environments -----------------------------------------------------------------------------

def plain_env() -> dict[str, str]:
    """The parent's environment without allocator settings: what a user's process has."""
    return {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "LD_PRELOAD"}


def caching_allocator() -> tuple[str, str] | None:
    """(name, path) of the first of jemalloc, tcmalloc that `ldconfig -p` lists, or None."""
    try:
        listing = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True,
                                 timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    arch = "x86-64" if platform.machine() in ("x86_64", "AMD64") else ""
    for name in CACHING_ALLOCATORS:
        for line in listing.splitlines():
            m = re.match(rf"\s*lib{name}\.so[.\d]*\s+\((.*)\)\s+=>\s+(\S+)", line)
            if m and arch in m.group(1):
                return name, m.group(2)
    return None


def _package_of(path: str) -> str | None:
    """The Debian package (and version) that installed `path`, where dpkg knows it."""
    try:
        owner = subprocess.run(["dpkg", "-S", os.path.realpath(path)], capture_output=True,
                               text=True, timeout=30).stdout.split(":")[0].strip()
        if not owner:
            return None
        version = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", owner],
                                 capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{owner} {version}".strip()


def environments(allocators: Iterable[str] = ("tuned", "preload")) -> dict[str, dict]:
    """label -> {"env": full environment, "set": the variables set on top of the plain one, ...}.

    `plain` always comes first; `tuned` is glibc's settings; `preload` adds the caching allocator
    that `caching_allocator` finds (labelled by its name), and is left out where there is none.
    """
    out: dict[str, dict] = {"plain": {"label": "plain process, glibc's defaults", "set": {}}}
    allocators = list(allocators)
    unknown = set(allocators) - {"tuned", "preload"}
    if unknown:
        raise ValueError(f"allocators: expected 'tuned' and/or 'preload', got {sorted(unknown)}")
    if "tuned" in allocators:
        out["tuned"] = {"label": "glibc tuned to keep freed memory", "set": dict(TUNED_VARS)}
    found = caching_allocator() if "preload" in allocators else None
    if found:
        name, path = found
        out[name] = {"label": f"{name} preloaded", "set": {"LD_PRELOAD": path},
                     "package": _package_of(path)}
    base = plain_env()
    for spec in out.values():
        spec["env"] = {**base, **spec["set"]}
    return out


def _seen(default_threads: int) -> dict:
    """What this process was started with, as far as allocation and threads go."""
    maps = Path("/proc/self/maps")
    loaded = sorted({name for name in CACHING_ALLOCATORS
                     if maps.exists() and f"lib{name}" in maps.read_text()})
    return {"variables": {k: v for k, v in sorted(os.environ.items())
                          if k.startswith("MALLOC_") or k == "LD_PRELOAD" or k.endswith("_NUM_THREADS")},
            "allocators_loaded": loaded, "threads_default": default_threads,
            "threads": torch.get_num_threads()}


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


def _inputs(name: str, n: int, *, dim: int, heads: int, backward: bool, device: str,
            causal: bool = False):
    torch.manual_seed(0)
    layer, kind = _build(name, dim, heads, n, causal=causal)
    layer = layer.to(device)
    layer.train(backward)
    side = round(math.sqrt(n))
    shape = (1, dim, side, side) if kind == "image" else (1, n, dim)
    x = torch.randn(shape, device=device, requires_grad=backward)
    return layer, x, (side * side if kind == "image" else n)


def count_flops(name: str, n: int, *, dim: int, heads: int, device: str = "cpu") -> int:
    """FLOPs of one forward pass (no grad), SDPA counted through its math backend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    layer, x, _ = _inputs(name, n, dim=dim, heads=heads, backward=False, device=device)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]), counter:
        layer(x)
    return int(counter.get_total_flops())


def measure(name: str, n: int, *, dim: int, heads: int, backward: bool, repeats: int,
            device: str, decode: bool = False) -> dict:
    """One (entry, n, pass) measurement in this process: forward, forward + backward, or (with
    `decode`) one token's `step` after a context of `n - 1` tokens."""
    layer, x, n_real = _inputs(name, n, dim=dim, heads=heads, backward=backward and not decode,
                               device=device, causal=decode)
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
    return {"n": n_real, "time_s": statistics.median(times), "peak_bytes": peak, "status": "ok",
            **extra}


def _peak_floor(point: dict, dim: int) -> float:
    """A pass's peak, at least its output (the size of its input): the floor of a peak too small
    for the resident-set counter to see."""
    return max(point.get("peak_bytes") or 0, 4 * point["n"] * dim)


def _budget(prev: dict | None, n: int, spec: dict, before: dict | None = None) -> str | None:
    """Why `n` is not measured, from the previous length's result of the same pass (and the one
    before it, `before`, for the measured growth), or None."""
    if prev is None:
        return None
    if prev["status"] != "ok":
        return prev["status"]
    grow = n / prev["n"]
    # The memory worker (repeats 0) times only a cold first pass: it judges memory only.
    t_pred = prev["time_s"] * grow ** max(spec["time_exp"], 1) if spec["repeats"] else 0.0
    mem_exp = spec["mem_exp"]
    if before is not None and before.get("status") == "ok" and before["n"] < prev["n"]:
        measured = math.log(_peak_floor(prev, spec["dim"]) / _peak_floor(before, spec["dim"]))
        mem_exp = max(mem_exp, measured / math.log(prev["n"] / before["n"]))
    m_pred = _peak_floor(prev, spec["dim"]) * grow ** mem_exp
    if t_pred > spec["max_time"]:
        return f"over time budget (predicted {t_pred:.0f} s)"
    if m_pred > spec["max_mem"]:
        return f"over memory budget (predicted {m_pred / 2**20:.0f} MiB)"
    return None


def worker(spec: dict) -> None:
    """Measure one entry at each n in order: a first JSON line with what the process saw, then
    for each n one line per pass in `spec["modes"]`, {"n", <mode>: {...}}, printed as the pass
    finishes, and {"n", "flops"} where counted (the reader merges the lines of one n)."""
    default_threads = torch.get_num_threads()
    torch.set_num_threads(spec["threads"])
    print(json.dumps({"seen": _seen(default_threads)}), flush=True)
    try:  # one small pass first, so that the first length does not pay torch's one-time set-up
        measure(spec["name"], 16, dim=spec["dim"], heads=spec["heads"], backward="fb" in spec["modes"],
                repeats=0, device=spec["device"], decode="decode" in spec["modes"])
    except Exception:  # noqa: BLE001 - a layer that fails here fails, and is recorded, below
        pass
    prev: dict[str, dict | None] = {m: None for m in spec["modes"]}
    before: dict[str, dict | None] = {m: None for m in spec["modes"]}
    for n in spec["ns"]:
        for mode in spec["modes"]:
            skip = (spec.get("skip", {}).get(mode, {}).get(str(n))
                    or _budget(prev[mode], n, spec, before[mode]))
            before[mode] = prev[mode]
            if skip:
                prev[mode] = {"n": n, "status": skip}
            else:
                try:
                    prev[mode] = measure(spec["name"], n, dim=spec["dim"], heads=spec["heads"],
                                         backward=mode == "fb", repeats=spec["repeats"],
                                         device=spec["device"], decode=mode == "decode")
                except Exception as err:  # noqa: BLE001 - recorded, and the run goes on
                    prev[mode] = {"n": n, "status": f"error: {type(err).__name__}: {str(err)[:200]}"}
            print(json.dumps({"n": prev[mode].get("n", n), mode: prev[mode]}),  # type: ignore[union-attr]
                  flush=True)
        forward = prev.get("forward")
        if spec.get("flops") and forward is not None and forward["status"] == "ok":
            try:
                flops = count_flops(spec["name"], n, dim=spec["dim"], heads=spec["heads"],
                                    device=spec["device"])
            except Exception:  # noqa: BLE001 - a count that fails is left out, not fatal
                flops = None
            print(json.dumps({"n": forward["n"], "flops": flops}), flush=True)


def matmul_worker(spec: dict) -> None:
    """Best-of-`repeats` rate of a float32 `size`-square matmul, FLOP/s, as one JSON line."""
    default_threads = torch.get_num_threads()
    torch.set_num_threads(spec["threads"])
    size = spec["size"]
    a, b = torch.randn(size, size), torch.randn(size, size)
    out = torch.empty(size, size)
    torch.mm(a, b, out=out)  # warm-up
    best = math.inf
    for _ in range(spec["repeats"]):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    print(json.dumps({"seen": _seen(default_threads), "size": size, "threads": spec["threads"],
                      "best_s": best, "flops_per_s": 2 * size ** 3 / best}), flush=True)


# --- the parent -------------------------------------------------------------------------------

def fitted_exponent(points: list[dict], key: str) -> float | None:
    """Exponent of n between the two longest lengths that were measured."""
    ok = [p for p in points if p.get(key)]
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


def _worker_lines(args: list[str], timeout: float, env: dict) -> tuple[list[dict], str]:
    cmd = [sys.executable, "-m", "zoo.verify.bench", *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        lines, reason = proc.stdout, (f"worker exited with {proc.returncode}"
                                      f"{' (killed: out of memory?)' if proc.returncode < 0 else ''}"
                                      f": {proc.stderr.strip()[-200:]}")
    except subprocess.TimeoutExpired as err:
        lines = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        reason = f"over time budget (worker stopped after {timeout:.0f} s)"
    return [json.loads(s) for s in lines.splitlines() if s.startswith("{")], reason


def _run_worker(name: str, spec: dict, timeout: float, env: dict) -> tuple[list[dict], dict | None]:
    """One worker process: per n, {"n", <mode>: point, "flops"?}, whatever it did not report
    recorded with the reason; and what the process saw (None if it never started)."""
    lines, reason = _worker_lines(["worker", json.dumps({**spec, "name": name})], timeout, env)
    seen = next((ln["seen"] for ln in lines if "seen" in ln), None)
    by_n: dict[int, dict] = {}
    for ln in lines:
        if "n" in ln:
            by_n.setdefault(ln["n"], {}).update(ln)
    out = []
    for n in spec["ns"]:
        got = by_n.get(n) or by_n.get(round(math.sqrt(n)) ** 2) or {"n": n}
        for mode in spec["modes"]:
            got.setdefault(mode, {"n": got["n"], "status": reason})
        out.append(got)
    return out, seen


def matmul_rate(threads: int, env: dict, *, size: int = MATMUL_SIZE, repeats: int = 5) -> dict:
    """The machine's float32 matmul rate (FLOP/s) at `threads`, measured in a worker with `env`."""
    spec = {"size": size, "threads": threads, "repeats": repeats}
    lines, reason = _worker_lines(["matmul", json.dumps(spec)], 600, env)
    if not lines:
        raise RuntimeError(f"the matmul worker reported nothing: {reason}")
    return lines[-1]


def run_entry(name: str, spec: dict, timeout: float, envs: dict[str, dict],
              seen: dict | None = None) -> list[dict]:
    """Peak memory and FLOPs from one worker (glibc returning memory at once, one pass per length),
    then time from one worker per environment in `envs` (the first is the headline: keys
    `time_s`, `time_fb_s`; the others `time_<label>_s`, `time_fb_<label>_s`). Lengths the first
    finds over budget, or failing, are not timed. `seen`, if given, collects what each worker
    process saw, by label."""
    memory, mem_seen = _run_worker(name, {**spec, "repeats": 0, "flops": True}, timeout,
                                   {**plain_env(), **MEMORY_VARS})
    skip = {mode: {str(n): m[mode]["status"] for n, m in zip(spec["ns"], memory, strict=True)
                   if m[mode]["status"] != "ok"} for mode in spec["modes"]}
    points = []
    for m in memory:
        p: dict = {"n": m["n"]}
        for mode, infix in MODES.items():
            if mode in spec["modes"]:
                p[f"peak{infix}_bytes"] = m[mode].get("peak_bytes") if m[mode]["status"] == "ok" else None
                if "state_bytes" in m[mode]:
                    p["state_bytes"] = m[mode]["state_bytes"]
        p["flops"] = m.get("flops")
        points.append(p)
    if seen is not None:
        seen["memory"] = mem_seen
    for i, (label, env) in enumerate(envs.items()):
        timing, t_seen = _run_worker(name, {**spec, "skip": skip}, timeout, env["env"])
        if seen is not None:
            seen[label] = t_seen
        suffix = "" if i == 0 else f"_{label}"
        for p, t in zip(points, timing, strict=True):
            for mode in spec["modes"]:
                infix = MODES[mode]
                ok = t[mode]["status"] == "ok"
                p[f"time{infix}{suffix}_s"] = t[mode]["time_s"] if ok else None
                p[f"status{infix}{suffix}"] = t[mode]["status"]
            if i == 0:
                p["n"] = t["n"]
    return points


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


def run(names: list[str], *, ns: list[int], dim: int = 256, heads: int = 4, backward: bool = True,
        repeats: int = 5, device: str = "cpu", threads: int | None = None,
        max_time: float = 60.0, max_mem: float = 8 * 2**30,
        allocators: Iterable[str] = ("tuned", "preload"), decode: bool = False,
        progress=None) -> dict:
    """Benchmark the SDPA baseline and `names` (forward, and forward + backward if `backward`) in
    the plain process and each allocator of `allocators`; returns the JSON-ready results. With
    `decode`, one token's `step` after each context length instead (the baseline with a KV cache),
    in the plain process only."""
    threads = threads or torch.get_num_threads()
    if decode:
        backward, allocators = False, ()
    modes = ["decode"] if decode else ["forward", "fb"] if backward else ["forward"]
    base = {"ns": sorted(ns), "dim": dim, "heads": heads, "backward": backward, "modes": modes,
            "repeats": repeats, "device": device, "threads": threads, "max_time": max_time,
            "max_mem": max_mem, "decode": decode}
    envs = environments(allocators)
    mm = matmul_rate(threads, envs["plain"]["env"])
    results = {}
    seen: dict = {}
    for name in [BASELINE, *names]:
        declared = declared_exponents(name, decode)
        # a step's peak memory grows as the larger of the state and the step's own work
        spec = {**base, "time_exp": declared["time"],
                "mem_exp": max(declared["memory"], declared["time"]) if decode else declared["memory"]}
        timeout = 60 + len(ns) * len(modes) * max_time * (repeats + 2)
        points = run_entry(name, spec, timeout, envs, seen if name == BASELINE else None)
        results[name] = {
            "declared": {"time": declared["time"], "memory": declared["memory"]},
            "fitted": {"time": fitted_exponent(points, "time_decode_s" if decode else "time_s"),
                       "memory": fitted_exponent(points, "state_bytes" if decode else "peak_bytes")},
            "points": points,
        }
        if progress:
            progress(name)
    environments_out = {
        label: {k: v for k, v in e.items() if k != "env"} | {"seen": seen.get(label)}
        for label, e in envs.items()}
    environments_out["memory"] = {"label": "memory worker (glibc returning memory at once)",
                                  "set": dict(MEMORY_VARS), "seen": seen.get("memory")}
    settings = {**{k: v for k, v in base.items() if k != "modes"},
                "passes": (["decode"] if decode else ["forward", "forward+backward"] if backward
                           else ["forward"]),
                "headline": "plain", "allocators": [k for k in envs if k != "plain"],
                "environments": environments_out,
                "removed_from_plain": sorted(k for k in os.environ
                                             if k.startswith("MALLOC_") or k == "LD_PRELOAD")}
    return {"machine": {**machine(), "threads": threads,
                        "matmul": {k: v for k, v in mm.items() if k != "seen"}},
            "settings": settings, "results": results}


SAME_SETTINGS = ("ns", "dim", "heads", "backward", "repeats", "device", "threads", "decode",
                 "allocators")


def update(old: dict, new: dict, names: list[str], reason: str) -> dict:
    """`old` results with `names` replaced by their points in `new` (a run with the same
    settings), the rerun recorded under `settings.reruns`: which entries, when, why, the machine's
    matmul rate and the baseline's points in that run (the table keeps `old`'s baseline, so every
    speed-up is against one SDPA run; the rerun's own is kept beside it to compare)."""
    differ = [k for k in SAME_SETTINGS if old["settings"].get(k) != new["settings"].get(k)]
    if differ:
        raise ValueError("--update: the new run's settings differ from the file's in "
                         + ", ".join(f"{k} ({new['settings'].get(k)!r} against {old['settings'].get(k)!r})"
                                     for k in differ) + "; rerun with the file's settings")
    if not reason.strip():
        raise ValueError("--update needs --reason: why these entries were measured again")
    out = json.loads(json.dumps(old))
    for name in names:
        out["results"][name] = new["results"][name]
    out["settings"].setdefault("reruns", []).append({
        "ids": list(names), "date": new["machine"]["date"], "reason": reason.strip(),
        "matmul": new["machine"]["matmul"], "baseline": new["results"][BASELINE]})
    return out


# --- reading the results ---------------------------------------------------------------------

def _point(data: dict, name: str, n: int) -> dict:
    pts = {p["n"]: p for p in data["results"].get(name, {}).get("points", [])}
    return pts.get(n) or pts.get(round(math.sqrt(n)) ** 2) or {}


def _time(p: dict, key: str) -> float | None:
    """`p[key]` if that pass was measured (old files mark forward success by `status` only)."""
    v = p.get(key)
    return v if isinstance(v, (int, float)) and v > 0 else None


def matmul_flops_per_s(data: dict) -> float | None:
    return (data.get("machine", {}).get("matmul") or {}).get("flops_per_s")


def fraction_of_peak(data: dict, name: str, n: int) -> float | None:
    """FLOPs of `name`'s forward at `n` over its plain forward time, as a fraction of the run's
    measured matmul rate; None where any of the three is missing."""
    p, rate = _point(data, name, n), matmul_flops_per_s(data)
    t = _time(p, "time_s")
    if not (rate and t and p.get("flops")):
        return None
    return p["flops"] / t / rate


def speedup(data: dict, name: str, n: int, key: str = "time_s") -> float | None:
    """SDPA's time over `name`'s, same pass (`key`), at `n`."""
    t, b = _time(_point(data, name, n), key), _time(_point(data, BASELINE, n), key)
    return b / t if t and b else None


def target_n(data: dict) -> int:
    ns = data["settings"]["ns"]
    return TARGET_N if TARGET_N in ns else max(ns)


def projection_bound(data: dict, n: int | None = None) -> dict | None:
    """How much faster than the SDPA layer a layer can be whose FLOPs are its q, k, v and output
    projections (4 n dim^2 multiply-adds forward, three times that forward + backward) run at the
    measured matmul rate: {"n", "dim", "flops", "seconds", "forward", "fb"} (fb None if not run)."""
    rate = matmul_flops_per_s(data)
    n = n or target_n(data)
    if not rate:
        return None
    dim = data["settings"]["dim"]
    flops = 2 * 4 * n * dim * dim
    b = _point(data, BASELINE, n)
    fwd, fb = _time(b, "time_s"), _time(b, "time_fb_s")
    if fwd is None:
        return None
    return {"n": n, "dim": dim, "flops": flops, "seconds": flops / rate,
            "forward": fwd / (flops / rate), "fb": fb / (3 * flops / rate) if fb else None}


def target_misses(data: dict, kernel: Iterable[str]) -> list[dict]:
    """The entries that miss the issue's targets in the plain process at `target_n`: linear-time
    ones (declared time exponent <= 1) under 10x SDPA forward or 8x forward + backward; kernel
    ones (`kernel`: their ids) under half the matmul rate forward. Each miss: {"id", "target",
    "measured"} (measured None where the point was not measured)."""
    n, kernel = target_n(data), set(kernel)
    out = []
    for name, r in data["results"].items():
        if name == BASELINE:
            continue
        checks = []
        if r["declared"]["time"] <= 1:
            checks.append((f">= {TARGETS['linear_forward']:g}x SDPA forward",
                           speedup(data, name, n), TARGETS["linear_forward"]))
            if data["settings"].get("backward"):
                checks.append((f">= {TARGETS['linear_fb']:g}x SDPA forward+backward",
                               speedup(data, name, n, "time_fb_s"), TARGETS["linear_fb"]))
        if name in kernel:
            checks.append((f">= {TARGETS['kernel_fraction']:g} of the matmul rate forward",
                           fraction_of_peak(data, name, n), TARGETS["kernel_fraction"]))
        out += [{"id": name, "n": n, "target": what, "measured": got}
                for what, got, bar in checks if got is None or got < bar]
    return out


def _ms(p: dict, key: str) -> str:
    t = _time(p, key)
    if t is not None:
        return f"{t * 1e3:.1f}"
    status = p.get(key.replace("time", "status").removesuffix("_s"))
    if status is None and key == "time_s":  # files before the plain/fb columns
        status = p.get("status")
    return _short({"status": status}) if status else "-"


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table_rows(data: dict, mode: str = "forward") -> tuple[list[str], list[list[str]]]:
    """A printable table of one pass (`forward`, `fb` or `decode`): plain time per n, the allocator
    columns at the longest n, peak memory per n (and the decoding state's size), fitted vs declared
    exponents, speed-up over SDPA and (for the forward pass) fraction of peak at the longest n."""
    ns = data["settings"]["ns"]
    last = ns[-1]
    infix = MODES[mode]
    allocators = data["settings"].get("allocators", [])
    pass_label = {"forward": "", "fb": " fwd+bwd", "decode": " step"}[mode]
    decode = mode == "decode"
    header = (["entry"] + [f"ms{pass_label} @{n}" for n in ns]
              + [f"{a} ms @{last}" for a in allocators]
              + [f"MiB{pass_label} @{n}" for n in ns]
              + ([f"state MiB @{n}" for n in ns] if decode else []))
    if mode in ("forward", "decode"):
        header += (["step exp (decl.)", "state exp (decl.)"] if decode
                   else ["time exp (decl.)", "mem exp (decl.)"])
    peak = mode == "forward" and matmul_flops_per_s(data) is not None
    header += [f"x SDPA{pass_label} @{last}"] + ([f"of peak @{last}"] if peak else [])
    rows = []
    for name, r in data["results"].items():
        by_n = [_point(data, name, n) for n in ns]
        ms = [_ms(p, f"time{infix}_s") for p in by_n]
        alloc = [_ms(by_n[-1], f"time{infix}_{a}_s") for a in allocators]
        mib = [f"{p[f'peak{infix}_bytes'] / 2**20:.1f}" if p.get(f"peak{infix}_bytes") is not None
               and (mode != "forward" or p.get("status", "ok") == "ok") else "-" for p in by_n]
        state = ([f"{p['state_bytes'] / 2**20:.2f}" if p.get("state_bytes") is not None else "-"
                  for p in by_n] if decode else [])
        row = [name, *ms, *alloc, *mib, *state]
        if mode in ("forward", "decode"):
            fit = {k: "-" if v is None else f"{v:.2f}" for k, v in r["fitted"].items()}
            row += [f"{fit['time']} ({r['declared']['time']})",
                    f"{fit['memory']} ({r['declared']['memory']})"]
        row.append(_fmt(speedup(data, name, last, f"time{infix}_s"), ".1f"))
        if peak:
            row.append(_fmt(fraction_of_peak(data, name, last), ".2f"))
        rows.append(row)
    return header, rows


def _short(p: dict) -> str:
    status = p.get("status") or "not run"
    return "over budget" if status.startswith("over") else status.split(":")[0]


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    worker(json.loads(sys.argv[2]))
elif __name__ == "__main__" and sys.argv[1:2] == ["matmul"]:
    matmul_worker(json.loads(sys.argv[2]))
