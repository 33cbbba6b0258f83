"""The Compatibility page and the entry pages' "PyTorch features" section, from the committed run
of `zoo.verify.compat` (`python -m zoo compat --out benchmarks/compat.json`).

A cell is one of: works; fails, with what failed (a defect to fix, or a feature the entry's
catalogue card lists as `unsupported`, with its reason); not applicable (DDP is run for the entries
whose training updates buffers, the only ones where ranks can drift); not measured (a column the
run has not reached, such as inductor for an entry added since). Nothing is left out silently.
"""

from __future__ import annotations

from zoo.catalog import Entry
from zoo.verify.compat import SPEED as SPEED_SETTINGS

# Column -> (heading, what the check does); the order of the table.
COLUMNS = {
    "train-backward": ("train", "forward and backward in train mode, every gradient finite"),
    "compile": ("compile", "torch.compile (backend aot_eager: dynamo and AOT autograd) matches eager, "
                           "output and input gradient, float64, and on a second input"),
    "inductor": ("inductor", "torch.compile with the default backend (generated C++ kernels) matches "
                             "eager"),
    "export": ("export", "torch.export.export, then the program matches eager on a new input"),
    "meta": ("meta", "built and run on the meta device, every parameter and buffer there"),
    "autocast-bf16": ("bf16", "forward and backward under bf16 autocast on the CPU, finite, near "
                              "float32"),
    "functional-call": ("func", "torch.func.functional_call with other parameters equals the layer "
                                "with them loaded"),
    "vmap": ("vmap", "torch.func.vmap over inputs equals a loop"),
    "jit-trace": ("trace", "torch.jit.trace matches eager on a new input"),
    "state-dict": ("state", "deepcopy and a state_dict round trip give the same output"),
    "ddp": ("DDP", "2 processes, gloo on loopback, different data per rank: parameters and "
                   "buffers equal on both ranks after 3 steps"),
}


def _listed(e: Entry) -> dict[str, str]:
    return dict(e.unsupported or {})


def cell_state(e: Entry, row: dict | None, column: str) -> tuple[str, str]:
    """(state, detail): state one of "ok", "unsupported", "fails", "n/a", "not measured"."""
    feature = "compile" if column == "inductor" else column
    cell = (row or {}).get(column)
    if cell is None:
        if column == "ddp" and row is not None and any(c in row for c in COLUMNS if c != "ddp"):
            return "n/a", "run only for entries whose training updates buffers"
        return "not measured", ""
    if cell["ok"]:
        return "ok", ""
    if feature in _listed(e):
        return "unsupported", _listed(e)[feature]
    return "fails", cell.get("why", "")


MARK = {"ok": "yes", "unsupported": "no (by nature)", "fails": "**fails**", "n/a": "-",
        "not measured": "not measured"}


def _measured_line(data: dict) -> str:
    m = data.get("machine", {})
    date = m.get("date", "")[:10] or "an undated run"
    return (f"Measured on {date}: torch {m.get('torch', '?')}, {m.get('cpus', '?')} CPUs, "
            f"{m.get('threads', '?')} torch thread(s); dim 32, batch 2, n = 21 (no block multiple, "
            "so the padding paths are in the graph), float64 except bf16 and meta. The file is "
            "`benchmarks/compat.json`; `python -m zoo compat --out benchmarks/compat.json` "
            "re-measures (cells already there are kept: delete one to measure it again), and the "
            "test suite checks it against the catalogue." + _updates_text(data))


def _updates_text(data: dict) -> str:
    """The re-measurements recorded in the file (`updates`: date, ids, columns, load, reason)."""
    out = ""
    for u in data.get("updates", []):
        cols = u["columns"] if isinstance(u["columns"], str) else ", ".join(u["columns"])
        load = u.get("load")
        out += (f" Re-measured on {u['date'][:10]} ({cols}; load average "
                f"{load[0] if load else '?'}): {', '.join(u['ids'])}, {u['reason']}.")
    return out


def _speed(row: dict | None) -> dict | None:
    cell = (row or {}).get("speed")
    return cell if cell and cell.get("ok") else None


def _speed_reason(cell: dict) -> str:
    """What was measured to cost the compiled layer its time."""
    breaks = cell.get("graph_breaks", 0)
    if breaks:
        return (f"{breaks} graph break(s): dynamo splits the forward where Python decides from "
                "values or calls what it cannot trace, and runs eager code with guards between the "
                "graphs")
    return ("one graph, no break: inductor's generated code for this layer is slower than eager's "
            "library kernels at this size")


def _earlier(cell: dict) -> list[dict]:
    """The earlier measurements a speed cell keeps (`earlier`, oldest first; `first_run` in files
    written before there could be more than one)."""
    return list(cell.get("earlier", [])) or ([cell["first_run"]] if cell.get("first_run") else [])


def _direction_changed(cell: dict) -> bool:
    runs = [*_earlier(cell), cell]
    return len({r["compiled_s"] > r["eager_s"] for r in runs}) > 1


def speed_section(entries: list[Entry], data: dict) -> list[str]:
    """Compiled against eager, from the `speed` cells: the table, then every slower entry and why."""
    rows = data.get("rows", {})
    s = SPEED_SETTINGS
    out = ["## Compiled against eager", "",
           f"The forward pass without gradients at n = {s['n']} (image entries on a 45 x 45 grid), "
           f"dim {s['dim']}, {s['heads']} heads, batch 1: median of {s['repeats']} passes after "
           "warm-up, eager and `torch.compile` (inductor, after it has compiled), in one process with "
           "torch's default threads. A measurement, not a test.", ""]
    measured = [(e, c) for e in entries if (c := _speed(rows.get(e.id)))]
    if not measured:
        return out + ["Not measured yet (`python -m zoo compat --out benchmarks/compat.json`).", ""]
    slower = [(e, c) for e, c in measured if c["compiled_s"] > c["eager_s"]]
    out += [f"Compiled is faster for {len(measured) - len(slower)} of {len(measured)} measured "
            f"entries and slower for {len(slower)}.", "",
            "| entry | eager (ms) | compiled (ms) | compiled / eager | graph breaks |",
            "| --- | --- | --- | --- | --- |"]
    for e, c in sorted(measured, key=lambda ec: ec[1]["compiled_s"] / ec[1]["eager_s"]):
        out.append(f"| [{e.display_name}](entries/{e.id}.md) | {c['eager_s'] * 1e3:.1f} | "
                   f"{c['compiled_s'] * 1e3:.1f} | {c['compiled_s'] / c['eager_s']:.2f} | "
                   f"{c.get('graph_breaks', 0)} |")
    if slower:
        out += ["", "Slower compiled, and what was measured to cost the time:", ""]
        out += [f"- [{e.display_name}](entries/{e.id}.md): {_speed_reason(c)}." for e, c in slower]
    unsettled = [(e, c) for e, c in measured if _direction_changed(c)]
    if unsettled:
        out += ["", "Not settled: these entries were measured more than once, and compiled was "
                "faster in some runs and slower in others (the load average at each run in "
                "brackets; the table shows the last run), so their ratio depends on what else the "
                "machine runs:", "",
                "| entry | runs: eager / compiled (ms), oldest first |", "| --- | --- |"]
        for e, c in unsettled:
            runs = [*_earlier(c), c]
            out.append(f"| [{e.display_name}](entries/{e.id}.md) | "
                       + "; ".join(f"{r['eager_s'] * 1e3:.1f} / {r['compiled_s'] * 1e3:.1f}"
                                   + (f" ({r['load'][0]})" if r.get("load") else "") for r in runs)
                       + " |")
    return out + [""]


def compat_page(entries: list[Entry], data: dict | None) -> str:
    """The gathered page: every entry by every feature, then every failure with its reason."""
    out = ["---", "hide: [navigation]", "---", "", "# Compatibility with PyTorch's features", "",
           "Before you choose an entry: does it train, compile, export, build on the meta device "
           "and run under DDP? Each cell is a check run on the layer, not a promise.", ""]
    out += [f"- **{head}**: {what}." for head, what in COLUMNS.values()]
    out.append("")
    if not data:
        return "\n".join(out + ["No run is committed yet (`benchmarks/compat.json`).", ""])
    out += [_measured_line(data), ""]
    rows = data.get("rows", {})
    states = {e.id: {c: cell_state(e, rows.get(e.id), c) for c in COLUMNS} for e in entries}
    counts = {c: sum(s[c][0] == "ok" for s in states.values()) for c in COLUMNS}
    applies = {c: sum(s[c][0] not in ("n/a", "not measured") for s in states.values()) for c in COLUMNS}
    out += ["Works: " + ", ".join(f"{COLUMNS[c][0]} {counts[c]} of {applies[c]}" for c in COLUMNS)
            + " (of the entries where the check applies and was run).", ""]
    out += ["| entry | " + " | ".join(h for h, _ in COLUMNS.values()) + " |",
            "| --- |" + " --- |" * len(COLUMNS)]
    for e in entries:
        cells = [MARK[states[e.id][c][0]] for c in COLUMNS]
        out.append(f"| [{e.display_name}](entries/{e.id}.md) | " + " | ".join(cells) + " |")
    out += ["", "## What fails, and why", ""]
    failures = [(e, c, *states[e.id][c]) for e in entries for c in COLUMNS
                if states[e.id][c][0] in ("fails", "unsupported")]
    if not failures:
        out.append("Nothing: every check that applies works for every entry.")
    for e, c, state, why in failures:
        kind = "not supported by the mechanism" if state == "unsupported" else "a defect, to fix"
        out.append(f"- [{e.display_name}](entries/{e.id}.md), {COLUMNS[c][0]} ({kind}): {why}")
    return "\n".join(out + [""] + speed_section(entries, data))


def entry_compat(e: Entry, data: dict | None) -> str:
    """The entry page's section: what works, what does not and why."""
    if not data:
        return ""
    row = data.get("rows", {}).get(e.id)
    states = {c: cell_state(e, row, c) for c in COLUMNS}
    works = [COLUMNS[c][0] for c, (s, _) in states.items() if s == "ok"]
    out = ["## PyTorch features", "",
           "Works: " + (", ".join(works) if works else "none measured") + ". "
           "All entries: [Compatibility](../compat.md).", ""]
    for c, (state, why) in states.items():
        if state in ("fails", "unsupported"):
            kind = "not supported by the mechanism" if state == "unsupported" else "fails (a defect)"
            out.append(f"- {COLUMNS[c][0]}, {kind}: {why}")
        elif state == "not measured":
            out.append(f"- {COLUMNS[c][0]}: not measured yet")
    speed = _speed(row)
    if speed:
        ratio = speed["compiled_s"] / speed["eager_s"]
        line = (f"- Compiled (inductor) against eager, forward at n = {speed['n']}: "
                f"{speed['compiled_s'] * 1e3:.1f} ms against {speed['eager_s'] * 1e3:.1f} ms "
                f"({ratio:.2f}x the time)")
        out.append(line + (f"; slower, {_speed_reason(speed)}." if ratio > 1 else "."))
    return "\n".join(out + [""])
