"""mkdocs hook: generate the catalogue, taxonomy, chooser and entry pages, their pictures and the
home page's claims table from catalog.yaml and the probes at build time, and serve MathJax from
the site itself (no CDN); every page's code lines get their indentation for zoo.css's hanging
indent. Nothing generated is written to the source tree; measurements and pictures are cached
under .cache/ so a rebuild with nothing changed is fast."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from mkdocs.structure.files import File

from zoo.catalog import FAMILIES, cache_root, catalog
from zoo.site.compare import compare_page
from zoo.site.compat import compat_page, entry_compat
from zoo.site.figures import approximation_figures, bench_png, pattern_figures, themed_pngs
from zoo.site.pages import (
    FAMILY_TITLES,
    benchmarks_page,
    catalogue_page,
    choose_page,
    claims_markdown,
    entry_page,
    hanging_indents,
    page_path,
    taxonomy_page,
)
from zoo.site.peers import entry_peers, peers_page
from zoo.site.quality import entry_quality, heatmap_png, pareto_png, quality_page
from zoo.verify.claims import claims_report

BENCH_RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results.json"
QUALITY_RESULTS = BENCH_RESULTS.with_name("quality.json")
PEERS_RESULTS = BENCH_RESULTS.with_name("peers.json")
COMPAT_RESULTS = BENCH_RESULTS.with_name("compat.json")

log = logging.getLogger("mkdocs.hooks.zoo")
MATHJAX_URI = "assets/mathjax/tex-svg.js"
CLAIMS_MARKER = "<!-- zoo:claims -->"
_rows: list[dict] = []


def _mathjax_file() -> Path:
    import mathjax  # the django-static-mathjax package: MathJax 3 as plain files

    path = Path(mathjax.__file__).parent / "static" / "mathjax" / "es5" / "tex-svg.js"
    if not path.is_file():
        raise FileNotFoundError(f"MathJax not found at {path}; pip install django-static-mathjax")
    return path


def _forget_loaded_catalogue() -> None:
    """`mkdocs serve` rebuilds in the same process: read catalog.yaml again, and re-import the
    entry modules whose file changed, so a new entry (`zoo new`) or an edit shows without a
    restart."""
    import importlib
    import sys

    from zoo import catalog as catalog_module

    catalog_module._default.cache_clear()
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if name.startswith("zoo.entries.") and file and Path(file).is_file():
            if Path(file).stat().st_mtime_ns != getattr(module, "_zoo_mtime", None):
                if hasattr(module, "_zoo_mtime"):
                    importlib.reload(module)
                module._zoo_mtime = Path(file).stat().st_mtime_ns


def on_config(config):
    _forget_loaded_catalogue()
    entries = list(catalog().values())
    by_family = []
    for fam in FAMILIES:
        members = sorted((e for e in entries if e.family == fam), key=lambda e: e.display_name.lower())
        if members:
            by_family.append({FAMILY_TITLES[fam]: [{e.display_name: page_path(e)} for e in members]})
    config["nav"] = [{"Entries": by_family} if item == {"Entries": "entries/"} else item
                     for item in config["nav"] or []]
    return config


def on_files(files, config):
    entries = list(catalog().values())
    log.info("zoo: measuring the claims of %d entries (cached in %s)", len(entries),
             cache_root() / "claims")
    done: list[str] = []
    last = [time.monotonic()]

    def progress(entry_id: str) -> None:  # a line per measured (not cached) entry: minutes at first
        done.append(entry_id)
        if time.monotonic() - last[0] > 0.5:
            log.info("zoo: claims %d/%d measured (%s)", len(done), len(entries), entry_id)
        last[0] = time.monotonic()

    _rows[:] = claims_report(entries, progress=progress)
    rows = {r["id"]: r for r in _rows}

    def add(uri: str, content):
        files.append(File.generated(config, uri, content=content))

    add("catalogue.md", catalogue_page(entries, rows))
    add("taxonomy.md", taxonomy_page(entries))
    bench = json.loads(BENCH_RESULTS.read_text()) if BENCH_RESULTS.is_file() else None
    quality = json.loads(QUALITY_RESULTS.read_text()) if QUALITY_RESULTS.is_file() else None
    add("choose.md", choose_page(entries, rows, quality, bench))
    add("compare.md", compare_page(entries, rows, bench, quality))
    add("quality.md", quality_page(entries, quality, bench))
    peers = json.loads(PEERS_RESULTS.read_text()) if PEERS_RESULTS.is_file() else None
    add("peers.md", peers_page(peers))
    compat = json.loads(COMPAT_RESULTS.read_text()) if COMPAT_RESULTS.is_file() else None
    add("compat.md", compat_page(entries, compat))

    def add_themed(name: str, pictures: tuple[bytes, bytes]):  # for the light and the dark scheme
        add(f"assets/figures/{name}.png", pictures[0])
        add(f"assets/figures/{name}-dark.png", pictures[1])

    if quality:
        # keyed by the entries it shows (those with runs), so a scaffolded entry (`zoo new`, the
        # contributing and serve tests) does not redraw it
        measured = {run["attention"] for run in quality["runs"].values()}
        add_themed("quality-heatmap", themed_pngs("quality-heatmap",
                                                  (quality, [e.id for e in entries if e.id in measured]),
                                                  lambda dark: heatmap_png(quality, entries, dark)))
        add_themed("quality-pareto", themed_pngs("quality-pareto", (quality, bench),
                                                 lambda dark: pareto_png(quality, bench, dark)))
    public_file = BENCH_RESULTS.with_name("public.json")
    public = json.loads(public_file.read_text()) if public_file.is_file() else None
    decoding_file = BENCH_RESULTS.with_name("decoding.json")
    decoding = json.loads(decoding_file.read_text()) if decoding_file.is_file() else None
    add("benchmarks.md", benchmarks_page(entries, bench, public, decoding))
    if bench:
        for fam in FAMILIES:
            members = [e.id for e in entries if e.family == fam and e.id in bench["results"]]
            if members:
                add_themed(f"bench-family-{fam}", themed_pngs(
                    f"bench-family-{fam}", (bench, members),
                    lambda dark, m=members, f=fam: bench_png(bench, m, FAMILY_TITLES[f], dark)))
    log.info("zoo: drawing the pattern pictures (cached in %s)", cache_root() / "figures")
    for e in entries:
        in_bench = bool(bench) and e.id in bench["results"]
        page = with_section(entry_page(e, rows.get(e.id), bench=in_bench),
                            entry_quality(e, quality), before="## Usage")
        page = with_section(page, entry_peers(e, peers), before="## Usage")
        add(page_path(e), with_section(page, entry_compat(e, compat), before="## Usage"))
        if in_bench:
            key = (bench["results"][e.id], bench["results"]["sdpa"])
            add_themed(f"bench-{e.id}", themed_pngs(
                f"bench-{e.id}", key, lambda dark, e=e: bench_png(bench, [e.id], e.id, dark)))
        add_themed(f"pattern-{e.id}", pattern_figures(e))
        if e.budget is not None:
            add_themed(f"approx-{e.id}", approximation_figures(e))
    files.append(File.generated(config, MATHJAX_URI, abs_src_path=str(_mathjax_file())))
    return files


def with_section(page: str, section: str, *, before: str) -> str:
    """`page` with `section` inserted before the heading line `before` (at the end without it)."""
    if not section:
        return page
    head, sep, tail = page.partition("\n" + before + "\n")
    return head + "\n" + section + sep + tail if sep else page + "\n" + section


def on_page_markdown(markdown, page, config, files):
    if CLAIMS_MARKER in markdown:
        names = {e.id: e.display_name for e in catalog().values()}
        markdown = markdown.replace(CLAIMS_MARKER, claims_markdown(_rows, names))
    return markdown


def on_page_content(html, page, config, files):
    return hanging_indents(html)
