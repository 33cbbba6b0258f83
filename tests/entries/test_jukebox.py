"""Jukebox: each factorized pattern reads exactly the keys the paper's grid defines, equals softmax
restricted to them, costs O(n sqrt n), and keeps the whole layer contract."""

import dataclasses

import pytest
import torch

import zoo
from zoo import probe
from zoo.entries.jukebox import PATTERNS, jukebox_attention, jukebox_attention_reference
from zoo.probe import attention_matrix
from zoo.verify.contract import CHECKS, factory


def pattern_mask(n, c, pattern, causal):
    """Which query i reads which key j, from the grid's definition (rows of c positions)."""
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    row_i, row_j = i // c, j // c
    allowed = {"row": row_i == row_j, "column": i % c == j % c,
               "previous-row": row_j == row_i - 1}[pattern]
    return allowed & (j <= i) if causal else allowed


def qkv(b=2, h=2, n=37, d=8, e=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, s, generator=g, dtype=torch.float64) for s in (d, d, e)]


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("n, block", [(16, None), (37, None), (37, 5), (50, 8), (9, 3)])
def test_support_is_the_grid_pattern(n, block, pattern, causal):
    layer = zoo.create("jukebox", dim=16, heads=2, pattern=pattern, block=block,
                       causal=causal).double()
    amap = attention_matrix(layer, n)
    c = block or {16: 4, 37: 7}[n]  # ceil(sqrt(n)) when no block is given
    want = pattern_mask(n, c, pattern, causal)
    assert torch.equal(amap.abs().sum(0) > 0, want)
    # each query with any key spreads weight one over exactly those keys
    torch.testing.assert_close(amap.sum(-1), want.any(-1).double().expand(2, n),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_equals_the_reference_for_every_pattern(pattern, causal):
    q, k, v = qkv(n=37)
    mask = torch.ones(2, 37, dtype=torch.bool)
    mask[0, 30:] = False
    mask[1, ::4] = False
    for m in (None, mask):
        out = jukebox_attention(q, k, v, m, pattern=pattern, block=6, causal=causal)
        expected = jukebox_attention_reference(q, k, v, m, pattern=pattern, block=6, causal=causal)
        if m is None:
            torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
        else:
            real = m[:, None, :].expand(-1, 2, -1)
            torch.testing.assert_close(out[real], expected[real], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_gradients_match_the_reference(pattern):
    q, k, v = (t.requires_grad_() for t in qkv(b=1, n=23))
    out = jukebox_attention(q, k, v, pattern=pattern, block=5, causal=True)
    ref = jukebox_attention_reference(q, k, v, pattern=pattern, block=5, causal=True)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("pattern", ["column", "previous-row"])
def test_n_sqrt_n_cost_for_every_pattern(pattern):
    """The claims test measures the catalogue's row pattern; the other two scale the same way."""
    e = zoo.entry("jukebox")
    make = factory(e, dim=probe.SCALING_DIM)
    s = probe.scaling(e, make=lambda **kw: make(pattern=pattern, **kw))
    assert abs(s.time - 1.5) <= 0.25 and abs(s.memory - 1.5) <= 0.25, s


@pytest.mark.parametrize("pattern", ["column", "previous-row"])
def test_contract_holds_for_the_other_patterns(pattern):
    e = zoo.entry("jukebox")
    e = dataclasses.replace(e, hparams={**e.hparams, "pattern": pattern})
    for name, (check, applies) in CHECKS.items():
        # Previous-row attention never reads the query's own row, so a change in the last row
        # changes no output at all; its causality is checked on the influence map below.
        if applies(e) and not (pattern == "previous-row" and name == "causal"):
            check(e, factory(e))


def test_previous_row_reads_only_strictly_earlier_rows():
    layer = zoo.create("jukebox", dim=16, heads=2, pattern="previous-row", block=4,
                       causal=True).double()
    x = torch.randn(1, 18, 16, dtype=torch.float64)
    influence = probe.influence(layer, x)
    i, j = torch.arange(18)[:, None], torch.arange(18)[None, :]
    # the whole previous row as keys and values, the token itself only through its query (and not
    # in the first row, which reads nothing), nothing later
    reads = (j // 4 == i // 4 - 1) | ((i == j) & (i >= 4))
    assert torch.equal(influence > 1e-12, reads)
