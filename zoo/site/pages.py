"""Markdown for the docs site, generated from the catalogue at build time (see docs/hooks/).

Kept in the package, not the hook, so the tests can check (and execute) what the pages show.
"""

from __future__ import annotations

import html
import importlib
import inspect
import re
from pathlib import Path

from zoo.catalog import FAMILIES, PACKAGE, Entry
from zoo.probe import SCALING_NS

FAMILY_TITLES = {
    "exact": "Exact baselines",
    "fixed-pattern": "Fixed patterns",
    "combined-pattern": "Combined patterns",
    "learnable-pattern": "Learnable patterns",
    "low-rank": "Low rank",
    "kernel": "Kernels and feature maps",
    "memory": "Memory and global tokens",
    "recurrence": "Recurrence",
    "downsampling": "Downsampling",
    "gating": "Gating and channel/spatial modules",
    "decay": "Decay and gated recurrences",
    "kv-sharing": "Key-value sharing",
}
assert set(FAMILY_TITLES) == set(FAMILIES)


def page_path(e: Entry) -> str:
    return f"entries/{e.id}.md"


def figure(alt: str, src: str) -> str:
    """A picture that opens at full size when clicked or tapped: a multi-panel figure shrunk to a
    phone's width is too small to read."""
    return f"[![{alt}]({src}){{ .zoo-figure }}]({src})"


def themed_figure(alt: str, light: str, dark: str) -> str:
    """`figure` drawn twice, for Material's light and dark schemes: zoo.css shows the one that
    matches the page (a picture on a white background is a glaring rectangle on the dark page)."""
    return (f"[![{alt}]({light}){{ .zoo-figure }}]({light}){{ .zoo-light }}"
            f"[![{alt}]({dark}){{ .zoo-figure }}]({dark}){{ .zoo-dark }}")


_CODE_LINE = re.compile(r'<span id="(__span-[0-9-]+)">([^\n]*)\n</span>')


def hanging_indents(page_html: str) -> str:
    """`page_html` with each indented line of a highlighted code block (pymdownx.highlight's
    `line_spans`) carrying its indentation in `--indent`: zoo.css wraps long lines, and continues a
    wrapped line further right than the line's own indentation."""
    def one(m: re.Match) -> str:
        text = html.unescape(re.sub(r"<[^>]*>", "", m[2]))
        indent = len(text) - len(text.lstrip(" "))
        return f'<span id="{m[1]}" style="--indent: {indent}ch">{m[2]}\n</span>' if indent else m[0]

    return _CODE_LINE.sub(one, page_html)


def layer_defaults(e: Entry) -> dict:
    """The layer's own defaults for the keywords the catalogue's test-sized `hparams` set."""
    import inspect

    from zoo.registry import load

    params = inspect.signature(load(e.id).__init__).parameters
    return {k: params[k].default for k in e.hparams
            if k in params and params[k].default is not inspect.Parameter.empty}


def settings_note(e: Entry) -> str:
    """One line saying which settings are test-sized and what the layer's defaults are."""
    if not e.hparams:
        return "the layer's defaults"
    test = ", ".join(f"{k}={v!r}" for k, v in e.hparams.items())
    defaults = ", ".join(f"{k}={v!r}" for k, v in layer_defaults(e).items())
    return f"test-sized settings {test} (the layer's defaults: {defaults or 'none for these'})"


def usage(e: Entry) -> str:
    """A runnable snippet for the entry; tests execute exactly this text."""
    kwargs = "".join(f", {k}={v!r}" for k, v in e.hparams.items())
    defaults = ", ".join(f"{k}={v!r}" for k, v in layer_defaults(e).items())
    note = (f"# test-sized settings (the catalogue's hparams); the layer's defaults are\n"
            f"# {defaults or 'none for these keywords'}: leave the keywords out to get them\n"
            if e.hparams else "")
    if e.input == "image":
        return (
            "import torch\nimport zoo\n\n"
            f"{note}"
            f'layer = zoo.create("{e.id}", dim=64{kwargs})\n'
            "x = torch.randn(2, 64, 16, 16)  # (batch, channels, height, width)\n"
            "y = layer(x)\n"
            "assert y.shape == x.shape\n"
        )
    causal = ", causal=True" if e.autoregressive else ""
    mask = (
        "mask = torch.ones(2, 128, dtype=torch.bool)  # True = real token\n"
        "mask[1, 100:] = False\n"
        "y = layer(x, mask=mask)\n"
    ) if e.masking else "y = layer(x)\n"
    return (
        "import torch\nimport zoo\n\n"
        f"{note}"
        f'layer = zoo.create("{e.id}", dim=64{kwargs}{causal})\n'
        "x = torch.randn(2, 128, 64)  # (batch, length, dim)\n"
        f"{mask}"
        "assert y.shape == x.shape\n"
    )


def bibtex(e: Entry) -> str:
    first = re.sub(r"[^a-z]", "", e.authors[0].split()[-1].lower())
    word = next((w for w in re.findall(r"[a-z]+", e.title.lower()) if len(w) > 3), "paper")
    fields = [("title", "{" + e.title + "}"), ("author", " and ".join(e.authors)),
              ("year", str(e.year)), ("booktitle" if e.venue[:5] != "arXiv" else "journal",
                                      e.venue)]
    if e.arxiv:
        fields += [("eprint", e.arxiv), ("archivePrefix", "arXiv")]
    fields.append(("url", e.paper))
    body = ",\n".join(f"  {k} = {{{v}}}" for k, v in fields)
    return f"@inproceedings{{{first}{e.year}{word},\n{body}\n}}"


def _yes(b: bool) -> str:
    return "yes" if b else "no"


def _measured(row: dict | None, kind: str) -> str:
    if not row or not row.get(kind) or row[kind].get("measured") in (None, ""):
        return "not measured"
    cell = row[kind]
    mark = "" if cell["held"] else " (**does not match the declared exponent**)"
    return f"{cell['measured']}{mark}"


def _repo_path(path: Path) -> str:
    return path.resolve().relative_to(PACKAGE.parent.resolve()).as_posix()


def reference_snippets(e: Entry) -> list[tuple[str, str, str]]:
    """`(reference, fast function, snippet path)` for each reference pair of the entry (its own
    first, then the core's it calls): the path as pymdownx.snippets reads it, `file:start:end`, the
    reference function's own lines of the tested file."""
    from zoo.verify.forms import reference_pairs

    out = []
    for pair in reference_pairs(e):
        fn = inspect.unwrap(getattr(importlib.import_module(pair.module), pair.reference))
        lines, start = inspect.getsourcelines(fn)
        path = _repo_path(Path(inspect.getsourcefile(fn) or ""))
        out.append((pair.reference, pair.name, f"{path}:{start}:{start + len(lines) - 1}"))
    # a decorator sits above the def: getsourcelines includes it, unwrap finds the file
    return out


def math_section(e: Entry) -> list[str]:
    """'The math': the source of each reference function, for entries that have one."""
    snippets = reference_snippets(e)
    if not snippets:
        return []
    lines = ["## The math", "",
             "The paper's equations as code: the reference form, with no tricks for speed. The "
             "layer runs the fast form below, held equal to this one in float64, outputs and "
             "gradients, with a padding mask and causally where claimed (`tests/test_forms.py`).",
             ""]
    for ref, fast, snippet in snippets:
        lines += [f"`{ref}` (the reference of `{fast}`, `{snippet.split(':')[0]}`):", "",
                  "```python", f'--8<-- "{snippet}"', "```", ""]
    return lines


def two_forms(e: Entry) -> str:
    """The card's cell: the references the fast path is tested equal to, or why there are none."""
    refs = [f"`{ref}`" for ref, _, _ in reference_snippets(e)]
    return (", ".join(refs) + " (see The math)") if refs else "no: the file is a direct transcription"


def source_section(e: Entry) -> list[str]:
    """The tested file itself: 'What runs, tested equal' after the math, else 'Source'."""
    path = _repo_path(e.source)
    snippets = reference_snippets(e)
    if snippets:
        own = [s for s in snippets if s[2].startswith(path + ":")]
        where = ("its references above come first in the file" if own else
                 "the references above are the core's, in `zoo/core`")
        head = ["## What runs, tested equal { data-search-exclude }", "",
                f"The fast path, `{e.module}`, exactly as tested ({where}):", ""]
    else:
        head = ["## Source { data-search-exclude }", "",
                f"The reference, `{e.module}`, exactly as tested:", ""]
    return [*head, "```python", f'--8<-- "{path}"', "```", ""]


def entry_page(e: Entry, row: dict | None = None, *, figures: bool = True,
               bench: bool = False) -> str:
    cites = (f"{e.citations['count']} (Semantic Scholar, as of {e.citations['as_of']})"
             if e.citations else "not listed")
    code = f"[{e.code}]({e.code})" if e.code else "none public"
    arxiv = f" · [arXiv:{e.arxiv}](https://arxiv.org/abs/{e.arxiv})" if e.arxiv else ""
    exact = ", ".join(f"`{k}={v!r}`" for k, v in (e.exact_when or {}).items()) or "defaults"
    ns: list = list(e.scaling.get("ns") or SCALING_NS)
    aka = f"Also known as: {', '.join(e.aliases)}." if e.aliases else ""
    lines = [
        f"# {e.display_name}",
        "",
        f'<p class="zoo-paper">{html.escape(e.title)}</p>',
        "",
        f"`{e.id}` · {FAMILY_TITLES[e.family]} · {e.venue}. {aka}",
        "",
        f"| Authors | {', '.join(e.authors)} |",
        "| --- | --- |",
        f"| Paper | [{e.paper}]({e.paper}){arxiv} |",
        f"| Original code | {code} |",
        f"| Citations | {cites} |",
        f"| Input | {e.input} |",
        f"| Autoregressive | {_yes(e.autoregressive)} |",
        f"| Padding mask | {_yes(e.masking)} |",
        f"| Kernel form (`attend`) | {_yes(e.kernel)} |",
        f"| Equals softmax attention | {('at ' + exact) if e.exact_when is not None else 'no'} |",
        f"| Two forms | {two_forms(e)} |",
        "",
        "## Idea",
        "",
        " ".join(e.idea.split()),
        "",
        "## Formula",
        "",
        f"$$\n{e.formula}\n$$",
        "",
        *math_section(e),
        "## Complexity",
        "",
        "| | as the paper states it | exponent of n, declared | exponent of n, measured |",
        "| --- | --- | --- | --- |",
        f"| time | ${e.complexity['time']}$ | {e.scaling['time']} | {_measured(row, 'time')} |",
        f"| memory | ${e.complexity['memory']}$ | {e.scaling['memory']} | "
        f"{_measured(row, 'memory')} |",
        "",
        "Measured by `zoo.probe.scaling`: the FLOPs and the largest intermediate tensor of one "
        "forward pass, their exponent of n taken between the two largest lengths"
        f" ({', '.join(str(n) for n in ns)}{' pixels' if e.input == 'image' else ''}).",
        "",
    ]
    if e.scaling.get("why"):
        lines += [f"Why this range: {e.scaling['why']}", ""]
    if figures:
        what = ("the effective attention matrix A, with attend(q, k, v) = A v, read off by feeding "
                "v = I" if e.kernel else
                "the influence map: the size of the gradient of output i with respect to input j")
        lines += [
            "## Attention pattern",
            "",
            f"Computed from the reference at build time: {what}"
            f"{' (pixels in row-major order)' if e.input == 'image' else ''}; each row scaled to "
            "its maximum.",
            "",
            themed_figure(f"Attention pattern of {e.id}", f"../assets/figures/pattern-{e.id}.png",
                          f"../assets/figures/pattern-{e.id}-dark.png"),
            "",
        ]
        if e.budget is not None:
            lines += [
                "## Approximation error",
                "",
                f"Relative error against softmax attention with the same q, k, v as "
                f"`{e.budget['param']}` grows (mean of 3 draws, n = 64). The dashed lines are "
                "two answers that know nothing: uniform averaging over the keys, and outputting "
                "zeros (error 1); an error above them is worse than ignoring the scores.",
                "",
                *approximation_table(e, (row or {}).get("approximation")),
                themed_figure(f"Approximation error of {e.id}", f"../assets/figures/approx-{e.id}.png",
                              f"../assets/figures/approx-{e.id}-dark.png"),
                "",
            ]
    if bench:
        lines += [
            "## Benchmark",
            "",
            "Time (forward, and forward + backward) and peak memory against the SDPA baseline (see "
            "[Benchmarks](../benchmarks.md)).",
            "",
            themed_figure(f"Benchmark of {e.id}", f"../assets/figures/bench-{e.id}.png",
                          f"../assets/figures/bench-{e.id}-dark.png"),
            "",
        ]
    if e.notes.strip():
        lines += ["## Notes", "", " ".join(e.notes.split()), ""]
    lines += [
        "## Usage",
        "",
        "```python",
        usage(e).rstrip(),
        "```",
        "",
        *source_section(e),
        "## BibTeX { data-search-exclude }",
        "",
        "```bibtex",
        bibtex(e),
        "```",
        "",
    ]
    return "\n".join(lines)


def approximation_table(e: Entry, cell: dict | None) -> list[str]:
    """The error at the default budget beside its baselines, on random and on peaked inputs."""
    if not cell or "random" not in cell:
        return []
    out = [f"At the layer's default `{cell['param']}={cell['default']}` (n = {cell['n']}, "
           f"mean of {cell['draws']} draws):", "",
           "| inputs | this entry | uniform averaging | zeros |", "| --- | --- | --- | --- |"]
    for key, what in (("random", "random q, k, v"),
                      ("peaked", f"peaked: queries divided by {cell['peaked']['temperature']}, "
                                 "softmax far from uniform")):
        r = cell[key]
        verdict = " (worse than averaging)" if r["error"] > r["uniform"] else ""
        out.append(f"| {what} | **{r['error']:.3f}**{verdict} | {r['uniform']:.3f} | {r['zeros']:.3f} |")
    return out + [""]


FAMILY_TEXT = {
    "exact": "The baselines: full softmax attention over a sequence, and its image form. Every "
             "other entry is measured against them.",
    "fixed-pattern": "Each query sees a fixed, input-independent set of keys: a window, a stride, "
                     "a block, a dilation, a row or a column.",
    "combined-pattern": "Several fixed patterns, or a pattern plus a few global tokens, combined so "
                        "that information crosses the whole sequence in one or two layers.",
    "learnable-pattern": "The content decides which keys a query sees: hashing, clustering, "
                         "sorting, or picking the queries that matter.",
    "low-rank": "The n-by-n map is approximated through a rank-r factorisation: keys and values "
                "projected along the length, or a few landmarks.",
    "kernel": "The softmax of q.k is replaced by a product of feature maps, so the matrix products "
              "reassociate and the cost becomes linear in n.",
    "memory": "A few extra tokens (global memory, inducing points, a compressed past, a product-key "
              "table) carry information between positions.",
    "recurrence": "Segments are processed in turn, with a state carried from one to the next.",
    "downsampling": "The sequence is shortened (pooling, strided convolution) before attending.",
    "gating": "Channel and spatial modules that re-weight features instead of mixing positions "
              "pairwise.",
    "decay": "Linear attention whose state decays: a fixed or data-dependent gate forgets the past "
             "(retention, gated linear attention, the gated delta rule, state-space duality).",
    "kv-sharing": "Exact softmax attention with fewer keys and values to store: heads share them, "
                  "or they are rebuilt from a small latent; the decoding cache shrinks.",
}
assert set(FAMILY_TEXT) == set(FAMILIES)


def _math(tex: str) -> str:
    return f'<span class="arithmatex">\\({html.escape(tex)}\\)</span>'


def catalogue_page(entries: list[Entry], rows: dict[str, dict] | None = None) -> str:
    """The catalogue as one HTML table that filters and sorts in the browser (catalogue.js)."""
    rows = rows or {}
    options = "".join(f'<option value="{f}">{f}</option>' for f in FAMILIES
                      if any(e.family == f for e in entries))
    yes_no = '<option value="">any</option><option value="yes">yes</option><option value="no">no</option>'
    out = [
        "---",
        "hide: [navigation, toc]",  # the table needs the page's full width
        "---",
        "",
        "# Catalogue",
        "",
        f"All {len(entries)} entries of `catalog.yaml`. Filter with the controls, sort by clicking a "
        "column header; every row links to the entry's page. Measured exponents come from "
        "`zoo.probe.scaling` at build time.",
        "",
        '<div class="zoo-filters">',
        '<input type="search" data-zoo-filter="text" placeholder="search id, title, idea" '
        'aria-label="search">',
        f'<label>family <select data-zoo-filter="family"><option value="">any</option>{options}'
        "</select></label>",
        f'<label>autoregressive <select data-zoo-filter="autoregressive">{yes_no}</select></label>',
        f'<label>masking <select data-zoo-filter="masking">{yes_no}</select></label>',
        '<label>input <select data-zoo-filter="input"><option value="">any</option>'
        '<option value="sequence">sequence</option><option value="image">image</option>'
        "</select></label>",
        '<span id="zoo-count"></span>',
        "</div>",
        "",
        '<table id="zoo-catalogue">',
        "<thead><tr>"
        '<th data-sort="name">Entry</th><th data-sort="family">Family</th>'
        '<th data-sort="year" data-type="number">Year</th>'
        '<th data-sort="citations" data-type="number">Citations</th>'
        "<th>Time</th>"
        '<th data-sort="declared" data-type="number">Time exp. declared</th>'
        '<th data-sort="measured" data-type="number">Time exp. measured</th>'
        "<th>AR</th><th>Mask</th><th>Input</th></tr></thead>",
        "<tbody>",
    ]
    for e in sorted(entries, key=lambda e: (e.year, e.id)):
        row = rows.get(e.id) or {}
        measured = (row.get("time") or {}).get("measured") or ""
        try:
            float(measured)
        except ValueError:
            measured = ""
        cites = e.citations["count"] if e.citations else ""
        text = html.escape(" ".join([e.id, e.display_name, *e.aliases, e.title, e.idea, e.family]).lower(),
                           quote=True)
        out.append(
            f'<tr data-id="{e.id}" data-name="{html.escape(e.display_name.lower(), quote=True)}" '
            f'data-family="{e.family}" data-year="{e.year}" '
            f'data-citations="{cites}" data-declared="{e.scaling["time"]}" '
            f'data-measured="{measured}" data-autoregressive="{_yes(e.autoregressive)}" '
            f'data-masking="{_yes(e.masking)}" data-input="{e.input}" data-text="{text}">'
            f'<td><a href="../entries/{e.id}/">{html.escape(e.display_name)}</a><br>'
            f'<span class="zoo-paper">{html.escape(e.title)}</span><br><code>{e.id}</code></td>'
            f"<td>{e.family}</td><td>{e.year}</td><td>{cites}</td>"
            f"<td>{_math(e.complexity['time'])}</td><td>{e.scaling['time']}</td>"
            f"<td>{measured or '-'}</td><td>{_yes(e.autoregressive)}</td><td>{_yes(e.masking)}</td>"
            f"<td>{e.input}</td></tr>"
        )
    out += ["</tbody>", "</table>", ""]
    return "\n".join(out)


CLAIMS_LEGEND = [
    "**Causal** and **Mask**: the autoregressive and padding-mask claims, checked on the influence "
    "map (no output depends on a later position) and with padded tokens (they change nothing).",
    "**Time** and **Memory**: the exponent of n, declared / measured, from FLOP counts and from the "
    "largest intermediate tensor.",
    "**Exact at**: the settings at which the entry equals softmax attention, and the error measured "
    "there (it must be below 1e-10).",
    "**Error**: the approximation error at the default budget (n = 64, random inputs); in brackets "
    "the errors of two answers that know nothing, uniform averaging and zeros, on the same inputs.",
    "**State** and **Step**: decoding token by token, the exponent of the context length of the "
    "state's size and of one step's cost, declared / measured.",
]
CLAIMS_HEADERS = ("Entry", "Causal", "Mask", "Time", "Memory", "Exact at", "Error", "State", "Step")


def _claims_cell(column: str, value: dict | None, text: str) -> str:
    """One cell of the home page's table: the report's text, tightened where it is long (an
    exponent pair kept on one line, the approximation error with its baselines in brackets)."""
    random = (value or {}).get("random")
    if column == "approximation" and value and value["held"] and random:
        text = (f"{random['error']:.3f} at {value['param']}={value['default']} "
                f"({random['uniform']:.3f}, {random['zeros']:.3f})")
    elif column in ("time", "memory", "state", "step"):
        text = text.replace(" / ", "\u00a0/\u00a0")
    return html.escape(text)


def claims_markdown(rows: list[dict], names: dict[str, str] | None = None) -> str:
    """The claims report on the home page: a legend of the columns, then a table with the same
    values and held marks as `zoo claims` prints, led by each entry's name (`names`: id -> display
    name) linked to its page, with short headers so that every column fits beside the navigation."""
    from zoo.verify.claims import COLUMNS, report_cells

    names = names or {}
    out = ["Columns:", "", *(f"- {item}" for item in CLAIMS_LEGEND), "",
           '<div class="zoo-claims" markdown>', "",
           "| " + " | ".join(CLAIMS_HEADERS) + " |", "|" + " --- |" * len(CLAIMS_HEADERS)]
    for row in rows:
        cells = []
        for column, (text, held) in zip(COLUMNS, report_cells(row), strict=True):
            shown = _claims_cell(column, row.get(column), text)
            if held is None:
                cells.append(shown)
            else:
                cls, mark = ("zoo-held", "held") if held else ("zoo-broken", "NOT HELD")
                cells.append(f'{shown} <span class="{cls}">[{mark}]</span>')
        name = html.escape(names.get(row["id"], row["id"]), quote=False)
        out.append(f'| [{name}](entries/{row["id"]}.md "{row["id"]}") | ' + " | ".join(cells) + " |")
    return "\n".join([*out, "", "</div>"])


def taxonomy_page(entries: list[Entry]) -> str:
    out = ["# Taxonomy", "",
           "Families after Tay et al.'s survey of efficient transformers, plus the exact baselines "
           "and gating modules. An entry belongs to the family of its main idea.", ""]
    for fam in FAMILIES:
        members = sorted((e for e in entries if e.family == fam), key=lambda e: e.year)
        if not members:
            continue
        out += [f"## {FAMILY_TITLES[fam]}", "", FAMILY_TEXT[fam], ""]
        out += [f"- [{e.display_name}](entries/{e.id}.md) ({e.title}, {e.year}): "
                f"{' '.join(e.idea.split())}"
                for e in members]
        out.append("")
    return "\n".join(out)


def _num(row: dict, kind: str) -> float:
    try:
        return float((row.get(kind) or {}).get("measured", "nan"))
    except (TypeError, ValueError):
        return float("nan")


def choose_page(entries: list[Entry], rows: dict[str, dict], quality: dict | None = None,
                bench: dict | None = None) -> str:
    """'Which one should I use': picks per need by a stated rule over the measured numbers
    (zoo/site/compare.py)."""
    from zoo.site import compare

    return compare.choose_page(entries, rows, quality, bench)


def _bench_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
            + ["| " + " | ".join(r) + " |" for r in rows] + [""])


def benchmarks_page(entries: list[Entry], data: dict | None, public: dict | None = None,
                    decoding: dict | None = None) -> str:
    from zoo.verify.bench import TARGETS, projection_bound, table_rows, target_misses, target_n

    out = ["---", "hide: [navigation]", "---", "", "# Benchmarks", "",
           "Every entry on one harness (`zoo bench`, see `zoo/verify/bench.py` for how time and peak "
           "memory are measured), against a multi-head layer of the same size built on torch's "
           "`scaled_dot_product_attention` (SDPA, in black). Regenerate with `make bench`.", ""]
    if not data:
        return "\n".join(out + ["No results file is committed yet (`benchmarks/results.json`).", ""])
    m, s = data["machine"], data["settings"]
    if "passes" not in s:  # a file from before the plain-process headline
        out += [f"Measured on {m['processor']} with {m['cpus']} CPUs, {m['threads']} torch threads, "
                f"torch {m['torch']}, Python {m['python']}, on {m['date'][:10]}; dim {s['dim']}, "
                f"{s['heads']} heads, batch 1, {'forward+backward' if s['backward'] else 'forward'}, "
                f"median of {s['repeats']} passes after a warm-up, each pass starting with cold "
                "caches, in a process whose glibc was tuned to keep freed memory for reuse "
                "(`MALLOC_MMAP_MAX_=0`, a 1 TiB `MALLOC_TRIM_THRESHOLD_`), not the plain process "
                "a user has; peak memory from a separate process. Image entries run on square "
                "images of about n pixels.", ""]
        header, rows = table_rows(data)
        return "\n".join(out + _bench_table(header, rows) + _bench_public(public)
                         + _bench_families(entries, data))
    envs = s["environments"]
    mm = m.get("matmul") or {}
    if s.get("note"):  # what the person who ran it saw go wrong, kept with the data
        out += ["!!! warning \"About this run\"", "", f"    {s['note']}", ""]
    for r in s.get("reruns", []):  # entries measured again later (`zoo bench --update`)
        base = {p["n"]: p for p in r["baseline"]["points"]}
        top = max(base) if base else None
        sdpa = (f"; SDPA forward in that run {base[top]['time_s'] * 1e3:.0f} ms at n = {top}"
                if top and base[top].get("time_s") else "")
        out += [f"!!! note \"Measured again on {r['date'][:10]}: {', '.join(r['ids'])}\"", "",
                f"    {r['reason']} (matmul rate then {r['matmul']['flops_per_s'] / 1e9:.0f} "
                f"GFLOP/s{sdpa}; speed-ups in the tables are against this page's SDPA run).", ""]
    out += ["## The run", "",
            f"- Machine: {m['processor']}, {m['cpus']} CPUs, {m['platform']}; torch {m['torch']}, "
            f"Python {m['python']}; {m['threads']} torch thread{'s' * (m['threads'] != 1)}; "
            f"run on {m['date'][:10]} ({m['date']}).",
            f"- Matmul rate (the peak below): {mm.get('flops_per_s', 0) / 1e9:.0f} GFLOP/s, the "
            f"best of a few {mm.get('size')} x {mm.get('size')} float32 products at "
            f"the same thread count, measured at the start of the same run.",
            f"- Sizes: dim {s['dim']}, {s['heads']} heads, batch 1; image entries on square images "
            "of about n pixels. Time: median of "
            f"{s['repeats']} passes after a warm-up (more for passes under 0.1 s), each starting "
            "with cold caches; forward without grad in eval mode, forward + backward of `sum()` in "
            "train mode.",
            "- Environments (each worker reports the variables it saw; they are in "
            "`benchmarks/results.json`, `settings.environments`):"]
    for label, e in envs.items():
        set_ = ", ".join(f"`{k}={v}`" for k, v in e["set"].items()) or "nothing set"
        extra = f", from `{e['package']}`" if e.get("package") else ""
        if label == "plain":
            removed = s.get("removed_from_plain") or []
            set_ = ("glibc's defaults, no `MALLOC_*` variable and no `LD_PRELOAD`"
                    + (f" (removed: {', '.join(removed)})" if removed else ""))
            what = "the headline times: the process a user has"
        elif label == "memory":
            what = "peak memory and FLOPs only"
        else:
            what = "a labelled column beside the plain one"
        out.append(f"    - **{label}** ({e['label']}): {set_}{extra}; {what}.")
    out.append("")
    bound = projection_bound(data)
    if bound:
        fb = (f", and {bound['fb']:.1f}x in forward + backward (where the projections cost three "
              "times their forward FLOPs)" if bound["fb"] else "")
        out += ["## The projection bound", "",
                f"A layer whose FLOPs are mostly its q, k, v and output projections does 4 n dim² "
                f"multiply-adds ({bound['flops'] / 1e9:.3g} GFLOP at n = {bound['n']}, dim "
                f"{bound['dim']}), {bound['seconds'] * 1e3:.3g} ms at the measured matmul rate. "
                "The SDPA layer's time over that time is how much faster than the SDPA layer such "
                f"a layer can be on this machine: at most {bound['forward']:.1f}x in the forward "
                f"pass{fb}.", ""]
    kernel = [e.id for e in entries if e.kernel]
    misses = target_misses(data, kernel)
    n_t = target_n(data)
    out += ["## Targets", "",
            f"In the plain process at n = {n_t}: every entry that claims linear time at least "
            f"{TARGETS['linear_forward']:g}x faster than the SDPA layer forward and "
            f"{TARGETS['linear_fb']:g}x forward + backward; kernel entries at "
            f"{TARGETS['kernel_fraction']:g} of the matmul rate or better forward. "]
    if misses:
        out[-1] += f"{len({x['id'] for x in misses})} entries miss, from this run's data:"
        out += ["", "| entry | target | measured |", "| --- | --- | --- |"]
        for x in misses:
            got = ("not measured" if x["measured"] is None else
                   f"{x['measured']:.2f}" if "rate" in x["target"] else f"{x['measured']:.1f}x")
            out.append(f"| `{x['id']}` | {x['target']} | {got} |")
    else:
        out[-1] += "every entry meets them in this run."
    out.append("")
    out += ["## Forward", "",
            "Plain-process times per n, the allocator columns at the longest n, peak memory, the "
            "fitted exponents of time and memory against the declared ones, the speed-up over the "
            "SDPA layer, and the fraction of peak (the forward's FLOPs over its time, over the "
            "matmul rate).", ""]
    header, rows = table_rows(data, "forward")
    out += _bench_table(header, rows)
    if s.get("backward"):
        out += ["## Forward + backward", "",
                "Training: one forward and the backward of its `sum()`, same lengths; peak memory of "
                "the two together.", ""]
        header, rows = table_rows(data, "fb")
        out += _bench_table(header, rows)
    return "\n".join(out + _bench_decoding(decoding) + _bench_public(public)
                     + _bench_families(entries, data))


def _bench_decoding(data: dict | None) -> list[str]:
    """The decoding table (`make bench-decode`, benchmarks/decoding.json): one token's `step`."""
    from zoo.verify.bench import table_rows

    out = ["## Decoding, token by token", ""]
    if not data:
        return out + ["No decoding results are committed yet (`make bench-decode` writes "
                      "`benchmarks/decoding.json`).", ""]
    m, s = data["machine"], data["settings"]
    out += [f"One `step` on a single token after a context of n - 1 tokens, every autoregressive "
            f"entry built causal, beside the SDPA layer with a KV cache (`make bench-decode`). "
            f"{m['processor']}, {m['cpus']} CPUs, {m['threads']} torch threads, torch {m['torch']}, "
            f"run on {m['date'][:10]}; dim {s['dim']}, {s['heads']} heads, batch 1, median of "
            f"{s['repeats']} steps from the same state, in the plain process. The state's size is "
            "what the layer carries between steps; its exponent of n (fitted between the two "
            "longest contexts) is 0 for a recurrent state and 1 for a cache that keeps every "
            "token.", ""]
    out += _decoding_summary(data)
    header, rows = table_rows(data, "decode")
    return out + _bench_table(header, rows)


def _decoding_summary(data: dict) -> list[str]:
    """The table's finding in two sentences, computed from it: which entries' state stays flat,
    and their step time at the longest context against SDPA's with a KV cache."""
    res = data["results"]
    top = max(data["settings"]["ns"])

    def step_ms(name: str) -> float | None:
        point: dict = next((p for p in res[name]["points"] if p["n"] == top), {})
        return None if point.get("time_decode_s") is None else point["time_decode_s"] * 1e3

    entries = [n for n in res if n != "sdpa"]
    flat = [n for n in entries if (res[n]["fitted"].get("memory") or 0) < 0.1]
    growing = [n for n in entries if n not in flat]
    times = sorted(t for t in map(step_ms, flat) if t is not None)
    sdpa = step_ms("sdpa")
    if not entries or not times or sdpa is None:
        return []
    slower = [n for n in growing if (step_ms(n) or 0) > sdpa]
    return [f"Measured: {len(flat)} of {len(entries)} entries carry a state that does not grow with "
            f"the context (fitted exponent below 0.1); at n = {top} their step takes "
            f"{times[0]:.1f} to {times[-1]:.1f} ms against {sdpa:.1f} ms for SDPA with a KV cache. "
            f"The other {len(growing)} keep a cache that grows with n, and {len(slower)} of them "
            f"step slower than SDPA there (its fused kernel against our einsum reads of a cache, "
            f"or a pattern recomputed per step): {', '.join(slower) or 'none'}.", ""]


def _bench_public(public: dict | None) -> list[str]:
    """The side-by-side table (`make bench-public`): forward and, where measured, forward +
    backward; a pair that failed shows its error. Older files (forward only, tuned glibc) too."""
    if not public:
        return []
    m = public["machine"]
    env = public.get("environment", "glibc tuned to keep freed memory (an older run)")
    out = ["## Against public implementations", "",
           "The same mechanism from public packages (not dependencies of the zoo: lucidrains' "
           "packages and the pure-PyTorch implementations in Hugging Face transformers), matched "
           "hyper-parameters, timed side by side in one process, passes interleaved "
           f"(`make bench-public`, `benchmarks/compare_public.py`). {m['processor']}, {m['cpus']} "
           f"CPUs, torch {m['torch']}, {public.get('threads', m.get('threads', '?'))} threads, "
           f"{env}, run on {m['date'][:10]}. A ratio above 1 means the zoo's entry is faster.", "",
           "| entry | n | settings | zoo (ms) | public (ms) | public / zoo | zoo fwd+bwd (ms) | "
           "public fwd+bwd (ms) | public / zoo fwd+bwd |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]

    def cells(r: dict, key: str) -> list[str]:
        if f"ours{key}_s" not in r:
            why = r.get(f"error{key}")
            return [f"failed: {why.split(':')[0]}" if why else "-", "", ""]
        return [f"{r[f'ours{key}_s'] * 1e3:.1f}", f"{r[f'public{key}_s'] * 1e3:.1f}",
                f"{r[f'ratio{key}']:.2f}"]

    for r in public["rows"]:
        out.append(f"| `{r['entry']}` | {r['n']} | {r['settings']} | "
                   + " | ".join(cells(r, "") + cells(r, "_fb")) + " |")
    return out + [""]


def _bench_families(entries: list[Entry], data: dict) -> list[str]:
    out: list[str] = []
    for fam in FAMILIES:
        if any(e.family == fam and e.id in data["results"] for e in entries):
            out += [f"## {FAMILY_TITLES[fam]}", "",
                    themed_figure(FAMILY_TITLES[fam], f"assets/figures/bench-family-{fam}.png",
                                  f"assets/figures/bench-family-{fam}-dark.png"), ""]
    return out
