"""BP-Transformer: the contextual nodes of the fast path follow the paper's fine-to-coarse walk and
tile the sequence; its cost grows as k log n; the fast path equals the reference (a softmax over
the walked nodes, written densely), outputs, maps and gradients."""

import math

import pytest
import torch

import zoo
import zoo.core.blocks as blocks
import zoo.entries.bp_transformer as bp
from tests.layer_checks import (
    assert_empty_batch_gives_empty_output,
    assert_masked_garbage_changes_nothing,
    assert_unchanged_with_references,
)
from tests.oracles import assert_same_outputs_and_grads
from zoo.entries.bp_transformer import (
    bp_attention,
    bp_attention_reference,
    contextual_nodes,
    contextual_ranges,
)
from zoo.probe import attention_matrix


def tokens(node, n):
    level, idx = node
    return range(idx * 2 ** level, min((idx + 1) * 2 ** level, n))


def ranges_as_nodes(n, k, causal):
    out = [set() for _ in range(n)]
    for level, lo, hi in contextual_ranges(n, k, causal=causal):
        for i in range(n):
            out[i] |= {(level, p) for p in range(int(lo[i]), int(hi[i]) + 1)}
    return out


def test_walk_by_hand():
    """n = 8, k = 1, token 2: itself; on the left token 1, then span {0, 1} one level up overlaps
    token 1, so its uncovered half {0} is read; on the right token 3, span {4, 5}, then span
    {4..7} one level up overlaps {4, 5}, so its uncovered half {6, 7} is read."""
    assert contextual_nodes(8, 1, 2) == {(0, 2), (0, 1), (0, 0), (0, 3), (1, 2), (1, 3)}
    assert contextual_nodes(8, 1, 2, causal=True) == {(0, 2), (0, 1), (0, 0)}


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("n", [1, 2, 5, 16, 37, 64, 100])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_contextual_ranges_are_the_walked_nodes(n, k, causal):
    ours = ranges_as_nodes(n, k, causal)
    for i in range(n):
        assert ours[i] == contextual_nodes(n, k, i, causal=causal), f"query {i}"


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("n, k", [(37, 1), (37, 2), (64, 4), (100, 3)])
def test_contextual_nodes_tile_the_context_without_overlap(n, k, causal):
    for i, nodes in enumerate(ranges_as_nodes(n, k, causal)):
        covered = sorted(t for node in nodes for t in tokens(node, n))
        assert covered == list(range(i + 1 if causal else n)), f"query {i}"


def test_nodes_per_query_grow_by_at_most_2k_per_doubling():
    """O(k log(n/k)) connections: doubling n adds at most one level, k nodes on each side."""
    k = 3
    most = {}
    for n in (256, 512, 1024, 2048):
        most[n] = max(len(s) for s in ranges_as_nodes(n, k, causal=False))
    for n in (512, 1024, 2048):
        assert most[n] - most[n // 2] <= 2 * k
    assert most[2048] <= 2 * k * (math.log2(2048 / k) + 2) + 1


def qkv(b=2, h=2, n=37, d=8, e=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, s, generator=g, dtype=torch.float64) for s in (d, d, e)]


def padding(n=37):
    mask = torch.ones(2, n, dtype=torch.bool)
    mask[0, 30:] = False
    mask[1, 1::3] = False  # token 0 real: causally, every real query has a real node
    return mask


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("n, k", [(37, 1), (37, 2), (50, 3), (16, 4)])
def test_layer_map_equals_the_reference_map(monkeypatch, n, k, causal):
    layer = zoo.create("bp-transformer", dim=16, heads=2, k=k, causal=causal).double()
    q, kk, _ = qkv(b=1, n=n)
    amap = attention_matrix(layer, q=q, k=kk)
    monkeypatch.setattr(bp, "bp_attention", bp_attention_reference)
    torch.testing.assert_close(amap, attention_matrix(layer, q=q, k=kk), rtol=1e-12, atol=1e-13)
    # Every token is reached (the spans tile the context), and, causally, nothing later.
    support = amap.abs().sum(0) > 0
    want = torch.ones(n, n, dtype=torch.bool)
    assert torch.equal(support, want.tril() if causal else want)


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("query_block, chunk", [(32, 8), (4, 1)], ids=["default", "small-blocks"])
def test_fast_path_equals_reference_with_padding_and_gradients(monkeypatch, causal, query_block,
                                                                chunk):
    """With small query blocks in chunks of one block, the windows of many blocks, each chunk on
    its own, still give the reference."""
    monkeypatch.setattr(bp, "QUERY_BLOCK", query_block)
    monkeypatch.setattr(blocks, "CHUNK", chunk)
    q, kk, v = (t.requires_grad_() for t in qkv())
    mask = padding()
    out = bp_attention(q, kk, v, mask, k_per_level=2, causal=causal)
    ref = bp_attention_reference(q, kk, v, mask, k_per_level=2, causal=causal)
    real = mask[:, None, :, None]
    assert_same_outputs_and_grads(out * real, ref * real, (q, kk, v))


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_layer_is_unchanged_with_the_reference(monkeypatch, causal):
    layer = zoo.create("bp-transformer", dim=32, heads=2, k=2, causal=causal)
    assert_unchanged_with_references(monkeypatch, layer, [(bp, "bp_attention", bp_attention_reference)])


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_masked_garbage_and_empty_batch(causal):
    layer = zoo.create("bp-transformer", dim=32, heads=2, k=2, causal=causal)
    assert_masked_garbage_changes_nothing(layer)
    assert_empty_batch_gives_empty_output(layer)
