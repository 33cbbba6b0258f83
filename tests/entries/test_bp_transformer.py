"""BP-Transformer: the contextual nodes follow the paper's fine-to-coarse rule and tile the sequence;
the layer equals attention over those nodes built one query at a time; its cost grows as k log n."""

import math

import pytest
import torch

import zoo
from zoo.entries.bp_transformer import bp_attention, contextual_ranges
from zoo.probe import attention_matrix


def level_sizes(n):
    sizes = [n]
    while sizes[-1] > 1:
        sizes.append((sizes[-1] + 1) // 2)
    return sizes


def oracle_nodes(n, k, i, causal):
    """The nodes token i reads, walked one node at a time as the paper's binary partitioning
    describes: k per level and side; where the next level's first span would overlap what is
    covered, the uncovered half (one level down) is read instead."""
    sizes = level_sizes(n)
    nodes = {(0, i)}
    p, replace = i - 1, False
    for level in range(len(sizes)):
        for t in range(k):
            if p < 0:
                break
            nodes.add((level - 1, 2 * p) if replace and t == 0 else (level, p))
            p -= 1
        replace, p = p % 2 == 0, p // 2
    if causal:
        return nodes
    p, replace = i + 1, False
    for level, size in enumerate(sizes):
        for t in range(k):
            if p >= size:
                break
            lvl, idx = (level - 1, 2 * p + 1) if replace and t == 0 else (level, p)
            if idx < sizes[lvl]:
                nodes.add((lvl, idx))
            p += 1
        replace, p = p % 2 == 1, p // 2
    return nodes


def tokens(node, n):
    level, idx = node
    return range(idx * 2 ** level, min((idx + 1) * 2 ** level, n))


def ranges_as_nodes(n, k, causal):
    out = [set() for _ in range(n)]
    for level, lo, hi in contextual_ranges(n, k, causal=causal):
        for i in range(n):
            out[i] |= {(level, p) for p in range(int(lo[i]), int(hi[i]) + 1)}
    return out


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("n", [1, 2, 5, 16, 37, 64, 100])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_contextual_nodes_follow_the_paper_rule(n, k, causal):
    ours = ranges_as_nodes(n, k, causal)
    for i in range(n):
        assert ours[i] == oracle_nodes(n, k, i, causal), f"query {i}"


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


def dense_oracle(q, k, v, nodes_of, mask=None):
    """Softmax over each query's nodes, a node's key and value the mean over its real tokens;
    the weight of a node is spread over its tokens. Returns the output and the (h, n, n) map."""
    b, h, n, d = q.shape
    real = torch.ones(b, n, dtype=torch.bool) if mask is None else mask
    out = torch.zeros(b, h, n, v.shape[-1], dtype=q.dtype)
    amap = torch.zeros(b, h, n, n, dtype=q.dtype)
    for bi in range(b):
        for i in range(n):
            members = [[t for t in tokens(u, n) if real[bi, t]] for u in sorted(nodes_of[i])]
            members = [m for m in members if m]
            keys = torch.stack([k[bi, :, m].mean(1) for m in members], 1)  # (h u d)
            vals = torch.stack([v[bi, :, m].mean(1) for m in members], 1)
            w = (torch.einsum("hd,hud->hu", q[bi, :, i], keys) * d ** -0.5).softmax(-1)
            out[bi, :, i] = torch.einsum("hu,hue->he", w, vals)
            for u, m in enumerate(members):
                amap[bi, :, i, m] += w[:, u, None] / len(m)
    return out, amap


def qkv(b=2, h=2, n=37, d=8, e=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, s, generator=g, dtype=torch.float64) for s in (d, d, e)]


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("n, k", [(37, 1), (37, 2), (50, 3), (16, 4)])
def test_layer_map_equals_node_attention_oracle(n, k, causal):
    layer = zoo.create("bp-transformer", dim=16, heads=2, k=k, causal=causal).double()
    q, kk, v = qkv(b=1, n=n)
    amap = attention_matrix(layer, q=q, k=kk)
    _, expected = dense_oracle(q, kk, v, [oracle_nodes(n, k, i, causal) for i in range(n)])
    torch.testing.assert_close(amap, expected[0], rtol=1e-12, atol=1e-13)
    # Every token is reached (the spans tile the context), and, causally, nothing later.
    support = amap.abs().sum(0) > 0
    want = torch.ones(n, n, dtype=torch.bool)
    assert torch.equal(support, want.tril() if causal else want)


def test_padding_is_left_out_of_the_spans():
    n, k = 37, 2
    q, kk, v = qkv(n=n)
    mask = torch.ones(2, n, dtype=torch.bool)
    mask[0, 30:] = False
    mask[1, ::3] = False
    nodes = [oracle_nodes(n, k, i, False) for i in range(n)]
    expected, _ = dense_oracle(q, kk, v, nodes, mask)
    out = bp_attention(q, kk, v, mask, k_per_level=k)
    torch.testing.assert_close(out[mask[:, None].expand(-1, 2, -1)],
                               expected[mask[:, None].expand(-1, 2, -1)], rtol=1e-12, atol=1e-13)


def test_gradients_match_node_oracle():
    n, k = 21, 2
    q, kk, v = (t.requires_grad_() for t in qkv(b=1, n=n))
    nodes = [oracle_nodes(n, k, i, True) for i in range(n)]
    grads = torch.autograd.grad(bp_attention(q, kk, v, k_per_level=k, causal=True).square().sum(),
                                (q, kk, v))
    ref = torch.autograd.grad(dense_oracle(q, kk, v, nodes)[0].square().sum(), (q, kk, v))
    for a, b in zip(grads, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_blocks_and_chunks_of_queries_change_nothing(monkeypatch, causal):
    """Small query blocks in chunks of one block: the windows of many blocks, each chunk on its
    own, still give the oracle's output, padding included."""
    import zoo.entries.bp_transformer as bp

    monkeypatch.setattr(bp, "QUERY_BLOCK", 4)
    monkeypatch.setattr(bp, "CHUNK", 1)
    n, k = 37, 2
    q, kk, v = qkv(n=n)
    mask = torch.ones(2, n, dtype=torch.bool)
    mask[0, 30:] = False
    mask[1, 1::3] = False  # token 0 real: causally, every real query has a real node
    expected, _ = dense_oracle(q, kk, v, [oracle_nodes(n, k, i, causal) for i in range(n)], mask)
    out = bp_attention(q, kk, v, mask, k_per_level=k, causal=causal)
    real = mask[:, None].expand(-1, 2, -1)
    torch.testing.assert_close(out[real], expected[real], rtol=1e-12, atol=1e-13)
