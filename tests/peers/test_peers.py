"""Each entry equals the public implementation people use, where the two can be set alike, and
each difference as shipped is there, has the stated cause, and is the size the site prints.

The tables are `zoo.site.peers` (what the pages say); the comparisons are `tests/peers/pairs.py`.
A package missing from the extra `peers` skips only its own comparisons, naming it.
"""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path

import pytest

from tests.peers import pairs
from zoo.site.peers import DIFFERENCES, PAIRS

MEASURED = Path(__file__).resolve().parents[2] / "benchmarks" / "peers.json"
TOLERANCE = {p.function: p.tolerance for p in PAIRS}


def committed() -> dict:
    return json.loads(MEASURED.read_text())


@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: p.function)
def test_equal(pair):
    ours, theirs = getattr(pairs, pair.function)()
    assert ours.shape == theirs.shape
    got = pairs.rel(ours, theirs)
    assert got <= pair.tolerance, f"{pair.entry} vs {pair.peer}: {got:.2e}"
    assert committed()["pairs"][pair.function] <= pair.tolerance


@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: p.function)
def test_equal_bites(pair):
    """One of our weights moved by 1e-3 after the copy: the comparison must fail."""
    got = pairs.rel(*getattr(pairs, pair.function)(perturb=True))
    assert got > 1e4 * pair.tolerance, f"{pair.function}: a moved weight went unnoticed ({got:.2e})"


@pytest.mark.parametrize("diff", DIFFERENCES, ids=lambda d: d.function)
def test_difference(diff):
    """As shipped the two differ; with the stated cause removed they agree; the committed size is
    the one measured now: to 1%, or within a factor of 4 where the difference is float32 rounding
    (under 1e-5), which another CPU's vector code may round differently."""
    shipped, removed = getattr(pairs, diff.function)()
    assert shipped > 1e-9, f"{diff.function}: no difference as shipped ({shipped:.2e})"
    assert removed <= 1e-12, f"{diff.function}: the cause removed, still {removed:.2e}"
    size = committed()["differences"][diff.function]
    if shipped > 1e-5:
        assert math.isclose(size["shipped"], shipped, rel_tol=1e-2), (size, shipped)
    else:
        assert 0.25 < size["shipped"] / shipped < 4, (size, shipped)
    assert size["removed"] <= 1e-12


@pytest.mark.parametrize("diff", DIFFERENCES, ids=lambda d: d.function)
def test_difference_bites(diff):
    """The comparison with the cause removed fails when one of our weights is moved."""
    _, removed = getattr(pairs, diff.function)(perturb=True)
    assert removed > 1e-9, f"{diff.function}: a moved weight went unnoticed ({removed:.2e})"


def test_tables_cover_the_comparisons():
    """Every comparison in pairs.py is on the site, every one on the site exists, and the
    committed file holds exactly the site's."""
    listed = {p.function for p in PAIRS} | {d.function for d in DIFFERENCES}
    defined = {name for name, f in inspect.getmembers(pairs, inspect.isfunction)
               if f.__module__ == pairs.__name__}
    assert listed <= defined, f"on the site but not in pairs.py: {listed - defined}"
    unlisted = {name for name in defined if name.endswith("_pair") and name[0] != "_"} - listed
    assert not unlisted, f"comparisons the site does not show: {unlisted}"
    data = committed()
    assert set(data["pairs"]) == {p.function for p in PAIRS}
    assert set(data["differences"]) == {d.function for d in DIFFERENCES}


def test_pages_show_every_comparison():
    """The gathered page lists every pair and difference with the committed size; each entry page
    with one has the section; entries without one have none."""
    import zoo
    from zoo.site.peers import cell, entry_peers, peers_page

    data = committed()
    page = peers_page(data)
    for p in PAIRS:
        assert p.entry in zoo.names(), p.entry
        assert f"{data['pairs'][p.function]:.1e}" in page and cell(p.configuration) in page
    for d in DIFFERENCES:
        assert f"{data['differences'][d.function]['shipped']:.1e} as shipped" in page
        assert cell(d.cause) in page
    root = MEASURED.parents[1]
    assert "peers.md" in (root / "mkdocs.yml").read_text(), "the page is not in the nav"
    assert "peers_page(" in (root / "docs" / "hooks" / "zoo_pages.py").read_text()
    with_pairs = {p.entry for p in PAIRS} | {d.entry for d in DIFFERENCES}
    for name in zoo.names():
        section = entry_peers(zoo.entry(name), data)
        assert bool(section) == (name in with_pairs), name
        if section:
            assert section.startswith("## Compared with other implementations")


def test_our_conventions_are_named_in_docstring_and_notes():
    """A difference marked as our convention names the peer's package in the entry's notes and
    in its module docstring."""
    import importlib

    import zoo

    for d in DIFFERENCES:
        if d.ours:
            package = d.peer.split("==")[0]
            e = zoo.entry(d.entry)
            assert package in e.notes, (d.entry, package)
            assert package in (importlib.import_module(e.module).__doc__ or ""), d.entry


def test_a_missing_package_skips_its_pairs_naming_the_extra():
    with pytest.raises(pytest.skip.Exception, match="extra `peers`"):
        pairs.need("no_such_peer_package")
