"""The built site in headless Chromium, served on loopback: the catalogue filter, rendered math,
loaded pictures, the source, search, no console errors and no request leaving loopback; and the
layout, measured (tests/browser.py): the claims table fits beside the navigation, no word in a table
is split mid-word, code blocks wrap instead of scrolling sideways, tables scroll inside their own
box on a phone, whatever scrolls shows it, the comparison table's cells are padded and aligned,
shrunk figures open at full size, the catalogue fits its column at 1280 px, nothing on the API
page is cut off by a phone's screen, and the pictures sit on the page's background with legible
text in the light and the dark colour scheme: on every page that shows a drawn picture (the entry
pages, the comparison cards, the benchmarks, the Quality page and "Which one?").

Screenshots of the home, catalogue, API, "Which one?", comparison and one entry page (desktop and
phone; the catalogue, API and entry pages in the dark scheme too), and of every page with a drawn
picture but the entries (one entry only) in the dark scheme, are taken with ZOO_SHOTS=<folder>
(outside the tree), for a person to look at; the checks themselves never need them, so a plain
run skips them (they cost a tenth of the file's time). The same page checks are shown to fail on
a copy of the site with MathJax removed, a picture deleted, without the CSS that keeps formulas at
their size, and with issue 19's layout planted back.
"""

import json
import os
import re
import shutil
from pathlib import Path

import pytest

import zoo
from tests.browser import (
    CHROMIUM_ARGS,
    FORMULA_SIZES,
    Watch,
    check_cells_padded_and_aligned,
    check_code_wraps,
    check_figures_open_full_size,
    check_formula_rendered,
    check_formula_sizes,
    check_no_sideways_scroll,
    check_no_word_broken,
    check_nothing_cut_off,
    check_pictures_loaded,
    check_pictures_suit_the_scheme,
    check_scroll_shows,
    check_source_shown,
    check_tables_in_their_box,
    chromium_path,
    first_search_result,
    serve,
    set_scheme,
)

# The site is built once per run, shared by the workers (tests/conftest.py: `site`).
pytestmark = [pytest.mark.docs]
ENTRY = "linear-transformer"


SHOTS = os.environ.get("ZOO_SHOTS")  # a folder: full-page screenshots for a person to look at


def shoot(page, name: str, dark: bool = True) -> None:
    """With ZOO_SHOTS, a full-page screenshot `name`.png there, and with `dark` `name`-dark.png in
    the dark scheme."""
    if not SHOTS:
        return
    shots = Path(SHOTS)
    shots.mkdir(parents=True, exist_ok=True)
    page.evaluate("() => window.scrollTo(0, 0)")
    page.screenshot(path=str(shots / f"{name}.png"), full_page=True)
    if dark:
        set_scheme(page, "slate")
        page.evaluate("() => window.scrollTo(0, 0)")
        page.screenshot(path=str(shots / f"{name}-dark.png"), full_page=True)
        set_scheme(page, "default")


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = context.new_page()
    pg.watch = Watch(pg)
    yield pg
    context.close()


@pytest.mark.slow
def test_site_in_a_browser(site, page):
    with serve(site) as base:
        page.goto(base)
        page.wait_for_load_state("networkidle")
        # the claims table: every column beside the navigation, no id split mid-word
        check_no_sideways_scroll(page, ".md-content table")
        check_no_word_broken(page)
        shoot(page, "home", dark=False)
        page.set_viewport_size({"width": 400, "height": 800})
        check_tables_in_their_box(page)
        shoot(page, "home-phone", dark=False)
        page.set_viewport_size({"width": 1280, "height": 900})

        page.goto(base + "catalogue/")
        page.wait_for_load_state("networkidle")
        check_formula_rendered(page)  # the complexities in the table
        rows = page.locator("#zoo-catalogue tbody tr")
        total = rows.count()
        visible = lambda: page.locator("#zoo-catalogue tbody tr:not([hidden])").count()  # noqa: E731
        assert visible() == total > 0
        page.select_option("select[data-zoo-filter=autoregressive]", "yes")
        narrowed = visible()
        assert 0 < narrowed < total, (narrowed, total)
        page.select_option("select[data-zoo-filter=autoregressive]", "")
        page.fill("input[data-zoo-filter=text]", "linear attention")
        assert 0 < visible() < total
        page.fill("input[data-zoo-filter=text]", "")
        page.click("th[data-sort=year]")
        years = [int(y) for y in page.eval_on_selector_all(
            "#zoo-catalogue tbody tr", "rows => rows.map(r => r.dataset.year)")]
        assert years == sorted(years)
        check_no_sideways_scroll(page, "#zoo-catalogue")  # every column fits at 1280 px
        check_nothing_cut_off(page)
        shoot(page, "catalogue")
        page.set_viewport_size({"width": 400, "height": 800})
        check_nothing_cut_off(page)  # on a phone it scrolls inside its box, and shows that it does
        assert check_scroll_shows(page, "#zoo-catalogue") == 1
        shoot(page, "catalogue-phone")
        page.set_viewport_size({"width": 1280, "height": 900})

        page.goto(base + "api/")  # mkdocstrings' tables: inside their box, scrolling on a phone
        page.wait_for_load_state("networkidle")
        check_nothing_cut_off(page)
        check_tables_in_their_box(page)
        shoot(page, "api")
        page.set_viewport_size({"width": 400, "height": 800})
        check_nothing_cut_off(page)
        check_tables_in_their_box(page)
        assert check_scroll_shows(page, ".md-content table") >= 1
        shoot(page, "api-phone")
        page.set_viewport_size({"width": 1280, "height": 900})

        page.goto(base + f"entries/{ENTRY}/")
        page.wait_for_load_state("networkidle")
        check_formula_rendered(page)
        check_pictures_loaded(page)
        check_source_shown(page, "def linear_attention(")
        check_code_wraps(page)  # the source has 110-column lines
        check_no_word_broken(page)
        # the pictures on the page's background, their text legible, in either colour scheme
        assert check_pictures_suit_the_scheme(page) == 2  # the pattern and the benchmark
        set_scheme(page, "slate")
        assert check_pictures_suit_the_scheme(page) == 2
        set_scheme(page, "default")
        shoot(page, "entry")
        page.set_viewport_size({"width": 400, "height": 800})
        check_tables_in_their_box(page)
        check_figures_open_full_size(page)
        pattern = "img.zoo-figure[src*='/pattern-']"  # (the 3-panel plot is too small to read here)
        assert check_pictures_suit_the_scheme(page, pattern) == 1
        set_scheme(page, "slate")
        assert check_pictures_suit_the_scheme(page, pattern) == 1
        set_scheme(page, "default")
        shoot(page, "entry-phone")
        page.click(f"img[src$='bench-{ENTRY}.png']")  # tapped, the three-panel plot opens alone
        page.wait_for_load_state("load")
        assert page.url.endswith(f"/assets/figures/bench-{ENTRY}.png"), page.url
        page.goto(base + "entries/performer/")  # a long formula, a complexity table wider than a phone
        page.wait_for_load_state("networkidle")
        check_formula_rendered(page)
        check_tables_in_their_box(page)
        assert check_scroll_shows(page, ".md-content table, .md-content div.arithmatex") >= 2
        page.set_viewport_size({"width": 1280, "height": 900})

        page.goto(base + "choose/")
        page.wait_for_load_state("networkidle")
        check_pictures_loaded(page)  # the Pareto plot
        shoot(page, "choose", dark=False)

        page.goto(base + "compare/?sort=speedup&dir=desc&pick=performer,linformer")
        page.wait_for_load_state("networkidle")
        speeds = page.eval_on_selector_all("#zoo-compare tbody tr",
                                           "rows => rows.map(r => parseFloat(r.dataset.speedup))")
        measured = [x for x in speeds if x == x]  # NaN (unmeasured) rows come last
        assert measured and measured == sorted(measured, reverse=True), speeds[:5]
        assert page.locator("#zoo-side [data-card]").count() == 2
        page.select_option("[data-zoo-for=zoo-compare] select[data-zoo-filter=family]", "kernel")
        assert "family=kernel" in page.url and "pick=performer%2Clinformer" in page.url, page.url
        page.click("#zoo-compare th[data-sort=memory]")
        assert "sort=memory" in page.url
        check_cells_padded_and_aligned(page, "#zoo-compare")
        for scheme in ("slate", "default"):  # the cards' pattern pictures follow the scheme too
            set_scheme(page, scheme)
            assert check_pictures_suit_the_scheme(page, "#zoo-side img.zoo-figure") == 2
        # Performer's formula is wider than its card: it scrolls there, and shows that it does
        assert check_scroll_shows(page, "#zoo-side .zoo-card div.arithmatex") >= 1
        shoot(page, "compare", dark=False)  # from the top: a scrolled page's header floats

        page.goto(base)
        page.wait_for_load_state("networkidle")
        page.keyboard.press("/")  # Material's shortcut that opens search
        # typed key by key: Material searches on keyboard events, not on a programmatic fill
        page.locator("input.md-search__input").press_sequentially("linear", delay=30)
        # the search index is built by a web worker: slow on a loaded machine
        page.wait_for_selector(".md-search-result__item", timeout=30_000)
        results = " ".join(page.locator(".md-search-result__item").all_inner_texts()).lower()
        assert "linear" in results
        for query, wanted in (("FAVOR", "performer"), ("LSH", "reformer"), ("Nystrom", "nystromformer")):
            page.goto(base)
            page.wait_for_load_state("networkidle")
            href = first_search_result(page, query)
            assert f"entries/{wanted}/" in href, (query, href)

    assert not page.watch.errors, page.watch.errors
    assert not page.watch.outside, f"requests left loopback: {page.watch.outside}"


def pages_with_pictures(site) -> list[str]:
    """The paths (from the site's root) of the pages that show a picture the site draws."""
    return sorted(f"{p.parent.relative_to(site).as_posix()}/".removeprefix("./")
                  for p in site.rglob("index.html") if 'class="zoo-figure"' in p.read_text())


SHOWS = {"compare/": "?pick=performer,linformer"}  # the comparison's pictures are on its cards


PICTURE = re.compile(r'<img [^>]*class="zoo-figure"[^>]*>')
PAIR = re.compile(r'<a class="zoo-light" href="([^"]+)"><img [^>]*class="zoo-figure"[^>]*></a>'
                  r'<a class="zoo-dark" href="([^"]+)"><img [^>]*class="zoo-figure"[^>]*></a>')


def unpaired_pictures(site) -> list[str]:
    """Every drawn picture on every built page is a light and dark pair (`themed_figure`), the dark
    file present and not the light one's bytes; what breaks that, as `page: why` lines."""
    problems = []
    for html_path in sorted(site.rglob("index.html")):
        text = html_path.read_text()
        pictures, pairs = len(PICTURE.findall(text)), PAIR.findall(text)
        where = html_path.parent.relative_to(site).as_posix()
        if pictures != 2 * len(pairs):
            problems.append(f"{where}: {pictures} drawn pictures, {len(pairs)} light/dark pairs")
        for light, dark in pairs:
            lp, dp = (html_path.parent / light).resolve(), (html_path.parent / dark).resolve()
            if not dp.is_file() or dp.read_bytes() == lp.read_bytes():
                problems.append(f"{where}: {dark} missing or the same picture as {light}")
    return problems


def test_every_drawn_picture_has_its_dark_twin(site, tmp_path):
    """Over every page of the site (the browser check below looks at one page of each kind, since
    they share `themed_figure`); shown failing on a copy with one dark twin removed."""
    pages = pages_with_pictures(site)
    assert sum(p.startswith("entries/") for p in pages) == len(zoo.names()), pages
    assert unpaired_pictures(site) == []
    broken = tmp_path / "broken"
    shutil.copytree(site, broken)
    entry = broken / "entries" / "performer" / "index.html"
    entry.write_text(re.sub(r'<a class="zoo-dark" href="[^"]*pattern[^"]*">.*?</a>', "", entry.read_text(),
                            count=1))
    problems = unpaired_pictures(broken)
    assert len(problems) == 1 and problems[0].startswith("entries/performer: "), problems
    assert "light/dark pairs" in problems[0], problems


# One page of each kind: the entry pages' pictures all come from the same code (see the check
# over every page above); an image entry's pattern is drawn differently from a sequence entry's.
SCHEME_PAGES = ["benchmarks/", "quality/", "choose/", "compare/", f"entries/{ENTRY}/",
                "entries/non-local/", "entries/performer/"]


@pytest.mark.slow
def test_drawn_pictures_suit_both_schemes(site, page):
    """At 1280 px, on one page of each kind, in the light and in the dark scheme, each shown
    picture is on the page's background with legible text, and as many show in either."""
    pages = pages_with_pictures(site)
    figures = site / "assets" / "figures"
    families = len(list(figures.glob("bench-family-*-dark.png")))
    expected = {"benchmarks/": families, "quality/": 2, "choose/": 1, "compare/": 2, f"entries/{ENTRY}/": 2}
    assert families and set(SCHEME_PAGES) <= set(pages), pages
    with serve(site) as base:
        for path in SCHEME_PAGES:
            page.goto(base + path + SHOWS.get(path, ""))
            page.wait_for_load_state("load")  # (the check waits for each picture it looks at)
            shown = []
            for scheme in ("default", "slate"):
                set_scheme(page, scheme)
                try:
                    shown.append(check_pictures_suit_the_scheme(page))
                except AssertionError as err:
                    raise AssertionError(f"{path}: {err}") from None
            assert shown[0] == shown[1] == expected.get(path, shown[0]) > 0, (path, shown)
            shoot(page, path.strip("/").replace("/", "-") + "-dark", dark=False)
    assert not page.watch.errors, page.watch.errors


def test_checks_fail_on_a_broken_site(site, page, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(site, broken)
    (broken / "assets" / "mathjax" / "tex-svg.js").write_text("/* planted: MathJax removed */")
    (broken / "assets" / "figures" / f"pattern-{ENTRY}.png").unlink()
    with serve(broken) as base:
        page.goto(base + f"entries/{ENTRY}/")
        page.wait_for_load_state("networkidle")
        with pytest.raises(Exception, match="MathJax|raw TeX|Timeout"):
            # the page has loaded and gone quiet (networkidle): a MathJax that has not started
            # by then never will, so a short wait suffices
            check_formula_rendered(page, timeout_ms=1500)
        with pytest.raises(AssertionError, match="pictures not loaded"):
            check_pictures_loaded(page)
        check_source_shown(page, "def linear_attention(")


ARTICLE = re.compile(r'(<article class="md-content__inner md-typeset">)(.*?)(</article>)', re.S)


def every_formula_page(site) -> str:
    """An entry page whose article holds the articles of every entry page, each after a hidden
    `data-entry` marker and without its code blocks and pictures (no formula is in them): every
    formula of the entry pages in the column it sits in, typeset by one MathJax run, not 68."""
    parts = []
    for i in zoo.names():
        found = ARTICLE.search((site / "entries" / i / "index.html").read_text())
        assert found, f"entries/{i}/: no article"
        body = re.sub(r"<pre\b.*?</pre>", "", found.group(2), flags=re.S)
        body = re.sub(r"<img\b[^>]*>", "", body)
        assert 'class="arithmatex"' in body, f"entries/{i}/: no formula on the page"
        parts.append(f'<span hidden data-entry="{i}"></span>{body}')
    template = (site / "entries" / ENTRY / "index.html").read_text()
    return ARTICLE.sub(lambda m: m.group(1) + "".join(parts) + m.group(3), template, count=1)


def open_every_formula_page(page, site, base: str) -> None:
    """`every_formula_page` at entries/every-formula/ (as deep as an entry page, so its relative
    links hold), its formulas typeset."""
    url = base + "entries/every-formula/"
    html = every_formula_page(site)
    page.route(url, lambda route: route.fulfill(body=html, content_type="text/html"))
    page.goto(url)
    page.wait_for_load_state("load")
    check_formula_rendered(page)


def test_every_formula_legible_on_phone_and_desktop(site, page):
    """At 400 and 1280 px every formula on every entry page is at least as tall as the text."""
    with serve(site) as base:
        open_every_formula_page(page, site, base)
        entries = {s[3] for s in page.evaluate(FORMULA_SIZES)[1]}
        assert entries == set(zoo.names()), sorted(set(zoo.names()) - entries)
        for width in (1280, 400):
            page.set_viewport_size({"width": width, "height": 900})
            try:
                check_formula_sizes(page)
            except AssertionError as err:
                raise AssertionError(f"at {width} px: {err}") from None


def test_size_check_fails_without_the_css_fix(site, page, tmp_path):
    """Material's own rules (the zoo's override removed) collapse a display formula below 720 px:
    on an entry page, and on the gathered page, which names the entries it happens in."""
    broken = tmp_path / "broken"
    shutil.copytree(site, broken, ignore=shutil.ignore_patterns("*.png"))
    (broken / "assets" / "zoo.css").write_text("/* planted: no formula-size override */")
    with serve(broken) as base:
        page.set_viewport_size({"width": 400, "height": 900})
        page.goto(base + "entries/performer/")
        page.wait_for_load_state("load")
        check_formula_rendered(page)
        with pytest.raises(AssertionError, match="shorter than the body text"):
            check_formula_sizes(page)
        open_every_formula_page(page, broken, base)
        with pytest.raises(AssertionError, match=r"shorter than the body text \(\S+ px\) in .*\bperformer\b"):
            check_formula_sizes(page)


def test_layout_checks_fail_on_the_old_layout(site, page, tmp_path):
    """The layout checks catch what issue 19 saw, planted back into a copy of the site: no zoo.css
    (code blocks scroll sideways, the claims table does not fit, tables run off a phone's screen),
    figures without their link, and a comparison page whose table has its old class (Material's
    table style off: no padding) and whose formulas scroll with no shadow at the edge."""
    import re

    broken = tmp_path / "broken"
    shutil.copytree(site, broken)
    assets = broken / "assets"
    (assets / "zoo.css").rename(assets / "zoo-kept.css")
    (assets / "zoo.css").write_text("/* planted: no zoo.css */")
    entry = broken / "entries" / ENTRY / "index.html"
    entry.write_text(re.sub(r'<a [^>]*href="[^"]*\.png">(<img [^>]*>)</a>', r"\1", entry.read_text()))
    compare = broken / "compare" / "index.html"
    no_shadow = "<style>.md-typeset div.arithmatex { background: none !important; }</style></head>"
    compare.write_text(compare.read_text()
                       .replace('<table id="zoo-compare">', '<table id="zoo-compare" class="zoo-table">')
                       .replace("assets/zoo.css", "assets/zoo-kept.css").replace("</head>", no_shadow))
    with serve(broken) as base:
        page.goto(base)
        page.wait_for_load_state("networkidle")
        with pytest.raises(AssertionError, match="scrolls sideways"):
            check_no_sideways_scroll(page, ".md-content table")
        page.goto(base + f"entries/{ENTRY}/")
        page.wait_for_load_state("networkidle")
        with pytest.raises(AssertionError, match="scrolls sideways"):
            check_code_wraps(page)
        page.set_viewport_size({"width": 400, "height": 800})
        with pytest.raises(AssertionError, match="cut off by the edge"):
            check_tables_in_their_box(page)
        with pytest.raises(AssertionError, match="do not open at full size"):
            check_figures_open_full_size(page)
        page.set_viewport_size({"width": 1280, "height": 900})
        page.goto(base + "compare/?pick=performer,linformer")  # two cards: the formula overflows
        page.wait_for_load_state("networkidle")
        with pytest.raises(AssertionError, match="no sign that it scrolls"):
            check_scroll_shows(page, "#zoo-side .zoo-card div.arithmatex")
        with pytest.raises(AssertionError, match="padding"):
            check_cells_padded_and_aligned(page, "#zoo-compare")


def _cut(css: str, heading: str) -> str:
    """`css` without the block that starts with the comment beginning `heading` (to its blank line)."""
    start = css.index(f"/* {heading}")
    end = css.find("\n\n", start)
    return css[:start] + (css[end:] if end >= 0 else "")


@pytest.mark.slow
def test_issue19_checks_fail_on_the_defects_planted_back(site, page, tmp_path):
    """The last three of issue 19's defects, planted back into a copy of the site, each caught: the
    catalogue wider than its column at 1280 px (zoo.css without its catalogue rules), the API page's
    tables running off a phone's screen (without the rules that let mkdocstrings' tables scroll),
    and the pattern picture a white rectangle in the dark scheme (the light picture served for the
    dark one), and so the pictures of the other pages (a family's benchmark plot, the recall heat
    map, the Pareto plot); and a picture whose text is light on the light page (the dark one served
    for the light one) fails the legibility half of the same check."""
    broken = tmp_path / "broken"
    shutil.copytree(site, broken)
    css = broken / "assets" / "zoo.css"
    css.write_text(_cut(_cut(css.read_text(), "The catalogue's table fits"), "The API page's tables"))
    figures = broken / "assets" / "figures"
    shutil.copy(figures / f"pattern-{ENTRY}.png", figures / f"pattern-{ENTRY}-dark.png")
    shutil.copy(figures / "pattern-performer-dark.png", figures / "pattern-performer.png")
    family = sorted(figures.glob("bench-family-*-dark.png"))[-1].name.removesuffix("-dark.png")
    for name in (family, "quality-heatmap", "quality-pareto"):
        shutil.copy(figures / f"{name}.png", figures / f"{name}-dark.png")
    with serve(broken) as base:
        page.goto(base + "catalogue/")
        page.wait_for_load_state("networkidle")
        with pytest.raises(AssertionError, match="scrolls sideways"):
            check_no_sideways_scroll(page, "#zoo-catalogue")
        page.set_viewport_size({"width": 400, "height": 800})
        page.goto(base + "api/")
        page.wait_for_load_state("networkidle")
        with pytest.raises(AssertionError, match="cut off by the edge of the content or screen"):
            check_nothing_cut_off(page)
        with pytest.raises(AssertionError, match="cut off by the edge of the column or screen"):
            check_tables_in_their_box(page)
        page.set_viewport_size({"width": 1280, "height": 900})
        page.goto(base + f"entries/{ENTRY}/")
        page.wait_for_load_state("networkidle")
        pattern = "img.zoo-figure[src*='/pattern-']"
        assert check_pictures_suit_the_scheme(page, pattern) == 1  # light: as it was
        set_scheme(page, "slate")
        with pytest.raises(AssertionError, match="slate scheme: drawn on a background of its own"):
            check_pictures_suit_the_scheme(page, pattern)
        set_scheme(page, "default")
        page.goto(base + "entries/performer/")
        page.wait_for_load_state("networkidle")
        with pytest.raises(AssertionError, match=r"default scheme: its text .* under 4\.5:1"):
            check_pictures_suit_the_scheme(page, pattern)
        # the last family's plot on the benchmarks page, the heat map (first) on the Quality page
        for path, name in (("benchmarks/", family), ("quality/", "quality-heatmap"),
                           ("choose/", "quality-pareto")):
            page.goto(base + path)
            page.wait_for_load_state("networkidle")
            set_scheme(page, "default")
            assert check_pictures_suit_the_scheme(page) >= 1  # light: as it was
            set_scheme(page, "slate")
            with pytest.raises(AssertionError, match=f"{name}-dark.png in the slate scheme: drawn on "
                                                     "a background of its own"):
                check_pictures_suit_the_scheme(page)


def test_search_index_has_names_not_source_or_bibtex(site):
    docs = json.loads((site / "search" / "search_index.json").read_text())["docs"]
    titles = {d["title"] for d in docs}
    assert not titles & {"Source", "BibTeX"}, "Source or BibTeX sections are in the search index"
    entry_sections = [d for d in docs if d["location"].startswith("entries/")]
    assert entry_sections and not any("@inproceedings" in d["text"] or "def forward(" in d["text"]
                                      for d in entry_sections)  # (the Use page shows code on purpose)
    pages = {d["location"]: d for d in docs if "#" not in d["location"]}
    assert pages["entries/performer/"]["title"] == "Performer"
    assert "FAVOR+" in pages["entries/performer/"]["text"]
