"""SMYRF: the asymmetric lift's identity; the reference's balanced clusters attend only to their
matched key cluster (a hand-checked round); the fast path equals the reference."""

import torch
import torch.nn.functional as F

import zoo.entries.smyrf as smyrf
from tests.layer_checks import (
    assert_empty_batch_gives_empty_output,
    assert_masked_garbage_changes_nothing,
    assert_unchanged_with_references,
)
from tests.oracles import assert_same_outputs_and_grads
from zoo.entries.smyrf import Smyrf, asymmetric_lift, smyrf_attention, smyrf_attention_reference
from zoo.probe import qkv_for


def test_lift_turns_inner_products_into_distances():
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 3, 17, 8, generator=g, dtype=torch.float64) * 3 for _ in range(2))
    lq, lk = asymmetric_lift(q, k, torch.ones(2, 17, dtype=torch.bool))
    m_q = q.norm(dim=-1).amax(-1)[..., None, None] ** 2
    m_k = k.norm(dim=-1).amax(-1)[..., None, None] ** 2
    dist = torch.cdist(lq, lk) ** 2
    torch.testing.assert_close(dist, m_q + m_k - 2 * q @ k.transpose(-1, -2), rtol=1e-10,
                               atol=1e-10)


def test_reference_clusters_by_rank_and_merges_rounds_by_hand():
    """One head, four tokens, clusters of two, one round: the two queries of lowest hash read the
    two keys of lowest hash, the other two the other two, each a softmax over its two keys."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 4, 3, generator=g, dtype=torch.float64) for _ in range(3))
    lq, lk = asymmetric_lift(q, k, torch.ones(1, 4, dtype=torch.bool))
    # a projection on the two lift coordinates only: the hash is sqrt(M^2 - |x|^2) for both sides
    proj = torch.tensor([[0.0, 0.0, 0.0, 1.0, 1.0]], dtype=torch.float64)
    q_rank, k_rank = ((t @ proj[0]).argsort().argsort()[0, 0] // 2 for t in (lq, lk))
    out = smyrf_attention_reference(q, k, v, proj, cluster_size=2)
    for i in range(4):
        keys = (k_rank == q_rank[i]).nonzero().flatten()
        w = (k[0, 0, keys] @ q[0, 0, i] / 3 ** 0.5).softmax(0)
        torch.testing.assert_close(out[0, 0, i], w @ v[0, 0, keys])


def test_fast_path_equals_reference_with_gradients():
    layer = Smyrf(32, heads=2, n_hashes=3, cluster_size=6, seed=2).double()
    q, k, v = (t.requires_grad_() for t in qkv_for(layer, 40, b=2, seed=3))
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[1, 2::5] = False
    mask[0, 33:] = False
    out = smyrf_attention(q, k, v, layer.projections, mask, cluster_size=6)
    ref = smyrf_attention_reference(q, k, v, layer.projections, mask, cluster_size=6)
    real = mask[:, None, :, None]
    assert_same_outputs_and_grads(out * real, ref * real, (q, k, v))


def test_layer_is_unchanged_with_the_reference(monkeypatch):
    layer = Smyrf(32, heads=2, n_hashes=2, cluster_size=8)
    assert_unchanged_with_references(monkeypatch, layer, [
        (smyrf, "smyrf_attention", smyrf_attention_reference)])


def test_masked_garbage_and_empty_batch():
    layer = Smyrf(32, heads=2, n_hashes=2, cluster_size=8)
    assert_masked_garbage_changes_nothing(layer)
    assert_empty_batch_gives_empty_output(layer)


def test_one_cluster_is_softmax_attention_with_gradients():
    layer = Smyrf(32, heads=2, n_hashes=2, cluster_size=64).double()
    q, k, v = (t.requires_grad_() for t in qkv_for(layer, 23, b=2, seed=1))
    assert_same_outputs_and_grads(layer.attend(q, k, v), F.scaled_dot_product_attention(q, k, v),
                                  (q, k, v))


def test_projections_are_seeded_buffers():
    a, b, c = (Smyrf(32, heads=2, seed=s) for s in (0, 0, 1))
    assert "projections" in dict(a.named_buffers())
    assert "projections" not in dict(a.named_parameters())
    assert torch.equal(a.projections, b.projections)
    assert not torch.equal(a.projections, c.projections)
