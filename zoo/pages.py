"""Markdown for the docs site, generated from the catalogue at build time (see docs/hooks/).

Kept in the package, not the hook, so the tests can check (and execute) what the pages show.
"""

from __future__ import annotations

import re

from zoo.catalog import FAMILIES, Entry

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
}
assert set(FAMILY_TITLES) == set(FAMILIES)


def page_path(e: Entry) -> str:
    return f"entries/{e.id}.md"


def usage(e: Entry) -> str:
    """A runnable snippet for the entry; tests execute exactly this text."""
    kwargs = "".join(f", {k}={v!r}" for k, v in e.hparams.items())
    if e.input == "image":
        return (
            "import torch\nimport zoo\n\n"
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


def entry_page(e: Entry) -> str:
    cites = (f"{e.citations['count']} (Semantic Scholar, as of {e.citations['as_of']})"
             if e.citations else "not listed")
    code = f"[{e.code}]({e.code})" if e.code else "none public"
    arxiv = f" · [arXiv:{e.arxiv}](https://arxiv.org/abs/{e.arxiv})" if e.arxiv else ""
    exact = ", ".join(f"`{k}={v!r}`" for k, v in (e.exact_when or {}).items()) or "defaults"
    lines = [
        f"# {e.title}",
        "",
        f"`{e.id}` · {FAMILY_TITLES[e.family]} · {e.venue}",
        "",
        "| | |",
        "| --- | --- |",
        f"| Authors | {', '.join(e.authors)} |",
        f"| Paper | [{e.paper}]({e.paper}){arxiv} |",
        f"| Original code | {code} |",
        f"| Citations | {cites} |",
        f"| Input | {e.input} |",
        f"| Autoregressive | {_yes(e.autoregressive)} |",
        f"| Padding mask | {_yes(e.masking)} |",
        f"| Kernel form (`attend`) | {_yes(e.kernel)} |",
        f"| Equals softmax attention | {('at ' + exact) if e.exact_when is not None else 'no'} |",
        "",
        "## Idea",
        "",
        " ".join(e.idea.split()),
        "",
        "## Formula",
        "",
        f"$$\n{e.formula}\n$$",
        "",
        "## Complexity",
        "",
        "| | as the paper states it | exponent of n (declared) |",
        "| --- | --- | --- |",
        f"| time | ${e.complexity['time']}$ | {e.scaling['time']} |",
        f"| memory | ${e.complexity['memory']}$ | {e.scaling['memory']} |",
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
        "## Source",
        "",
        f"The reference, `{e.module}`, exactly as tested:",
        "",
        "```python",
        f'--8<-- "zoo/entries/{e.source.name}"',
        "```",
        "",
        "## BibTeX",
        "",
        "```bibtex",
        bibtex(e),
        "```",
        "",
    ]
    return "\n".join(lines)


def catalogue_table(entries: list[Entry], link_prefix: str = "entries/") -> str:
    rows = ["| Entry | Family | Year | Time | Memory | Autoregressive | Mask | Input |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for e in sorted(entries, key=lambda e: (e.year, e.id)):
        rows.append(
            f"| [{e.title}]({link_prefix}{e.id}.md) `{e.id}` | {e.family} | {e.year} | "
            f"${e.complexity['time']}$ | ${e.complexity['memory']}$ | "
            f"{_yes(e.autoregressive)} | {_yes(e.masking)} | {e.input} |"
        )
    return "\n".join(rows)


def catalogue_page(entries: list[Entry]) -> str:
    return "\n".join([
        "# Catalogue",
        "",
        f"All {len(entries)} entries of `catalog.yaml`. Every row links to the entry's page.",
        "",
        catalogue_table(entries),
        "",
    ])
