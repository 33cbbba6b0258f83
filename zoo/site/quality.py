"""The recall results on the site: the Quality page (heat map, table, recall against speed with
the Pareto front), each entry's row, and the ranking the chooser uses. Everything is read from the
committed `benchmarks/quality.json` (and `benchmarks/results.json` for speed)."""

from __future__ import annotations

import math
from typing import Any

from zoo.catalog import Entry
from zoo.site.pages import themed_figure
from zoo.verify.quality import RISING_BY, RISING_SHARE, STOP_AT, TRANSFER_FROM, summary

# Long Range Arena, Tay et al. (arXiv 2011.04006), Table 1: published test accuracies (%), copied as
# figures with their source, never measured here. Path-X: every model failed (not listed).
LRA_SOURCE = "Tay et al., Long Range Arena (ICLR 2021), arXiv 2011.04006, Table 1"
LRA_TASKS = ("ListOps", "Text", "Retrieval", "Image", "Pathfinder", "Avg")
LRA: dict[str, tuple[Any, ...]] = {
    "softmax-attention": ("Transformer", 36.37, 64.27, 57.46, 42.44, 71.40, 54.39),
    "longformer": ("Longformer", 35.63, 62.85, 56.89, 42.22, 69.71, 53.46),
    "linformer": ("Linformer", 35.70, 53.94, 52.27, 38.56, 76.34, 51.36),
    "reformer": ("Reformer", 37.27, 56.10, 53.40, 38.07, 68.50, 50.67),
    "sinkhorn-attention": ("Sinkhorn Transformer", 33.67, 61.20, 53.83, 41.23, 67.45, 51.39),
    "synthesizer": ("Synthesizer", 36.99, 61.68, 54.67, 41.61, 69.45, 52.88),
    "bigbird": ("BigBird", 36.05, 64.02, 59.29, 40.83, 74.87, 55.01),
    "linear-transformer": ("Linear Transformer", 16.13, 65.90, 53.09, 42.34, 75.30, 50.55),
    "performer": ("Performer", 18.01, 65.40, 53.82, 42.77, 77.05, 51.41),
    "sparse-transformer": ("Sparse Transformer", 17.07, 63.58, 59.59, 44.24, 71.71, 51.24),
}


def cell_names(data: dict) -> list[str]:
    return list(data.get("cells", {}))


def recall_score(table: dict, cells: list[str]) -> float | None:
    """Mean best accuracy over the separation cells (all but the smoke cell) the entry has;
    the smoke cell alone when no other is measured yet."""
    grid = [c for c in cells if c != "smoke" and c in table]
    use = grid or [c for c in cells if c in table]
    if not use:
        return None
    return sum(table[c]["accuracy"] for c in use) / len(use)


def speedups(bench: dict | None, n: int = 16384) -> dict[str, float]:
    """Forward speed-up over the SDPA layer at `n`, from the committed benchmark."""
    if not bench:
        return {}

    def at(points):
        for p in points:
            if p["n"] == n and p.get("status") == "ok" and p.get("time_s"):
                return p["time_s"]
        return None

    base = at(bench["results"].get("sdpa", {}).get("points", []))
    out = {}
    for name, r in bench["results"].items():
        t = at(r.get("points", []))
        if name != "sdpa" and t and base:
            out[name] = base / t
    return out


def pareto(points: dict[str, tuple[float, float]]) -> list[str]:
    """Names on the front of (speed-up, recall): no other point is at least as good in both and
    better in one."""
    front = []
    for a, (sa, ra) in points.items():
        if not any((sb >= sa and rb >= ra) and (sb > sa or rb > ra)
                   for b, (sb, rb) in points.items() if b != a):
            front.append(a)
    return sorted(front, key=lambda k: points[k][0])


def _fmt(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def heatmap_png(data: dict, entries: list[Entry], dark: bool = False) -> bytes:
    """Accuracy per entry and cell, best recall first; `dark`: the variant for the dark scheme
    (zoo.site.figures.DARK_STYLE: no background, light text; the same colour map)."""
    import matplotlib

    matplotlib.use("Agg")

    from zoo.site.figures import _scheme

    with _scheme(dark):
        return _heatmap_png(data, entries, dark)


def _heatmap_png(data: dict, entries: list[Entry], dark: bool) -> bytes:
    import matplotlib.pyplot as plt

    from zoo.site.figures import _png

    table, cells = summary(data), cell_names(data)
    names = [e.id for e in entries if e.id in table]
    names.sort(key=lambda n: -(recall_score(table[n], cells) or 0))
    grid = [[table[n].get(c, {}).get("accuracy", math.nan) for c in cells] for n in names]
    fig, ax = plt.subplots(figsize=(1.2 * len(cells) + 3, 0.22 * len(names) + 1.2))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(cells)), cells, rotation=30, ha="right")
    ax.set_yticks(range(len(names)), names, fontsize=7)
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            if not math.isnan(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6,
                        color="black" if v > 0.6 else "white")
    fig.colorbar(im, ax=ax, label="test accuracy at the query positions")
    ax.set_title("Associative recall (MQAR): accuracy per entry and cell")
    return _png(fig, transparent=dark)


def pareto_png(data: dict, bench: dict | None, dark: bool = False) -> bytes:
    """Recall against speed, the Pareto front in red; `dark`: the variant for the dark scheme
    (lighter blue and red, which stand out from the dark page as the light ones do from white)."""
    import matplotlib

    matplotlib.use("Agg")

    from zoo.site.figures import _scheme

    with _scheme(dark):
        return _pareto_png(data, bench, dark)


def _pareto_png(data: dict, bench: dict | None, dark: bool) -> bytes:
    import matplotlib.pyplot as plt

    from zoo.site.figures import _png

    dot, front_colour = ("#64b5f6", "#ff7961") if dark else ("C0", "C3")
    table, cells, speed = summary(data), cell_names(data), speedups(bench)
    points: dict[str, tuple[float, float]] = {}
    for n, t in table.items():
        score = recall_score(t, cells)
        if n in speed and score is not None:
            points[n] = (speed[n], score)
    front = pareto(points)
    fig, ax = plt.subplots(figsize=(8, 5))
    for n, (s, r) in points.items():
        on = n in front
        ax.scatter(s, r, s=30 if on else 14, color=front_colour if on else dot, zorder=3 if on else 2)
        if on:
            ax.annotate(n, (s, r), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if front:
        ax.plot([points[n][0] for n in front], [points[n][1] for n in front], color=front_colour, lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("forward speed-up over the SDPA layer at n = 16384 (committed benchmark)")
    ax.set_ylabel("recall (mean accuracy over the measured cells)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title("Recall against speed; the Pareto front in red")
    return _png(fig, transparent=dark)


ORDERING = ("softmax-attention", "linear-transformer", "performer")


def ordering_section(table: dict, data: dict) -> list[str]:
    """Zoology's ordering, checked on our numbers: softmax at the stop accuracy in every cell, the
    kernel attentions below it in the harder cells, their gap growing with the number of pairs."""
    cells = [c for c in cell_names(data) if c != "smoke"]
    out = ["## The published ordering, checked", "",
           "Zoology (Figure 2) finds softmax attention solving MQAR at every length and number of "
           "pairs, and the kernel (linear) attentions falling behind as the pairs grow at a fixed "
           "width. Our numbers for the three mechanisms of that comparison, per separation cell "
           "(`-`: not measured yet):", "",
           "| cell | pairs | " + " | ".join(f"`{n}`" for n in ORDERING) + " | gap to softmax |",
           "| --- | --- | " + " | ".join("---" for _ in ORDERING) + " | --- |"]
    for c in cells:
        accs = [table.get(n, {}).get(c, {}).get("accuracy") for n in ORDERING]
        gaps = [accs[0] - a for a in accs[1:] if a is not None and accs[0] is not None]
        out.append(f"| `{c}` | {data['cells'][c]['pairs']} | " + " | ".join(_fmt(a) for a in accs)
                   + f" | {', '.join(f'{g:+.2f}' for g in gaps) or '-'} |")
    out += ["", "A model that has learnt that the answer is one of the values in its context, but "
            "not which, scores about 1 / pairs (0.25 with 4 pairs): many entries sit at that "
            "plateau in the `smoke` cell, whose short budget (the whole cell over every entry in "
            "about an hour here) measures how soon a mechanism leaves it more than whether it can; "
            "`n64-p4` asks the same question with a larger vocabulary and a longer budget.", ""]
    return out


def quality_page(entries: list[Entry], data: dict | None, bench: dict | None) -> str:
    out = ["---", "hide: [navigation]", "---", "", "# Quality: what each mechanism learns", ""]
    if not data:
        return "\n".join(out + ["No recall results are committed yet (`benchmarks/quality.json`; "
                                "`make quality` writes it).", ""])
    r, m = data["recipe"], data["machine"] or {}
    table, cells = summary(data), cell_names(data)
    out += [
        "Every entry is trained on multi-query associative recall (MQAR; Arora et al., *Zoology*, "
        "arXiv 2312.04927) inside the same small model (`zoo.models.SequenceModel`): the key-value "
        "pairs first, then every key queried once at power-law distances; accuracy over the query "
        "positions of a fixed test set. One change from Zoology: the position after a query holds "
        "a blank token, so the answer never appears in the input and causal and bidirectional "
        "entries solve the same problem (`zoo/tasks.py`).", "",
        f"**Recipe** (the same for every entry): width {r['dim']}, {r['depth']} blocks, {r['heads']} "
        f"heads where the entry has heads, no MLP, a short causal convolution (kernel {r['conv']}) "
        "before every mixer (Zoology's Based recipe), causal entries causal and the others "
        "bidirectional, every other hyper-parameter the layer's default; AdamW (weight decay "
        f"{r['weight_decay']}), warm-up then cosine, batch {r['batch']}, fresh batches every step, "
        f"the best of learning rates {', '.join(f'{x:g}' for x in r['lrs'])}, each run stopped once "
        f"its test accuracy reaches {STOP_AT} ({r['test_examples']} test examples, evaluated every "
        f"{r['eval_every']} steps). The rates are swept in full up to `{TRANSFER_FROM}`; in each "
        "later cell an entry starts at the rate that did best for it in the cell before, and tries "
        f"the others only if it reached {STOP_AT} there (`zoo.verify.quality.transferred`). "
        "Step budgets per cell: "
        + ", ".join(f"{c} {data['steps'][c]}" for c in cells) + ".", "",
        f"**Run**: {m.get('processor', '?')}, {m.get('cpus', '?')} CPUs, torch {m.get('torch', '?')}, "
        f"one torch thread per job, {m.get('jobs', 1)} job(s) at a time; last job finished "
        f"{max((x.get('date', '') for x in data['runs'].values()), default='-')[:16]} UTC "
        "(`make quality`; the run resumes where it stopped).", "",
        "Cells (length n, key-value pairs, vocabulary): "
        + "; ".join(f"`{c}` ({v['n']}, {v['pairs']}, {v['vocab']})" for c, v in data["cells"].items())
        + ".", "",
        themed_figure("recall heat map", "assets/figures/quality-heatmap.png",
                      "assets/figures/quality-heatmap-dark.png"), "",
        "## Recall against speed", "",
        "The x axis is the forward speed-up over the SDPA layer at n = 16384 from the committed "
        "[benchmarks](benchmarks.md) (image entries at about as many pixels); the y axis the mean "
        "accuracy over the separation cells measured so far (the smoke cell where none is). The "
        "red line joins the Pareto front: no entry is both faster and better at recall.", "",
        themed_figure("recall against speed", "assets/figures/quality-pareto.png",
                      "assets/figures/quality-pareto-dark.png"), "",
    ]
    speed = speedups(bench)
    points = {n: (speed[n], recall_score(t, cells)) for n, t in table.items()
              if n in speed and recall_score(t, cells) is not None}
    front = pareto(points)  # type: ignore[arg-type]
    if front:
        out += ["On the front, slowest first: " + ", ".join(f"[`{n}`](entries/{n}.md)"
                                                            for n in front) + ".", ""]
    out += ordering_section(table, data)
    missing = [e.id for e in entries if any(c not in table.get(e.id, {}) for c in cells)]
    out += ["## Every entry, every cell", "",
            "Accuracy at the best learning rate; `-` marks a cell not yet measured"
            + (f" ({len(missing)} entries have one or more)." if missing else ".")
            + f" A score under {STOP_AT} means *not within the cell's step budget*; ↑ marks a run "
            f"that was still climbing when the budget ran out (up {RISING_BY} or more over its "
            f"last {RISING_SHARE:.0%} of its steps), so more steps would raise it: gated linear "
            "attention at `n64-p4`, 0.23 in 1,500 steps, left its plateau at step 2,650 and reached 0.90 "
            "in 4,000 (its catalogue notes).", "",
            "| entry | family | " + " | ".join(cells) + " | recall | speed-up |",
            "| --- | --- | " + " | ".join("---" for _ in cells) + " | --- | --- |"]
    order = sorted(entries, key=lambda e: (-(recall_score(table.get(e.id, {}), cells) or -1), e.id))
    for e in order:
        t = table.get(e.id, {})
        vals = [_fmt(t[c]["accuracy"]) + (" ↑" if t[c].get("rising") else "") if c in t else "-"
                for c in cells]
        out.append(f"| [`{e.id}`](entries/{e.id}.md) | {e.family} | " + " | ".join(vals)
                   + f" | {_fmt(recall_score(t, cells))} | {_fmt(speed.get(e.id))} |")
    out += ["", "## Long Range Arena: published figures", "",
            f"Test accuracy (%) as published in {LRA_SOURCE}, not measured here; the zoo's "
            "entry each row corresponds to is linked. The paper's reading is the same as the "
            "recall grid's: on ListOps, which needs exact retrieval over long contexts, softmax "
            "attention, Reformer, Synthesizer, BigBird, Longformer and Linformer score 35-37, "
            "Linear Transformer, Performer and Sparse Transformer 16-18.",
            "", "| published model | zoo entry | " + " | ".join(LRA_TASKS) + " |",
            "| --- | --- | " + " | ".join("---" for _ in LRA_TASKS) + " |"]
    for zid, (model, *vals) in LRA.items():
        out.append(f"| {model} | [`{zid}`](entries/{zid}.md) | "
                   + " | ".join(f"{v:.2f}" for v in vals) + " |")
    out.append("")
    return "\n".join(out)


def entry_quality(e: Entry, data: dict | None) -> str:
    """The entry page's recall section: its accuracy per cell and its rank."""
    if not data:
        return ""
    table, cells = summary(data), cell_names(data)
    t = table.get(e.id)
    out = ["## Associative recall", ""]
    if not t:
        return "\n".join(out + ["Not measured yet (see the [Quality](../quality.md) page).", ""])
    scores = sorted((s for s in (recall_score(v, cells) for v in table.values()) if s is not None),
                    reverse=True)
    mine = recall_score(t, cells)
    rank = scores.index(mine) + 1 if mine is not None else None
    out += ["Test accuracy on multi-query associative recall, in the recipe of the "
            "[Quality](../quality.md) page" + (f" (rank {rank} of {len(scores)} by recall)."
                                               if rank else "."), "",
            "| " + " | ".join(cells) + " |", "|" + " --- |" * len(cells),
            "| " + " | ".join(_fmt(t[c]["accuracy"]) if c in t else "-" for c in cells) + " |", ""]
    if e.id in LRA:
        model, *vals = LRA[e.id]
        out += [f"Published on Long Range Arena as {model} ({LRA_SOURCE}): "
                + ", ".join(f"{k} {v:.2f}" for k, v in zip(LRA_TASKS, vals, strict=True)) + ".", ""]
    return "\n".join(out)
