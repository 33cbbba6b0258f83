"""mkdocs hook: generate the catalogue and entry pages from catalog.yaml at build time, and serve
MathJax from the site itself (no CDN). Nothing generated is written to the source tree."""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File

from zoo.catalog import FAMILIES, catalog
from zoo.pages import FAMILY_TITLES, catalogue_page, entry_page, page_path

MATHJAX_URI = "assets/mathjax/tex-svg.js"


def _mathjax_file() -> Path:
    import mathjax  # the django-static-mathjax package: MathJax 3 as plain files

    path = Path(mathjax.__file__).parent / "static" / "mathjax" / "es5" / "tex-svg.js"
    if not path.is_file():
        raise FileNotFoundError(f"MathJax not found at {path}; pip install django-static-mathjax")
    return path


def on_config(config):
    entries = list(catalog().values())
    by_family = []
    for fam in FAMILIES:
        members = sorted((e for e in entries if e.family == fam), key=lambda e: e.title.lower())
        if members:
            by_family.append({FAMILY_TITLES[fam]: [{e.title: page_path(e)} for e in members]})
    nav = []
    for item in config["nav"] or []:
        nav.append({"Entries": by_family} if item == {"Entries": "entries/"} else item)
    config["nav"] = nav
    return config


def on_files(files, config):
    entries = list(catalog().values())
    files.append(File.generated(config, "catalogue.md", content=catalogue_page(entries)))
    for e in entries:
        files.append(File.generated(config, page_path(e), content=entry_page(e)))
    files.append(File.generated(config, MATHJAX_URI, abs_src_path=str(_mathjax_file())))
    return files
