"""The built site in headless Chromium, served on loopback: the catalogue filter, rendered math,
loaded pictures, the source, search, no console errors and no request leaving loopback.

Screenshots of the home, catalogue and one entry page are saved under pytest's temporary folder
(the path is printed), never in the tree. The same page checks are shown to fail on a copy of the
site with MathJax removed and a picture deleted.
"""

import shutil

import pytest

from tests.browser import (
    CHROMIUM_ARGS,
    Watch,
    check_formula_rendered,
    check_pictures_loaded,
    check_source_shown,
    chromium_path,
    serve,
)

# One worker builds the site once for all the site tests (make test runs --dist loadgroup).
pytestmark = [pytest.mark.docs, pytest.mark.xdist_group("site")]
ENTRY = "linear-transformer"


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


def test_site_in_a_browser(site, page, tmp_path_factory):
    shots = tmp_path_factory.mktemp("screenshots")
    with serve(site) as base:
        page.goto(base)
        page.wait_for_load_state("networkidle")
        page.screenshot(path=str(shots / "home.png"), full_page=True)

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
        page.screenshot(path=str(shots / "catalogue.png"), full_page=True)

        page.goto(base + f"entries/{ENTRY}/")
        page.wait_for_load_state("networkidle")
        check_formula_rendered(page)
        check_pictures_loaded(page)
        check_source_shown(page, "def linear_attention(")
        page.screenshot(path=str(shots / "entry.png"), full_page=True)

        page.goto(base)
        page.wait_for_load_state("networkidle")
        page.keyboard.press("/")  # Material's shortcut that opens search
        # typed key by key: Material searches on keyboard events, not on a programmatic fill
        page.locator("input.md-search__input").press_sequentially("linear", delay=30)
        # the search index is built by a web worker: slow on a loaded machine
        page.wait_for_selector(".md-search-result__item", timeout=30_000)
        results = " ".join(page.locator(".md-search-result__item").all_inner_texts()).lower()
        assert "linear" in results

    print(f"\nscreenshots in {shots}")
    assert not page.watch.errors, page.watch.errors
    assert not page.watch.outside, f"requests left loopback: {page.watch.outside}"


def test_checks_fail_on_a_broken_site(site, page, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(site, broken)
    (broken / "assets" / "mathjax" / "tex-svg.js").write_text("/* planted: MathJax removed */")
    (broken / "assets" / "figures" / f"pattern-{ENTRY}.png").unlink()
    with serve(broken) as base:
        page.goto(base + f"entries/{ENTRY}/")
        page.wait_for_load_state("networkidle")
        with pytest.raises(Exception, match="MathJax|raw TeX|Timeout"):
            check_formula_rendered(page)
        with pytest.raises(AssertionError, match="pictures not loaded"):
            check_pictures_loaded(page)
        check_source_shown(page, "def linear_attention(")
