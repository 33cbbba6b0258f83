"""Clustered attention: the reference (Hamming K-means written bit by bit, centroid attention, the
improved variant's exact recomputation on each cluster's top-k keys) on a hand case and in its
exact limit; the fast path equals it."""

import pytest
import torch
import torch.nn.functional as F

import zoo.entries.clustered_attention as clustered
from tests.layer_checks import (
    assert_empty_batch_gives_empty_output,
    assert_masked_garbage_changes_nothing,
    assert_unchanged_with_references,
)
from tests.oracles import assert_same_outputs_and_grads
from zoo.entries.clustered_attention import (
    ClusteredAttention,
    clustered_attention,
    clustered_attention_reference,
)
from zoo.probe import qkv_for


def test_reference_by_hand():
    """Two queries with opposite codes, two clusters: after one Lloyd step each query is its own
    cluster, whose centroid is the query itself, so clustered attention is softmax attention."""
    q = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64).reshape(1, 1, 2, 2)
    k, v = q.flip(-1) + 0.5, torch.eye(2, dtype=torch.float64).reshape(1, 1, 2, 2)
    planes = torch.tensor([[1.0, 0.0]], dtype=torch.float64)  # one bit: the sign of x_0
    centroids = torch.tensor([[1.0], [-1.0]], dtype=torch.float64)
    out = clustered_attention_reference(q, k, v, planes, centroids, iterations=1)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))


@pytest.mark.parametrize("variant, topk", [("clustered", 5), ("improved", 5), ("improved", 64)])
def test_fast_path_equals_reference_with_gradients(variant, topk):
    layer = ClusteredAttention(32, heads=2, n_clusters=3, bits=12, iterations=4, variant=variant,
                               topk=topk, seed=4).double()
    q, k, v = (t.requires_grad_() for t in qkv_for(layer, 29, b=2, seed=6))
    mask = torch.ones(2, 29, dtype=torch.bool)
    mask[1, 20:] = False
    mask[0, 3::7] = False
    kw = dict(iterations=4, variant=variant, topk=topk)
    out = clustered_attention(q, k, v, layer.planes, layer.centroids, mask, **kw)
    ref = clustered_attention_reference(q, k, v, layer.planes, layer.centroids, mask, **kw)
    real = mask[:, None, :, None]
    assert_same_outputs_and_grads(out * real, ref * real, (q, k, v))


@pytest.mark.parametrize("variant", ["clustered", "improved"])
def test_layer_is_unchanged_with_the_reference(monkeypatch, variant):
    layer = ClusteredAttention(32, heads=2, n_clusters=4, bits=16, iterations=5, variant=variant,
                               topk=6)
    assert_unchanged_with_references(monkeypatch, layer, [
        (clustered, "clustered_attention", clustered_attention_reference)])


@pytest.mark.parametrize("variant", ["clustered", "improved"])
def test_masked_garbage_and_empty_batch(variant):
    layer = ClusteredAttention(32, heads=2, n_clusters=4, bits=16, iterations=5, variant=variant,
                               topk=6)
    assert_masked_garbage_changes_nothing(layer)
    assert_empty_batch_gives_empty_output(layer)


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
