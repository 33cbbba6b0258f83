"""The Compatibility page and the entry pages' "PyTorch features" section, from the committed run
of `zoo.verify.compat` (`python -m zoo compat --out benchmarks/compat.json`).

A cell is one of: works; fails, with what failed (a defect to fix, or a feature the entry's
catalogue card lists as `unsupported`, with its reason); not applicable (DDP is run for the entries
whose training updates buffers, the only ones where ranks can drift); not measured (a column the
run has not reached, such as inductor for an entry added since). Nothing is left out silently.
"""

from __future__ import annotations

from zoo.catalog import Entry

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
            "test suite checks it against the catalogue.")


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
    return "\n".join(out + [""])


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
    return "\n".join(out + [""])
