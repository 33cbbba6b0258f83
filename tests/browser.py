"""Helpers for the browser test: Debian's chromium (installed if missing, as root), a loopback
server for a built site, and page checks that raise AssertionError with a plain reason."""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import subprocess
import threading
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium_path() -> str:
    """/usr/bin/chromium, installing Debian's package first when it is missing and we are root."""
    found = shutil.which("chromium")
    if found:
        return found
    if os.geteuid() != 0:
        raise RuntimeError("chromium is missing and installing it needs root: "
                           "apt-get install chromium")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, capture_output=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], check=True, env=env,
                   capture_output=True)
    return shutil.which("chromium") or "/usr/bin/chromium"


@contextmanager
def serve(directory: Path):
    """Serve `directory` on 127.0.0.1 (a free port); yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class Watch:
    """Records console errors and refuses (and records) any request that leaves loopback."""

    def __init__(self, page):
        self.errors: list[str] = []
        self.outside: list[str] = []
        page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        page.on("pageerror", lambda e: self.errors.append(str(e)))
        page.route("**/*", self._route)

    def _route(self, route):
        url = route.request.url
        host = urlparse(url).hostname
        if url.startswith(("data:", "blob:")) or host in ("127.0.0.1", "localhost"):
            route.continue_()
        else:
            self.outside.append(url)
            route.abort()


def check_formula_rendered(page, timeout_ms: int = 10_000) -> None:
    """Every formula typeset by MathJax (waiting up to `timeout_ms` for MathJax to start)."""
    assert page.locator(".arithmatex").count() > 0, "no formula on the page"
    page.wait_for_function("() => window.MathJax && MathJax.startup && MathJax.startup.promise",
                           timeout=timeout_ms)
    page.evaluate("() => MathJax.startup.promise")
    rendered = page.locator(".arithmatex mjx-container").count()
    raw = page.evaluate("""() => Array.from(document.querySelectorAll('.arithmatex'))
        .filter(el => !el.querySelector('mjx-container')).map(el => el.textContent.slice(0, 60))""")
    assert rendered > 0 and not raw, f"formulas left as raw TeX: {raw[:3]} ({rendered} rendered)"


def check_pictures_loaded(page) -> None:
    images = page.evaluate("""() => Array.from(document.querySelectorAll('img.zoo-figure'))
        .map(img => [img.getAttribute('src'), img.complete ? img.naturalWidth : -1])""")
    assert images, "no pattern picture on the page"
    broken = [src for src, width in images if width <= 0]
    assert not broken, f"pictures not loaded: {broken}"


def check_source_shown(page, needle: str) -> None:
    code = page.locator("pre code").all_inner_texts()
    assert any(needle in c for c in code), f"the source file ({needle!r}) is not on the page"


FORMULA_SIZES = """() => {
  const body = parseFloat(getComputedStyle(document.querySelector('.md-content p') ||
                                           document.body).fontSize);
  // the entry a formula belongs to, on a page that gathers several (a data-entry marker before it)
  const entry = el => {
    for (let n = el; n; n = n.parentElement)
      for (let p = n.previousElementSibling; p; p = p.previousElementSibling)
        if (p.dataset && p.dataset.entry) return p.dataset.entry;
    return '';
  };
  return [body, Array.from(document.querySelectorAll('.md-content .arithmatex')).map(el => {
    const svg = el.querySelector('mjx-container svg');
    const r = svg ? svg.getBoundingClientRect() : {width: 0, height: 0};
    return [el.textContent.slice(0, 50), Math.round(r.width), Math.round(r.height * 10) / 10,
            entry(el)];
  })];
}"""


def check_formula_sizes(page) -> None:
    """Every formula's rendered SVG is at least as tall as the body text's font size (not shrunk
    to fit the column, not collapsed by a narrow-screen rule)."""
    body, sizes = page.evaluate(FORMULA_SIZES)
    assert sizes, "no formula on the page"
    small = [s for s in sizes if s[2] < body]
    where = sorted({s[3] for s in small if s[3]})  # on a page gathering several entries' formulas
    assert not small, (f"formulas shorter than the body text ({body} px)"
                       + (f" in {', '.join(where)}" if where else "") + f": {small[:3]}")


def first_search_result(page, query: str) -> str:
    """The address of the first search result for `query`, typed into Material's search box."""
    page.keyboard.press("/")
    box = page.locator("input.md-search__input")
    box.fill("")
    box.press_sequentially(query, delay=30)
    page.wait_for_selector(".md-search-result__item a", timeout=30_000)
    page.wait_for_timeout(300)
    return page.locator(".md-search-result__item a").first.get_attribute("href") or ""


# Layout checks (issue 19): each measures, in the browser, one thing a reader would see as broken.

SCROLLS_SIDEWAYS = """(selector) => Array.from(document.querySelectorAll(selector)).flatMap(el => {
  const out = [], column = document.querySelector('.md-content__inner').getBoundingClientRect();
  if (el.getBoundingClientRect().right > column.right + 1)
    out.push(`${el.tagName.toLowerCase()} runs past the text column`);
  // el and the scroll boxes around it inside the page's content
  for (let e = el; e && !e.matches('.md-content__inner'); e = e.parentElement)
    if ((e === el || getComputedStyle(e).overflowX !== 'visible') && e.scrollWidth > e.clientWidth + 1)
      out.push(`${e.tagName.toLowerCase()}.${e.className}: ${e.scrollWidth} px wide in ${e.clientWidth}`);
  return out;
})"""


def check_no_sideways_scroll(page, selector: str) -> None:
    """Nothing matching `selector`, nor any box around it inside the page's content, is wider than
    itself: every column and every line is visible without scrolling sideways."""
    found = page.locator(selector).count()
    assert found, f"nothing matches {selector!r}"
    wide = page.evaluate(SCROLLS_SIDEWAYS, selector)
    assert not wide, f"{selector} scrolls sideways: {sorted(set(wide))[:4]}"


BROKEN_WORDS = """(selector) => {
  const broken = [];
  for (const cell of document.querySelectorAll(selector)) {
    const walk = document.createTreeWalker(cell, NodeFilter.SHOW_TEXT);
    for (let node = walk.nextNode(); node; node = walk.nextNode()) {
      // a word may end a line after a hyphen, never elsewhere
      for (const m of node.data.matchAll(/[^\\s-]+-*/g)) {
        const range = document.createRange();
        range.setStart(node, m.index);
        range.setEnd(node, m.index + m[0].length);
        const tops = new Set(Array.from(range.getClientRects()).filter(r => r.width > 0)
                                  .map(r => Math.round(r.top)));
        if (tops.size > 1) broken.push(m[0]);
      }
    }
  }
  return broken;
}"""


def check_no_word_broken(page, selector: str = ".md-content td, .md-content th") -> None:
    """No word in the cells matching `selector` is split over two lines (an id in a code span
    broken as "longforme / r"); a line may break after a hyphen."""
    broken = page.evaluate(BROKEN_WORDS, selector)
    assert not broken, f"words broken mid-word in {selector}: {broken[:5]}"


CELL_BOXES = """(table) => {
  const row = Array.from(table.tBodies[0].rows).find(r => !r.hidden);
  const content = (cell) => { const r = document.createRange(); r.selectNodeContents(cell);
                              return r.getBoundingClientRect(); };
  return Array.from(table.tHead.rows[0].cells).map((th, i) => {
    const td = row.cells[i], s = getComputedStyle(th), t = getComputedStyle(td);
    const a = content(th), b = content(td);
    return {header: th.textContent, left: [a.left, b.left], right: [a.right, b.right],
            padding: Math.min(...[s, t].flatMap(x => [x.paddingLeft, x.paddingRight].map(parseFloat)))};
  });
}"""


def check_cells_padded_and_aligned(page, table: str) -> None:
    """Each column of `table` has horizontal padding, its headers stand apart (no "FamilyTime
    (ms)"), and each header is aligned as its column's cells are (both left or both right)."""
    cols = page.eval_on_selector(table, CELL_BOXES)
    tight = [c["header"] for c in cols if c["padding"] < 4]
    assert not tight, f"{table}: cells with under 4 px of horizontal padding: {tight}"
    close = [(a["header"], b["header"]) for a, b in zip(cols, cols[1:], strict=False)
             if b["left"][0] - a["right"][0] < 12]
    assert not close, f"{table}: headers run together: {close}"
    off = [c["header"] for c in cols
           if abs(c["left"][0] - c["left"][1]) > 2 and abs(c["right"][0] - c["right"][1]) > 2]
    assert not off, f"{table}: headers not aligned with their cells: {off}"


HANGS = """() => {
  const out = {wrapped: 0, bad: [], copies: []};
  const first = (span, after) => {  // the first non-space character's box, after a given top
    const walk = document.createTreeWalker(span, NodeFilter.SHOW_TEXT), r = document.createRange();
    for (let n = walk.nextNode(); n; n = walk.nextNode())
      for (let i = 0; i < n.data.length; i++) {
        if (/\\s/.test(n.data[i])) continue;
        r.setStart(n, i); r.setEnd(n, i + 1);
        const box = r.getBoundingClientRect();
        if (box.top > after) return box;
      }
    return null;
  };
  for (const code of document.querySelectorAll('.md-content pre > code')) {
    code.setAttribute('data-md-copying', '');  // what the copy button puts on the clipboard
    if (code.innerText.trimEnd() !== code.textContent.trimEnd())
      out.copies.push(code.textContent.slice(0, 40));
    code.removeAttribute('data-md-copying');
    for (const span of code.querySelectorAll(':scope > span')) {
      const line = parseFloat(getComputedStyle(span).lineHeight);
      if (span.getBoundingClientRect().height < 1.5 * line) continue;
      out.wrapped += 1;
      const start = first(span, -Infinity), next = first(span, start.top + line / 2);
      if (next && next.left < start.left + 2) out.bad.push(span.textContent.slice(0, 60));
    }
  }
  return out;
}"""


def check_code_wraps(page) -> None:
    """No code block on the page scrolls sideways: long lines wrap, and a wrapped line continues
    right of where its own text starts, so the indentation still reads; copying a block gives its
    lines as they are (no line doubled, none joined)."""
    check_no_sideways_scroll(page, ".md-content pre, .md-content pre > code")
    hangs = page.evaluate(HANGS)
    assert hangs["wrapped"], "no code line wraps: nothing to check the hanging indent on"
    assert not hangs["bad"], f"wrapped lines that continue left of their own start: {hangs['bad'][:3]}"
    assert not hangs["copies"], f"copying changes these blocks' text: {hangs['copies'][:3]}"


TABLE_BOXES = """() => {
  const article = document.querySelector('.md-content__inner').getBoundingClientRect();
  return Array.from(document.querySelectorAll('.md-content table')).map(t => {
    const r = t.getBoundingClientRect();
    return {head: t.rows[0].textContent.trim().slice(0, 40), left: r.left, right: r.right,
            column: [article.left, article.right], viewport: window.innerWidth,
            scrolls: t.scrollWidth > t.clientWidth + 1, overflow: getComputedStyle(t).overflowX};
  });
}"""


def check_tables_in_their_box(page) -> None:
    """Every table's bordered box lies inside the text column (and the screen); one wider than the
    column scrolls inside that box, instead of running off the screen's edge."""
    tables = page.evaluate(TABLE_BOXES)
    assert tables, "no table on the page"
    out = [(t["head"], round(t["left"]), round(t["right"]), t["column"]) for t in tables
           if t["left"] < t["column"][0] - 1 or t["right"] > min(t["column"][1], t["viewport"]) + 1]
    assert not out, f"tables cut off by the edge of the column or screen: {out[:3]}"
    stuck = [t["head"] for t in tables if t["scrolls"] and t["overflow"] not in ("auto", "scroll")]
    assert not stuck, f"tables wider than their box that do not scroll: {stuck}"


def _background(page) -> tuple[int, int, int]:
    rgb = page.evaluate("() => getComputedStyle(document.body).backgroundColor")
    return tuple(int(float(x)) for x in rgb[rgb.index("(") + 1:rgb.index(")")].split(",")[:3])


def check_scroll_shows(page, selector: str) -> int:
    """Each element matching `selector` whose content is wider than itself scrolls (overflow auto)
    and shows it: its right edge, scrolled to the start, is shaded over its whole height, not cut
    through the content as if clipped (scroll bars are hidden on phones and in screenshots).
    Returns how many overflowed (the caller may need some)."""
    from io import BytesIO

    from PIL import Image

    bg = _background(page)
    shown = 0
    for el in page.locator(selector).all():
        if not el.evaluate("e => e.scrollWidth > e.clientWidth + 1"):
            continue
        overflow = el.evaluate("e => { e.scrollLeft = 0; return getComputedStyle(e).overflowX; }")
        assert overflow in ("auto", "scroll"), f"{selector}: wider than its box and clipped ({overflow})"
        shot = Image.open(BytesIO(el.screenshot())).convert("RGB")
        edge = [shot.getpixel((shot.width - 3, y)) for y in range(shot.height)]
        plain = sum(all(abs(a - b) <= 6 for a, b in zip(px, bg, strict=True)) for px in edge) / len(edge)
        text = el.evaluate("e => e.textContent.trim().slice(0, 40)")
        assert plain < 0.2, (f"{selector} {text!r}: cut at its right edge with no sign that it "
                             f"scrolls ({plain:.0%} of the edge is plain background)")
        shown += 1
    return shown


def check_figures_open_full_size(page) -> None:
    """Every figure drawn smaller than its pixels is a link to the image itself, so tapping it
    opens the picture at full size (a three-panel plot on a phone is otherwise unreadable)."""
    figures = page.evaluate("""() => Array.from(document.querySelectorAll('img.zoo-figure')).map(img =>
        [img.getAttribute('src'), img.getBoundingClientRect().width, img.naturalWidth,
         img.closest('a') ? img.closest('a').href === img.src : false])""")
    assert figures, "no figure on the page"
    shrunk = [src for src, width, natural, linked in figures if width < 0.9 * natural and not linked]
    assert not shrunk, f"shrunk figures that do not open at full size: {shrunk}"


CUT_OFF = """() => {
  const area = document.querySelector('.md-content').getBoundingClientRect();
  const left = Math.max(area.left, 0), right = Math.min(area.right, window.innerWidth);
  // a box that scrolls sideways and shows it (the shadow cover of zoo.css, attached to its content)
  const scrolls = (e) => ['auto', 'scroll'].includes(getComputedStyle(e).overflowX) &&
                         getComputedStyle(e).backgroundAttachment.includes('local');
  const out = [];
  for (const el of document.querySelectorAll('.md-content__inner *')) {
    const r = el.getBoundingClientRect();
    if (!r.width || !r.height || (r.left >= left - 1 && r.right <= right + 1)) continue;
    let box = el.parentElement;  // such a box around el keeps it in sight (that box is checked too)
    while (!box.matches('.md-content') && !scrolls(box)) box = box.parentElement;
    if (!box.matches('.md-content')) continue;
    const name = el.tagName.toLowerCase() + (el.className ? `.${String(el.className).split(' ')[0]}` : '');
    out.push(`${name} spans ${Math.round(r.left)}-${Math.round(r.right)} px, outside ` +
             `${Math.round(left)}-${Math.round(right)}: ${el.textContent.trim().slice(0, 30)}`);
  }
  return out;
}"""


def check_nothing_cut_off(page) -> None:
    """Every box in the page's content (a table, a signature, a cell's code) lies inside the content
    area and the screen, or inside a box that scrolls sideways and shows that it does (zoo.css's
    shadow): nothing is cut off by the screen's edge. A table in a wrapper that scrolls (Material's
    scroll wrap, edge to edge on a phone) is cut off: its border runs off the screen, with no sign."""
    out = page.evaluate(CUT_OFF)
    assert not out, f"{len(out)} boxes cut off by the edge of the content or screen: {out[:4]}"


def set_scheme(page, scheme: str) -> None:
    """Switch Material's colour scheme ("default" or "slate") with the palette toggle in the header,
    as a reader would; Material keeps the choice for the next pages."""
    wanted = f"document.body.getAttribute('data-md-color-scheme') === '{scheme}'"
    for _ in range(3):
        if page.evaluate(f"() => {wanted}"):
            return
        page.locator("form[data-md-component=palette] label:visible").first.click()
        page.wait_for_timeout(200)
    page.wait_for_function(f"() => {wanted}", timeout=5_000)


def _luminance(rgb) -> float:
    def linear(c: int) -> float:
        c = c / 255
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (linear(c) for c in rgb)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast(a, b) -> float:
    """WCAG's contrast ratio of two colours (1 to 21)."""
    la, lb = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (la + 0.05) / (lb + 0.05)


def _pixels(image) -> list[tuple[int, int, int]]:
    """An RGB image's pixels, row by row."""
    import numpy as np

    return [tuple(px) for px in np.asarray(image).reshape(-1, 3).tolist()]


def check_pictures_suit_the_scheme(page, selector: str = "img.zoo-figure") -> int:
    """Each shown picture matching `selector` sits on the page's own background in the page's colour
    scheme (a ring 3 px wide along its border is, for 80% or more, the page's background: not a white
    rectangle on the dark page), and its text (the title band, the top 12%) stands out from that
    background by WCAG's 4.5:1 contrast or more. Returns how many pictures were shown."""
    from collections import Counter
    from io import BytesIO

    from PIL import Image

    bg = _background(page)
    scheme = page.evaluate("() => document.body.getAttribute('data-md-color-scheme')")
    shown = 0
    for img in page.locator(selector).all():
        if not img.is_visible():
            continue
        img.evaluate("i => i.scrollIntoView({block: 'center'})")  # clear of the sticky header
        src = img.get_attribute("src")
        assert img.evaluate("i => i.decode().then(() => i.naturalWidth, () => 0)"), f"{src} not loaded"
        shot = Image.open(BytesIO(img.screenshot())).convert("RGB")
        w, h = shot.size
        edges = [(0, 0, w, 3), (0, h - 3, w, h), (0, 3, 3, h - 3), (w - 3, 3, w, h - 3)]
        ring = [px for box in edges for px in _pixels(shot.crop(box))]
        near = [px for px in ring if all(abs(a - b) <= 12 for a, b in zip(px, bg, strict=True))]
        typical = Counter(ring).most_common(1)[0][0]
        assert len(near) >= 0.8 * len(ring), (
            f"{src} in the {scheme} scheme: drawn on a background of its own (its border mostly "
            f"{typical}, {len(near) / len(ring):.0%} the page's {bg}): a rectangle on the page")
        band = set(_pixels(shot.crop((0, 0, w, max(1, h * 12 // 100)))))
        ink = max(band, key=lambda px: contrast(px, bg))
        assert contrast(ink, bg) >= 4.5, (
            f"{src} in the {scheme} scheme: its text {ink} on the page's {bg} has contrast "
            f"{contrast(ink, bg):.1f}:1, under 4.5:1")
        shown += 1
    return shown
