"""Routing transformer: attention stays inside k-means clusters, centroids move by the paper's
moving average in training mode only, and one cluster is softmax attention."""

import torch
import torch.nn.functional as F

from tests.oracles import assert_same_outputs_and_grads
from zoo.entries.routing_transformer import RoutingTransformer
from zoo.probe import attention_matrix


def clusters(x, centroids):
    """Nearest centroid to x/|x| by Euclidean distance, written out. x `(b, h, n, d)`."""
    return torch.cdist(F.normalize(x, dim=-1), centroids.expand(x.shape[0], -1, -1, -1)).argmin(-1)


def qv_of(layer, x):
    q, v = layer.to_qv(x).chunk(2, dim=-1)
    return [t.unflatten(-1, (layer.heads, layer.dim_head)).transpose(1, 2) for t in (q, v)]


def test_attends_only_to_keys_of_its_own_cluster():
    layer = RoutingTransformer(32, heads=2, n_clusters=4, seed=1).double()
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 2, 48, 16, generator=g, dtype=torch.float64) for _ in range(2))
    a = attention_matrix(layer, q=q, k=k)  # (h, i, j)
    same = clusters(q, layer.centroids)[0, :, :, None] == clusters(k, layer.centroids)[0, :, None, :]
    assert (a[~same] == 0).all()
    assert (a[same] > 0).sum() > 2 * 48  # it does attend within clusters
    sums = a.sum(-1)  # a distribution, or empty where no key of its cluster is in its chunks
    assert (((sums - 1).abs() < 1e-12) | (sums == 0)).all()


def test_one_cluster_is_softmax_attention_with_shared_qk_and_its_gradients():
    layer = RoutingTransformer(32, heads=2, n_clusters=1, causal=True).double()
    x = torch.randn(2, 19, 32, dtype=torch.float64, requires_grad=True)
    q, v = qv_of(layer, x)
    ref = F.scaled_dot_product_attention(q, q, v, is_causal=True)
    ref = layer.to_out(ref.transpose(1, 2).flatten(2))
    assert_same_outputs_and_grads(layer(x), ref, (x,))


def test_training_moves_centroids_by_the_moving_average():
    decay = 0.9
    layer = RoutingTransformer(32, heads=2, n_clusters=3, decay=decay, seed=2).double().train()
    x = torch.randn(2, 11, 32, dtype=torch.float64)
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[1, 7:] = False
    sums0, counts0 = layer.centroid_sums.clone(), layer.centroid_counts.clone()
    with torch.no_grad():
        q, _ = qv_of(layer, x)
        assigned = clusters(q, layer.centroids)
    # The batch's sums and counts, one token at a time: queries and keys are the same vectors
    # under shared QK, so each real token counts twice.
    sums, counts = torch.zeros_like(sums0), torch.zeros_like(counts0)
    for b in range(2):
        for h in range(2):
            for i in range(11):
                if mask[b, i]:
                    c = assigned[b, h, i]
                    sums[h, c] += 2 * F.normalize(q[b, h, i], dim=-1)
                    counts[h, c] += 2
    layer(x, mask=mask)
    want_sums = decay * sums0 + (1 - decay) * sums
    want_counts = decay * counts0 + (1 - decay) * counts
    torch.testing.assert_close(layer.centroid_sums, want_sums, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.centroid_counts, want_counts, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.centroids, want_sums / want_counts[..., None])
    assert not torch.allclose(layer.centroids, sums0 / counts0[..., None])


def test_eval_mode_keeps_centroids_and_is_deterministic():
    layer = RoutingTransformer(32, heads=2, n_clusters=3).double().eval()
    x = torch.randn(2, 23, 32, dtype=torch.float64)
    before = {k: t.clone() for k, t in layer.named_buffers()}
    first, second = layer(x), layer(x)
    assert torch.equal(first, second)
    for name, t in layer.named_buffers():
        assert torch.equal(t, before[name]), name


def test_initial_centroids_are_seeded_buffers():
    a, b, c = (RoutingTransformer(32, heads=2, n_clusters=4, seed=s) for s in (0, 0, 1))
    assert "centroids" not in dict(a.named_parameters())
    assert torch.equal(a.centroids, b.centroids) and not torch.equal(a.centroids, c.centroids)
