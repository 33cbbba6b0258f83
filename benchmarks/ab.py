"""Time entries' passes in two checkouts of the project, interleaved, to see whether a change made
any entry slower: the same timing code for both sides, so only the entries' code differs.

    python benchmarks/ab.py --base /path/to/old-checkout --n 16384 --rounds 2 --out ab.json [ids]

Each (entry, round) runs one fresh plain process per side, base first then this checkout, in the
environment the caller has (no allocator settings added): the layer is built as `zoo bench`
builds it (dim 256, 4 heads where the layer has heads, `max_len` / `max_size` raised to fit), one
warm-up pass and `--repeats` timed forward passes (no grad) each after a 64 MiB write that empties
the caches; the process prints the median. Across rounds, the ratio this / base per round gives
the change, and the two sides' own round-to-round ratios give the run-to-run spread it is judged
against. Entries missing from the base are skipped; an entry that fails on a side is recorded with
its error. Progress goes to stderr, one line per entry.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent

# Runs in the child, with the side's checkout first on sys.path. Kept to what both sides' APIs
# have had since the registry existed: zoo.registry's entry, load and accepted_keywords.
CHILD = r"""
import inspect, json, math, statistics, sys, time
import torch
from zoo.registry import accepted_keywords, entry, load

name = sys.argv[1]
n, dim, heads, repeats = map(int, sys.argv[2:6])
torch.manual_seed(0)
e, cls = entry(name), load(name)
accepted = accepted_keywords(cls)
kwargs = {"dim": dim}
if "heads" in accepted:
    kwargs["heads"] = heads
if "max_len" in accepted:
    kwargs["max_len"] = max(n, inspect.signature(cls).parameters["max_len"].default or 0)
side = round(math.sqrt(n))
if "max_size" in accepted and e.input == "image":
    kwargs["max_size"] = max(side, inspect.signature(cls).parameters["max_size"].default or 0)
layer = cls(**kwargs).eval()
x = torch.randn((1, dim, side, side) if e.input == "image" else (1, n, dim))
scratch = torch.empty((64 << 20) // 4)
times = []
with torch.no_grad():
    layer(x)
    for _ in range(repeats):
        scratch.zero_()
        start = time.perf_counter()
        layer(x)
        times.append(time.perf_counter() - start)
print(json.dumps({"time_s": statistics.median(times), "threads": torch.get_num_threads()}))
"""


def _names(root: Path) -> list[str]:
    out = subprocess.run([sys.executable, "-c", "import zoo, json; print(json.dumps(zoo.names()))"],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(root)},
                         cwd=root, timeout=120)
    if out.returncode:
        raise SystemExit(f"cannot list the entries of {root}: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout)


def _time(root: Path, name: str, args) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "LD_PRELOAD"}
    env["PYTHONPATH"] = str(root)
    try:
        out = subprocess.run([sys.executable, "-c", CHILD, name, str(args.n), str(args.dim),
                              str(args.heads), str(args.repeats)], capture_output=True, text=True,
                             env=env, cwd=root, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"over {args.timeout} s"}
    if out.returncode:
        tail = (out.stderr.strip().splitlines() or [f"exit code {out.returncode}"])[-1]
        return {"error": tail[:300]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _git(root: Path) -> str | None:
    out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or None


def summarise(rounds: list[dict]) -> dict:
    """Medians per side, the change (this / base) per round and its median, and the run-to-run
    spread: the largest of either side's max/min over its rounds."""
    base = [r["base"]["time_s"] for r in rounds if "time_s" in r["base"]]
    this = [r["this"]["time_s"] for r in rounds if "time_s" in r["this"]]
    if not base or not this:
        errors = {side: r[side]["error"] for r in rounds for side in ("base", "this") if "error" in r[side]}
        return {"errors": errors}
    ratios = [t / b for t, b in zip(this, base, strict=False)]
    spread = max(max(base) / min(base), max(this) / min(this))
    return {"base_s": statistics.median(base), "this_s": statistics.median(this),
            "ratio": statistics.median(ratios), "ratios": ratios, "spread": spread}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ids", nargs="*", help="entries (default: every entry both checkouts have)")
    ap.add_argument("--base", type=Path, required=True, help="the other checkout (the 'before')")
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--out", type=Path, required=True, help="JSON results; an existing file is resumed")
    args = ap.parse_args(argv)
    base = args.base.resolve()
    if not (base / "zoo").is_dir():
        raise SystemExit(f"--base: expected a checkout with a zoo/ package, got {base}")
    have, ours = set(_names(base)), _names(HERE)
    unknown = sorted(set(args.ids) - set(ours))
    if unknown:
        raise SystemExit(f"unknown entries: {', '.join(unknown)} (see `zoo list`)")
    names = args.ids or [n for n in ours if n in have]
    missing = [n for n in names if n not in have]
    if missing:
        print(f"not in the base, skipped: {', '.join(missing)}", file=sys.stderr)
    data = json.loads(args.out.read_text()) if args.out.exists() else {}
    data.setdefault("entries", {})
    data["settings"] = {"n": args.n, "dim": args.dim, "heads": args.heads, "repeats": args.repeats,
                        "rounds": args.rounds, "pass": "forward, no grad",
                        "base": {"path": str(base), "commit": _git(base)},
                        "this": {"path": str(HERE), "commit": _git(HERE)}}
    data["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(),
                       "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    todo = [n for n in names if n in have]
    for i, name in enumerate(todo, 1):
        rounds = data["entries"].get(name, {}).get("rounds", [])
        while len(rounds) < args.rounds:
            rounds.append({"base": _time(base, name, args), "this": _time(HERE, name, args)})
            data["entries"][name] = {"rounds": rounds, **summarise(rounds)}
            args.out.write_text(json.dumps(data, indent=1) + "\n")
        s = data["entries"][name]
        shown = (f"this/base {s['ratio']:.2f} (spread {s['spread']:.2f})" if "ratio" in s
                 else f"failed: {s['errors']}")
        print(f"[{i}/{len(todo)}] {name}: {shown}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
