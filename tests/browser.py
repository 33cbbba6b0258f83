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


def check_formula_rendered(page) -> None:
    assert page.locator(".arithmatex").count() > 0, "no formula on the page"
    page.wait_for_function("() => window.MathJax && MathJax.startup && MathJax.startup.promise",
                           timeout=10_000)
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
  return [body, Array.from(document.querySelectorAll('.md-content .arithmatex')).map(el => {
    const svg = el.querySelector('mjx-container svg');
    const r = svg ? svg.getBoundingClientRect() : {width: 0, height: 0};
    return [el.textContent.slice(0, 50), Math.round(r.width), Math.round(r.height * 10) / 10];
  })];
}"""


def check_formula_sizes(page) -> None:
    """Every formula's rendered SVG is at least as tall as the body text's font size (not shrunk
    to fit the column, not collapsed by a narrow-screen rule)."""
    body, sizes = page.evaluate(FORMULA_SIZES)
    assert sizes, "no formula on the page"
    small = [s for s in sizes if s[2] < body]
    assert not small, f"formulas shorter than the body text ({body} px): {small[:3]}"


def first_search_result(page, query: str) -> str:
    """The address of the first search result for `query`, typed into Material's search box."""
    page.keyboard.press("/")
    box = page.locator("input.md-search__input")
    box.fill("")
    box.press_sequentially(query, delay=30)
    page.wait_for_selector(".md-search-result__item a", timeout=30_000)
    page.wait_for_timeout(300)
    return page.locator(".md-search-result__item a").first.get_attribute("href") or ""
