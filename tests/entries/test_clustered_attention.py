"""Clustered attention against a token-by-token oracle: Hamming K-means written out, centroid
attention, and the improved variant's exact recomputation on each cluster's top-k keys."""

import pytest
import torch
import torch.nn.functional as F

from tests.oracles import assert_same_outputs_and_grads
from zoo.entries.clustered_attention import ClusteredAttention
from zoo.probe import qkv_for


def kmeans_oracle(q, planes, init, iterations, real):
    """Lloyd's algorithm on sign codes, one query and one centroid at a time, for one (b, h)."""
    codes = [(planes @ x >= 0).to(torch.int64) for x in q]  # bits as 0/1
    cent = [(c > 0).to(torch.int64) for c in init]

    def nearest(code):
        return min(range(len(cent)), key=lambda c: ((code != cent[c]).sum().item(), c))

    for _ in range(iterations):
        assign = [nearest(code) for code in codes]
        for c in range(len(cent)):
            members = [codes[i] for i in range(len(codes)) if assign[i] == c and real[i]]
            if members:
                ones, total = torch.stack(members).sum(0), len(members)
                cent[c] = torch.where(2 * ones > total, 1, torch.where(2 * ones < total, 0, cent[c]))
    return [nearest(code) for code in codes]


def oracle(layer, q, k, v, mask, variant):
    b, h, n, d = q.shape
    out = torch.zeros(b, h, n, v.shape[-1], dtype=q.dtype)
    for bi in range(b):
        for hi in range(h):
            real = mask[bi].tolist()
            assign = kmeans_oracle(q[bi, hi], layer.planes, layer.centroids, layer.iterations, real)
            for i in range(n):
                group = [j for j in range(n) if assign[j] == assign[i] and real[j]]
                centroid = q[bi, hi, group].mean(0) if group else torch.zeros(d, dtype=q.dtype)
                scores = k[bi, hi] @ centroid * d ** -0.5
                scores[~mask[bi]] = float("-inf")
                a_c = scores.softmax(0)
                if variant == "clustered":
                    out[bi, hi, i] = a_c @ v[bi, hi]
                    continue
                top = a_c.argsort(descending=True)[:min(layer.topk, n)]
                exact = k[bi, hi, top] @ q[bi, hi, i] * d ** -0.5
                exact[~mask[bi, top]] = float("-inf")
                weights = a_c.clone()
                weights[top] = a_c[top].sum() * exact.softmax(0)
                out[bi, hi, i] = weights @ v[bi, hi]
    return out


@pytest.mark.parametrize("variant", ["clustered", "improved"])
def test_matches_the_token_by_token_oracle(variant):
    layer = ClusteredAttention(32, heads=2, n_clusters=3, bits=12, iterations=4, variant=variant,
                               topk=5, seed=4).double()
    q, k, v = qkv_for(layer, 29, b=2, seed=6)
    mask = torch.ones(2, 29, dtype=torch.bool)
    mask[1, 20:] = False
    with torch.no_grad():
        out = layer.attend(q, k, v, mask)
    ref = oracle(layer, q, k, v, mask, variant)
    keep = mask[:, None, :, None].expand_as(out)
    torch.testing.assert_close(out[keep], ref[keep], rtol=1e-10, atol=1e-12)


def test_improved_with_every_key_is_softmax_attention_with_gradients():
    layer = ClusteredAttention(32, heads=2, n_clusters=3, variant="improved", topk=64).double()
    q, k, v = (t.requires_grad_() for t in qkv_for(layer, 21, b=2, seed=2))
    assert_same_outputs_and_grads(layer.attend(q, k, v), F.scaled_dot_product_attention(q, k, v),
                                  (q, k, v))


def test_hyperplanes_and_initial_centroids_are_seeded_buffers():
    a, b, c = (ClusteredAttention(32, heads=2, seed=s) for s in (0, 0, 1))
    assert set(dict(a.named_buffers())) == {"planes", "centroids"}
    assert torch.equal(a.planes, b.planes) and torch.equal(a.centroids, b.centroids)
    assert not torch.equal(a.planes, c.planes)
    assert set(a.centroids.unique().tolist()) == {-1.0, 1.0}
