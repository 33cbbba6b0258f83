"""The `zoo` command (also `python -m zoo`): list, show and check catalogue entries."""

from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path

from zoo.catalog import PLACEHOLDER, CatalogError, Entry, catalog, load_catalog


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


class CliError(Exception):
    """A one-line error for the user (printed as `error: ...`, exit status 1)."""


def _select(cat: dict[str, Entry], ids: list[str]) -> list[str]:
    """The ids asked for, in catalogue order (all when none are given); an unknown one is an error
    listing close matches, never silently skipped."""
    import difflib

    wanted = [i.strip().lower().replace("_", "-") for i in ids]
    unknown = [asked for asked, key in zip(ids, wanted, strict=True) if key not in cat]
    if unknown:
        parts = []
        for asked in unknown:
            close = difflib.get_close_matches(asked.lower().replace("_", "-"), list(cat), n=3,
                                              cutoff=0.5)
            parts.append(f"{asked!r}" + (f" (did you mean {', '.join(map(repr, close))}?)"
                                         if close else ""))
        raise CliError(f"no catalogue entry named {', '.join(parts)}; `zoo list` shows all "
                       f"{len(cat)}")
    return [i for i in cat if not ids or i in wanted]


def _import_entry(e: Entry) -> None:
    """Import the entry's module, turning any exception it raises into a one-line error that
    names the entry's file and the line where it was raised."""
    import importlib
    import traceback

    try:
        importlib.import_module(e.module)
    except Exception as err:  # noqa: BLE001 - whatever the module raises, say where
        line = getattr(err, "lineno", None) if isinstance(err, SyntaxError) else None
        for frame in traceback.extract_tb(err.__traceback__):
            if Path(frame.filename).resolve() == e.source.resolve():
                line = frame.lineno
        where = f"{e.source}:{line}" if line else str(e.source)
        message = " ".join(str(err).split())
        raise CliError(f"{where}: the module of {e.id} raises on import: "
                       f"{type(err).__name__}: {message}") from None


def _yes_no(value: str) -> bool:
    if value.lower() in ("yes", "true", "1", "y"):
        return True
    if value.lower() in ("no", "false", "0", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected yes or no, got {value!r}")


def cmd_list(args) -> int:
    from zoo.registry import names

    ids = names(args.pattern, family=args.family, autoregressive=args.autoregressive)
    cat = catalog()
    rows = [[i, cat[i].family, cat[i].input, cat[i].complexity["time"],
             "yes" if cat[i].autoregressive else "no"] for i in ids]
    print(_table(rows, ["id", "family", "input", "time", "autoregressive"]))
    print(f"\n{len(ids)} of {len(cat)} entries")
    return 0


def cmd_show(args) -> int:
    from zoo.registry import entry, load
    from zoo.site.pages import settings_note, usage

    e = entry(args.id)
    _import_entry(e)
    cls = load(e.id)
    sig = inspect.signature(cls.__init__)
    params = ", ".join(str(p) for n, p in sig.parameters.items() if n != "self")
    cites = f"{e.citations['count']} (as of {e.citations['as_of']})" if e.citations else "n/a"
    fields = [
        ("id", e.id), ("title", e.title), ("authors", ", ".join(e.authors)),
        ("venue", f"{e.venue} ({e.year})"), ("paper", e.paper), ("code", e.code or "none public"),
        ("family", e.family), ("input", e.input),
        ("time", e.complexity["time"]), ("memory", e.complexity["memory"]),
        ("scaling", f"time n^{e.scaling['time']}, memory n^{e.scaling['memory']}"),
        ("autoregressive", "yes" if e.autoregressive else "no"),
        ("masking", "yes" if e.masking else "no"), ("citations", cites),
        ("idea", " ".join(e.idea.split())), ("notes", " ".join(e.notes.split()) or "none"),
        ("layer", f"{e.module}.{cls.__name__}({params})"),
        ("settings", f"the usage below uses {settings_note(e)}"),
        ("source", str(e.source)),
    ]
    width = max(len(k) for k, _ in fields)
    for k, v in fields:
        print(f"{k.rjust(width)}  {v}")
    # the same snippet the entry's page shows and the tests run
    print(f"{'usage'.rjust(width)}  " + usage(e).replace("\n", "\n" + " " * (width + 2)))
    return 0


def _docstring_problems(e: Entry) -> list[str]:
    import importlib

    doc = importlib.import_module(e.module).__doc__ or ""
    problems = []
    if "$$" not in doc:
        problems.append(f"{e.source}:1: the module docstring has no $$ formula$$ block")
    if "Deviations from the paper" not in doc:
        problems.append(f"{e.source}:1: the module docstring does not state its deviations "
                        "('Deviations from the paper: ...', or 'none')")
    return problems


def _placeholders(e: Entry) -> list[str]:
    from zoo.catalog import catalog_path
    from zoo.scaffold import placeholders

    out = []
    for key in ("title", "authors", "venue", "paper", "idea", "formula", "complexity", "notes"):
        if PLACEHOLDER in str(getattr(e, key)):
            line = e.key_lines.get(key, e.line)
            out.append(f"{catalog_path()}:{line}: {e.id}: key {key!r} still holds the "
                       f"{PLACEHOLDER} placeholder; fill it in")
    test = catalog_path().parent / "tests" / "entries" / f"test_{e.source.stem}.py"
    for path in (e.source, test):
        out += [f"{path}:{n}: placeholder left: {text}" for n, text in placeholders(path)]
    return out


SHADES = " .:-=+*#%@"


def cmd_pattern(args) -> int:
    from zoo.registry import entry
    from zoo.site.figures import pattern_maps, pattern_png

    e = entry(args.id)
    _import_entry(e)
    if args.causal and not e.autoregressive:
        print(f"error: {e.id} is not autoregressive; it has no causal pattern", file=sys.stderr)
        return 1
    maps = pattern_maps(e, n=args.n)
    for title, m in maps:
        if ("causal" in title) != args.causal:
            continue
        m = m / m.amax(dim=1, keepdim=True).clamp(min=1e-30)
        print(f"{e.id}: {title} (rows: outputs i, columns: inputs j; each row scaled to its max)")
        for row in m.sqrt().tolist():  # square root, so weak links still show
            print("".join(SHADES[min(int(v * len(SHADES)), len(SHADES) - 1)] * 2 for v in row))
    if args.out:
        args.out.write_bytes(pattern_png(e))
        print(f"wrote {args.out}")
    return 0


def cmd_new(args) -> int:
    from zoo.catalog import catalog_path
    from zoo.scaffold import new_entry

    root = catalog_path().parent
    if not (root / "zoo" / "entries").is_dir():
        print("error: zoo new works in a clone of the repository (zoo/entries/ not found)",
              file=sys.stderr)
        return 1
    from zoo.scaffold import suggested_test_command

    try:
        written = new_entry(root, args.id, title=args.title, arxiv=args.arxiv, family=args.family)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        print(f"error: cannot write the new entry's files: {err.strerror or err} "
              f"({err.filename or root})", file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {path}")
    print(f"\nnext: fill every TODO, then `zoo check {args.id}` and `{suggested_test_command(args.id)}`; "
          "see the Contributing page.")
    return 0


def cmd_check(args) -> int:
    from zoo.verify.claims import quick_claims
    from zoo.verify.contract import run_contract

    try:
        cat = load_catalog(args.catalog) if args.catalog else catalog()
    except CatalogError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    ids = _select(cat, args.ids)
    print(f"catalogue: {len(cat)} entries, schema ok")
    failed = 0
    for i in ids:
        e = cat[i]
        problems = _placeholders(e)  # named first: a placeholder often is why the layer fails
        try:
            problems += _docstring_problems(e)
            if not args.schema_only:
                problems += [f"{e.source}: contract {p}" for p in run_contract(e)]
                problems += [f"{e.source}: claim {p}" for p in quick_claims(e)]
        except Exception as err:  # noqa: BLE001 - report, do not crash the whole check
            problems.append(f"{e.source}: cannot load the layer: {type(err).__name__}: {err}")
        failed += bool(problems)
        print(f"{'FAIL' if problems else 'ok  '} {i}")
        for p in problems:
            print(f"     {p}")
    print(f"\n{len(ids) - failed} passed, {failed} failed")
    return 1 if failed else 0


def cmd_claims(args) -> int:
    from zoo.verify.claims import HEADERS, claims_report, report_cells
    from zoo.verify.progress import progress_bar

    cat = catalog()
    ids = _select(cat, args.ids)
    with progress_bar(len(ids), "measuring claims") as step:
        rows = claims_report([cat[i] for i in ids], progress=step)
    mark = {True: "held", False: "NOT HELD", None: ""}
    table, broken = [], 0
    for row in rows:
        cells = report_cells(row)
        broken += any(held is False for _, held in cells)
        table.append([row["id"], *(f"{text} [{mark[held]}]" if held is not None else text
                                   for text, held in cells)])
    print(_table(table, list(HEADERS)))
    peaked = [(r["id"], r["approximation"]) for r in rows if (r.get("approximation") or {}).get("peaked")]
    if peaked:
        t = peaked[0][1]["peaked"]["temperature"]
        print(f"\nOn peaked inputs (queries divided by {t}: softmax far from uniform), at the default "
              "budget, beside the same baselines:")
        for i, a in peaked:
            p = a["peaked"]
            print(f"  {i}: {p['error']:.3f} at {a['param']}={a['default']} "
                  f"(uniform averaging {p['uniform']:.3f}, zeros {p['zeros']:.3f})")
    print(f"\n{len(rows) - broken} entries keep every claim, {broken} do not")
    return 1 if broken else 0


def cmd_bench(args) -> int:
    import json

    from zoo.verify import bench
    from zoo.verify.progress import progress_bar

    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("error: --device cuda, but torch sees no CUDA device", file=sys.stderr)
            return 1
    names = bench.resolve_names(args.ids)
    previous = None
    if args.update:
        if not args.out or not args.out.is_file() or not args.ids:
            print("error: --update re-measures the named entries into an existing --out file; "
                  f"got ids {args.ids or 'none'} and --out {args.out}", file=sys.stderr)
            return 1
        previous = json.loads(args.out.read_text())
        if not args.reason.strip():
            print("error: --update needs --reason: why these entries are measured again",
                  file=sys.stderr)
            return 1
    if args.decode:  # inference steps: no backward pass, plain process only
        refused = [i for i in names if not catalog()[i].autoregressive]
        if args.ids and refused:
            print(f"error: --decode needs autoregressive entries; not autoregressive: "
                  f"{', '.join(refused)}", file=sys.stderr)
            return 1
        names = [i for i in names if i not in refused]
    what = "decoding one token after" if args.decode else "benchmarking at"
    with progress_bar(len(names) + 1, f"{what} n = {args.n}") as step:
        data = bench.run(names, ns=args.n, dim=args.dim, heads=args.heads, backward=args.backward,
                         repeats=args.repeats, device=args.device, threads=args.threads,
                         max_time=args.max_time, max_mem=args.max_mem * 2**20,
                         allocators=args.allocators, decode=args.decode, progress=step)
    m, envs = data["machine"], data["settings"]["environments"]
    mode = ("one decoding step after n - 1 tokens (exponents: step, state)" if args.decode
            else "times in the plain process, "
            + ", ".join(f"{k}: {envs[k]['label']}" for k in data["settings"]["allocators"]))
    print(f"{m['processor']}, {m['cpus']} cpus, torch {m['torch']}, {m['threads']} threads, "
          f"float32 matmul {m['matmul']['flops_per_s'] / 1e9:.0f} GFLOP/s; dim {args.dim}, "
          f"{args.heads} heads; {mode}")
    passes = ["decode"] if args.decode else ["forward", "fb"] if args.backward else ["forward"]
    for pass_ in passes:
        header, rows = bench.table_rows(data, pass_)
        print(f"\n{ {'forward': 'forward', 'fb': 'forward + backward', 'decode': 'decoding'}[pass_] }")
        print(_table(rows, header))
    if previous is not None:
        try:
            data = bench.update(previous, data, [n for n in names if n != bench.BASELINE], args.reason)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(data, indent=1) + "\n")
        print(f"\n{'updated' if previous is not None else 'wrote'} {args.out}")
    return 0


def cmd_quality(args) -> int:
    from zoo.verify import quality
    from zoo.verify.bench import resolve_names

    names = resolve_names(args.ids)
    recipe = quality.Recipe(threads=args.threads, **({"seed": args.seed} if args.seed is not None else {}))
    try:
        cells = quality.resolve_cells(args.cells)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
    try:
        data = quality.run(names, cells=cells, out=args.out, recipe=recipe, jobs=args.jobs,
                           ray_address=args.ray)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    table = quality.summary(data)
    rows = [[n] + [f"{table.get(n, {}).get(c, {}).get('accuracy', float('nan')):.3f}" for c in cells]
            for n in names]
    print(_table(rows, ["entry", *cells]))
    if args.out:
        print(f"\nwrote {args.out}")
    return 0


def cmd_compat(args) -> int:
    import json

    from zoo.verify import compat
    from zoo.verify.progress import progress_bar

    cat = catalog()
    ids = _select(cat, args.ids)
    columns = [c for c in compat.COLUMNS if c not in compat.SLOW_COLUMNS or not args.no_inductor]
    previous = json.loads(args.out.read_text()) if args.out and args.out.is_file() else None

    def save(data):
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(data, indent=1) + "\n")

    passes = 1 + sum(c in columns for c in compat.SLOW_COLUMNS)
    with progress_bar(passes * len(ids), "compatibility") as step:
        data = compat.table([cat[i] for i in ids], columns=columns, previous=previous,
                            progress=step, save=save)
    def mark(cell: dict | None, column: str) -> str:
        if cell is None:
            return "-"
        if column == "speed" and cell["ok"]:  # compiled time over eager time
            return f"{cell['compiled_s'] / cell['eager_s']:.2f}x"
        return "yes" if cell["ok"] else "NO"

    rows = [[i, *(mark(r.get(c), c) for c in columns)] for i, r in data["rows"].items() if i in ids]
    print(_table(rows, ["entry", *columns]))
    if args.out:
        print(f"\nwrote {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zoo", description="The attention zoo's catalogue.")
    sub = p.add_subparsers(dest="command", required=True)

    ls = sub.add_parser("list", help="a table of the entries")
    ls.add_argument("pattern", nargs="?", default="*", help="fnmatch pattern on ids (default *)")
    ls.add_argument("--family", help="only this family")
    ls.add_argument("--autoregressive", type=_yes_no, metavar="yes|no")
    ls.set_defaults(run=cmd_list)

    show = sub.add_parser("show", help="one entry's card, source and usage")
    show.add_argument("id")
    show.set_defaults(run=cmd_show)

    new = sub.add_parser("new", help="scaffold a new entry: catalogue stub, entry file, test file")
    new.add_argument("id", help="kebab-case id, e.g. sigmoid-attention")
    new.add_argument("--title", required=True, help="the paper's exact title")
    new.add_argument("--arxiv", help="arXiv id, e.g. 2409.04431")
    new.add_argument("--family", default="kernel", help="taxonomy family (default kernel)")
    new.set_defaults(run=cmd_new)

    check = sub.add_parser("check", help="validate the catalogue and every layer's contract")
    check.add_argument("ids", nargs="*", help="only these entries (default: all)")
    check.add_argument("--catalog", type=Path, help="check this catalogue file instead")
    check.add_argument("--schema-only", action="store_true", help="skip the layer contract")
    check.set_defaults(run=cmd_check)
    bench = sub.add_parser("bench", help="time and peak memory of entries against SDPA")
    bench.add_argument("ids", nargs="*", help="entry ids or globs (default: all)")
    bench.add_argument("--n", type=int, nargs="+", default=[1024, 4096, 16384],
                       help="sequence lengths, or pixel counts for image entries")
    bench.add_argument("--dim", type=int, default=256)
    bench.add_argument("--heads", type=int, default=4)
    bench.add_argument("--backward", action=argparse.BooleanOptionalAction, default=True,
                       help="also time forward + backward, and its peak memory (default: yes)")
    bench.add_argument("--decode", action="store_true",
                       help="time one decoding step (layer.step on one token) after a context of "
                            "n - 1 tokens, for the autoregressive entries, beside SDPA with a KV cache")
    bench.add_argument("--allocators", nargs="*", default=["tuned", "preload"],
                       choices=["tuned", "preload"],
                       help="timing columns beside the plain process: glibc tuned, and a caching "
                            "allocator (jemalloc, tcmalloc) preloaded where ldconfig finds one")
    bench.add_argument("--repeats", type=int, default=5, help="timed passes after a warm-up")
    bench.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    bench.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    bench.add_argument("--max-time", type=float, default=60.0, metavar="SECONDS",
                       help="skip a length whose one pass would take longer (default 60)")
    bench.add_argument("--max-mem", type=float, default=8192, metavar="MIB",
                       help="skip a length whose peak would exceed this (default 8192)")
    bench.add_argument("--out", type=Path, help="write the results as JSON")
    bench.add_argument("--update", action="store_true",
                       help="re-measure the named entries into the existing --out file (same "
                       "settings), recorded in it with the date and --reason")
    bench.add_argument("--reason", default="", help="with --update: why the entries are measured again")
    bench.set_defaults(run=cmd_bench)

    qual = sub.add_parser("quality", help="train every entry on associative recall (MQAR)")
    qual.add_argument("ids", nargs="*", help="entry ids or globs (default: all)")
    qual.add_argument("--cells", nargs="+", metavar="CELL",
                      help="grid cells (default: all; see zoo.tasks.CELLS)")
    qual.add_argument("--out", type=Path, help="results JSON: written after every job, resumed from")
    qual.add_argument("--jobs", type=int, default=1, help="local worker processes (default 1)")
    qual.add_argument("--ray", metavar="ADDRESS", help="run the jobs on this Ray cluster "
                      "(needs the ray extra)")
    qual.add_argument("--threads", type=int, default=1, help="torch threads per job (default 1)")
    qual.add_argument("--seed", type=int, help="training and data seed (default 0)")
    qual.set_defaults(run=cmd_quality)

    pattern = sub.add_parser("pattern", help="an entry's attention pattern, drawn in the terminal")
    pattern.add_argument("id")
    pattern.add_argument("--causal", action="store_true", help="the causal pattern")
    pattern.add_argument("--n", type=int, default=24, help="sequence length (default 24)")
    pattern.add_argument("--out", type=Path, help="also write the picture the site shows (PNG)")
    pattern.set_defaults(run=cmd_pattern)

    compat = sub.add_parser("compat", help="which PyTorch features each entry supports (compile, "
                            "export, meta, autocast, torch.func, jit.trace, DDP)")
    compat.add_argument("ids", nargs="*", help="only these entries (default: all)")
    compat.add_argument("--no-inductor", action="store_true",
                        help="skip the inductor and speed columns (minutes per entry); compile "
                        "still runs with aot_eager")
    compat.add_argument("--out", type=Path, help="write (or update) the results as JSON, e.g. "
                        "benchmarks/compat.json")
    compat.set_defaults(run=cmd_compat)

    claims = sub.add_parser("claims", help="measure every catalogue claim (cached: .cache/ in a "
                            "checkout, else the user's cache folder)")
    claims.add_argument("ids", nargs="*", help="only these entries (default: all)")
    claims.set_defaults(run=cmd_claims)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status = args.run(args)
        sys.stdout.flush()  # inside the try: a closed pipe fails here, not at interpreter exit
        return status
    except (LookupError, CatalogError, CliError) as err:
        print(f"error: {err.args[0] if err.args else err}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader went away (`zoo pattern ... | head`): stop quietly, as Unix tools do. Point
        # stdout at /dev/null so the interpreter's final flush does not fail again.
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
