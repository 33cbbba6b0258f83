"""The measured numbers of every entry in one place: the "Which one?" page (picks by a stated rule,
the headline trade-off) and the comparison table (sortable, filterable, side by side; see
docs/assets/compare.js). Read from the committed benchmarks/results.json and quality.json and
the claims report; nothing here is copied from a paper."""

from __future__ import annotations

import html
import math
from collections.abc import Callable
from dataclasses import dataclass

from zoo.catalog import Entry
from zoo.site.pages import themed_figure
from zoo.site.quality import cell_names, recall_score, speedups
from zoo.verify.claims import report_cells

AT_N = 16384


@dataclass(frozen=True)
class Numbers:
    """One entry's measured numbers (None where not measured)."""

    id: str
    time_ms: float | None  # forward time at AT_N
    peak_mib: float | None  # peak memory at AT_N
    speedup: float | None  # SDPA's time / this entry's time at AT_N
    memory_ratio: float | None  # this entry's peak / SDPA's peak at AT_N
    recall: float | None
    exact: bool
    error: float | None  # approximation error at the default budget, random inputs
    uniform: float | None  # uniform averaging's error on the same inputs
    peaked_error: float | None
    claims_held: int
    claims_total: int


def _point(bench: dict | None, name: str, n: int = AT_N) -> dict | None:
    for p in ((bench or {}).get("results", {}).get(name) or {}).get("points", []):
        if p["n"] == n and p.get("status") == "ok":
            return p
    return None


def measured(entries: list[Entry], rows: dict[str, dict], bench: dict | None,
             quality: dict | None) -> dict[str, Numbers]:
    from zoo.verify.quality import summary

    speed = speedups(bench, AT_N)
    base = _point(bench, "sdpa")
    table, cells = (summary(quality), cell_names(quality)) if quality else ({}, [])
    out = {}
    for e in entries:
        p, row = _point(bench, e.id), rows.get(e.id) or {}
        approx = row.get("approximation") or {}
        held = [h for _, h in report_cells(row) if h is not None] if row else []
        out[e.id] = Numbers(
            id=e.id,
            time_ms=p["time_s"] * 1e3 if p else None,
            peak_mib=p["peak_bytes"] / 2**20 if p and p.get("peak_bytes") else None,
            speedup=speed.get(e.id),
            memory_ratio=(p["peak_bytes"] / base["peak_bytes"] if p and base and p.get("peak_bytes")
                          and base.get("peak_bytes") else None),
            recall=recall_score(table.get(e.id, {}), cells) if table.get(e.id) else None,
            exact=bool((row.get("exact") or {}).get("held")),
            error=(approx.get("random") or {}).get("error"),
            uniform=(approx.get("random") or {}).get("uniform"),
            peaked_error=(approx.get("peaked") or {}).get("error"),
            claims_held=sum(bool(h) for h in held), claims_total=len(held))
    return out


def headline(nums: dict[str, Numbers]) -> tuple[int, int, int]:
    """(entries measured at AT_N, how many need more peak memory than SDPA, how many are faster)."""
    both = [x for x in nums.values() if x.speedup is not None and x.memory_ratio is not None]
    return (len(both), sum(x.memory_ratio > 1 for x in both),  # type: ignore[operator]
            sum(x.speedup > 1 for x in both))  # type: ignore[operator]


def pick(candidates: list[Entry], nums: dict[str, Numbers]) -> list[Numbers]:
    """THE RULE: among the candidates measured at AT_N, keep those faster than SDPA (all of them
    when none is); rank by recall (unmeasured last), then by peak memory, then by speed-up."""
    have = [nums[e.id] for e in candidates if nums[e.id].speedup is not None]
    fast = [x for x in have if x.speedup > 1] or have  # type: ignore[operator]
    return sorted(fast, key=lambda x: (-(x.recall if x.recall is not None else -1),
                                       x.peak_mib if x.peak_mib is not None else math.inf,
                                       -(x.speedup or 0), x.id))


RULE = (f"among the entries that fit the need and were measured at n = {AT_N}, keep those faster "
        "than the SDPA layer there (all of them when none is); rank by recall (unmeasured last), "
        "then by lower peak memory, then by higher speed-up. The first is the pick.")


def _f(x: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)


def _sources(bench: dict | None, quality: dict | None) -> str:
    parts = []
    if bench:
        m = bench["machine"]
        parts.append(f"speed and peak memory from `benchmarks/results.json` ({m['cpus']} CPUs, "
                     f"torch {m['torch']}, measured {m['date'][:10]}, forward pass, dim "
                     f"{bench['settings']['dim']}, batch 1)")
    if quality:
        last = max((x.get("date", "") for x in quality["runs"].values()), default="-")[:10]
        parts.append(f"recall from `benchmarks/quality.json` (MQAR, last job {last}; see "
                     "[Quality](quality.md))")
    parts.append("exactness and approximation errors from the claims measured at build time "
                 "(the [claims table](index.md#claims))")
    return "; ".join(parts)


NEEDS: list[tuple[str, str, Callable[[Entry], bool]]] = [
    ("Causal language modelling on long contexts", "autoregressive sequence entries",
     lambda e: e.input == "sequence" and e.autoregressive),
    ("Bidirectional encoders with padding", "sequence entries that honour a padding mask",
     lambda e: e.input == "sequence" and e.masking),
    ("Images and feature maps", "image entries",
     lambda e: e.input == "image"),
]


def choose_page(entries: list[Entry], rows: dict[str, dict], quality: dict | None = None,
                bench: dict | None = None) -> str:
    nums = measured(entries, rows, bench, quality)
    by_id = {e.id: e for e in entries}
    total, more_memory, faster = headline(nums)
    base = _point(bench, "sdpa")
    out = ["# Which one should I use?", "",
           f"Every number here is measured on this project's harness: {_sources(bench, quality)}. "
           "The [comparison table](compare.md) has all of them, sortable.", ""]
    if total and base:
        out += [f"**The trade-off, from the data**: at n = {AT_N}, {faster} of the {total} measured "
                f"entries are faster than a layer on torch's fused SDPA kernel "
                f"({_f(base['time_s'] * 1e3, '{:.0f}')} ms), but {more_memory} of {total} need more "
                f"peak memory than it ({_f(base['peak_bytes'] / 2**20, '{:.0f}')} MiB): the fused kernel "
                "never stores the n x n matrix, while the references are plain PyTorch and keep "
                "their intermediates."
                + (" On memory, SDPA is the one to beat." if more_memory > total / 2 else ""), ""]
    out += [f"**How the picks are made**: {RULE}", ""]
    exact = [e for e in entries if nums[e.id].exact]
    needs = [*NEEDS, ("When the answer must be exact",
                      "entries that equal softmax attention at some setting (checked to 1e-10)",
                      lambda e: e in exact)]
    for title, who, fits in needs:
        ranked = pick([e for e in entries if fits(e)], nums)
        out += [f"## {title}", ""]
        if not ranked:
            out += [f"No {who} measured at n = {AT_N}.", ""]
            continue
        best = by_id[ranked[0].id]
        then = ", ".join(f"[{by_id[x.id].display_name}](entries/{x.id}.md)" for x in ranked[1:3])
        out += [f"Candidates: {who}. **Pick: [{best.display_name}](entries/{best.id}.md)**"
                + (f", then {then}" if then else "") + ".", "",
                "| entry | recall | speed-up over SDPA | peak memory (MiB) | time (ms) | exact |",
                "| --- | --- | --- | --- | --- | --- |"]
        for x in ranked[:8]:
            out.append(f"| [{by_id[x.id].display_name}](entries/{x.id}.md) | {_f(x.recall)} | "
                       f"{_f(x.speedup, '{:.1f}x')} | {_f(x.peak_mib, '{:.0f}')} | "
                       f"{_f(x.time_ms, '{:.0f}')} | {'yes' if x.exact else '-'} |")
        out += ["", f'<a href="../compare/?pick={",".join(x.id for x in ranked[:3])}">Compare the '
                "top three side by side</a>", ""]
    if quality:
        out += ["## Recall against speed", "",
                themed_figure("recall against speed", "assets/figures/quality-pareto.png",
                              "assets/figures/quality-pareto-dark.png"), ""]
    return "\n".join(out)


def _math(tex: str) -> str:
    return f'<span class="arithmatex">\\({html.escape(tex)}\\)</span>'


def compare_page(entries: list[Entry], rows: dict[str, dict], bench: dict | None,
                 quality: dict | None) -> str:
    """Every entry's numbers in one table (compare.js sorts and filters it, with the state in
    the URL), and hidden cards that `?pick=a,b,c` shows side by side."""
    nums = measured(entries, rows, bench, quality)
    fams = sorted({e.family for e in entries})
    out = ["---", "hide: [navigation, toc]", "---", "", "# Compare", "",
           f"Measured numbers of every entry: {_sources(bench, quality)}. Time, memory and speed-up "
           f"at n = {AT_N} (image entries at about as many pixels). Click a header to sort, "
           "filter with the controls, tick up to three rows to see them side by side; the page's "
           "address keeps the state, so a view can be linked.", "",
           '<div id="zoo-side" class="zoo-side"></div>', "",
           '<div class="zoo-filters" data-zoo-for="zoo-compare">',
           '<input type="search" data-zoo-filter="text" placeholder="filter by name" aria-label="filter">',
           '<label>family <select data-zoo-filter="family"><option value="">any</option>'
           + "".join(f'<option value="{f}">{f}</option>' for f in fams) + "</select></label>",
           '<label>autoregressive <select data-zoo-filter="autoregressive"><option value="">any'
           '</option><option value="yes">yes</option><option value="no">no</option></select></label>',
           '<label>input <select data-zoo-filter="input"><option value="">any</option>'
           '<option value="sequence">sequence</option><option value="image">image</option>'
           "</select></label>",
           '<span class="zoo-count"></span>', "</div>", "",
           '<table id="zoo-compare">', "<thead><tr><th>pick</th>"
           '<th data-sort="name">Entry</th><th data-sort="family">Family</th>'
           '<th data-sort="time" data-type="number">Time (ms)</th>'
           '<th data-sort="memory" data-type="number">Peak (MiB)</th>'
           '<th data-sort="speedup" data-type="number">Speed-up</th>'
           '<th data-sort="recall" data-type="number">Recall</th>'
           '<th data-sort="error" data-type="number">Error (uniform)</th>'
           '<th data-sort="claims" data-type="number">Claims held</th></tr></thead>', "<tbody>"]
    cards = []
    for e in sorted(entries, key=lambda e: e.display_name.lower()):
        x = nums[e.id]

        def num(v: float | None) -> str:
            return "" if v is None else f"{v:.6g}"
        text = html.escape(" ".join([e.id, e.display_name, *e.aliases]).lower(), quote=True)
        claims = f"{x.claims_held}/{x.claims_total}"
        error = "exact" if x.exact and x.error is None else (
            f"{_f(x.error, '{:.3f}')} ({_f(x.uniform, '{:.3f}')})" if x.error is not None else "-")
        out.append(
            f'<tr data-id="{e.id}" data-name="{html.escape(e.display_name.lower(), quote=True)}" '
            f'data-family="{e.family}" data-autoregressive="{"yes" if e.autoregressive else "no"}" '
            f'data-input="{e.input}" data-text="{text}" data-time="{num(x.time_ms)}" '
            f'data-memory="{num(x.peak_mib)}" data-speedup="{num(x.speedup)}" '
            f'data-recall="{num(x.recall)}" data-error="{num(0.0 if x.exact else x.error)}" '
            f'data-claims="{x.claims_held / x.claims_total if x.claims_total else ""}">'
            f'<td><input type="checkbox" data-zoo-pick="{e.id}" aria-label="pick {e.id}"></td>'
            f'<td><a href="../entries/{e.id}/">{html.escape(e.display_name)}</a></td>'
            f"<td>{e.family}</td><td>{_f(x.time_ms, '{:.0f}')}</td><td>{_f(x.peak_mib, '{:.0f}')}</td>"
            f"<td>{_f(x.speedup, '{:.1f}x')}</td><td>{_f(x.recall)}</td><td>{error}</td>"
            f"<td>{claims}</td></tr>")
        pictures = "".join(  # one for the light scheme, one for the dark: zoo.css shows one
            f'<a class="zoo-{scheme}" href="../assets/figures/pattern-{e.id}{tail}.png">'
            f'<img class="zoo-figure" loading="lazy" src="../assets/figures/pattern-{e.id}{tail}.png" '
            f'alt="attention pattern of {e.id}"></a>' for scheme, tail in (("light", ""), ("dark", "-dark")))
        cards.append(
            f'<div class="zoo-card" data-card="{e.id}" hidden>'
            f'<h3><a href="../entries/{e.id}/">{html.escape(e.display_name)}</a></h3>'
            f'<p class="zoo-paper">{html.escape(e.title)} ({e.year})</p>'
            f'<div class="arithmatex">\\[{html.escape(e.formula)}\\]</div>{pictures}'
            f"<ul><li>time {_math(e.complexity['time'])}, memory {_math(e.complexity['memory'])}</li>"
            f"<li>at n = {AT_N}: {_f(x.time_ms, '{:.0f}')} ms, {_f(x.peak_mib, '{:.0f}')} MiB, "
            f"{_f(x.speedup, '{:.1f}x')} SDPA's speed</li><li>recall {_f(x.recall)}</li>"
            f"<li>approximation error {error}</li><li>claims held {claims}</li></ul></div>")
    out += ["</tbody>", "</table>", "", '<div id="zoo-cards" hidden>', *cards, "</div>", ""]
    return "\n".join(out)
