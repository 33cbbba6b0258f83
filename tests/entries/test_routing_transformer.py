"""Routing transformer: attention stays inside k-means clusters, centroids move by the paper's
moving average in training mode only, one cluster is softmax attention, and the fast path equals
the reference (the dense form of attention within clusters over sorted chunks)."""

import pytest
import torch
import torch.nn.functional as F

import zoo.core.sorting as sorting
import zoo.entries.routing_transformer as routing
from tests.layer_checks import (
    assert_dtype_mismatch_is_refused,
    assert_empty_batch_gives_empty_output,
    assert_masked_garbage_changes_nothing,
    assert_unchanged_with_references,
)
from tests.oracles import assert_same_outputs_and_grads
from zoo.entries.routing_transformer import (
    RoutingTransformer,
    nearest_centroid_reference,
    routing_attention,
    routing_attention_reference,
)
from zoo.probe import attention_matrix

clusters = nearest_centroid_reference


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


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_fast_path_equals_reference_with_gradients(causal):
    """Separate queries and keys, several clusters and chunks, a key-padding mask."""
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 2, 37, 8, generator=g, dtype=torch.float64).requires_grad_()
               for _ in range(3))
    centroids = F.normalize(torch.randn(2, 3, 8, generator=g, dtype=torch.float64), dim=-1)
    mask = torch.ones(2, 37, dtype=torch.bool)
    mask[0, 31:] = False
    mask[1, 1::5] = False
    out = routing_attention(q, k, v, centroids, mask, window=7, causal=causal)
    ref = routing_attention_reference(q, k, v, centroids, mask, window=7, causal=causal)
    real = mask[:, None, :, None]
    assert_same_outputs_and_grads(out * real, ref * real, (q, k, v))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_layer_is_unchanged_with_the_references(monkeypatch, causal):
    layer = RoutingTransformer(32, heads=2, n_clusters=4, causal=causal).eval()
    assert_unchanged_with_references(monkeypatch, layer, [
        (routing, "routing_attention", routing_attention_reference),
        (routing, "bucket_attention", sorting.bucket_attention_reference),
        (routing, "nearest_centroid", nearest_centroid_reference)])


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_masked_garbage_and_empty_batch(causal):
    layer = RoutingTransformer(32, heads=2, n_clusters=4, causal=causal)
    assert_masked_garbage_changes_nothing(layer)
    assert_empty_batch_gives_empty_output(layer)
    assert_dtype_mismatch_is_refused(layer)
    assert_empty_batch_gives_empty_output(layer.train())  # the k-means step on no tokens


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_garbage_at_padded_tokens_reaches_no_other_sample(causal):
    """Sample 0's padded tokens sort last in its rows, where sample 1's first chunk looks back:
    NaN there in q, k or v changes nothing of sample 1, forward or backward."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 2, 37, 8, generator=g, dtype=torch.float64) for _ in range(3))
    centroids = F.normalize(torch.randn(2, 3, 8, generator=g, dtype=torch.float64), dim=-1)
    mask = torch.ones(2, 37, dtype=torch.bool)
    mask[0, 20:] = False
    padded = ~mask[:, None, :, None]

    def run(fill):
        qkv = [t.masked_fill(padded, fill).requires_grad_() for t in (q, k, v)]
        out = routing_attention(*qkv, centroids, mask, window=7, causal=causal)
        grads = torch.autograd.grad((out * ~padded).square().sum(), qkv)
        return [out[1], *(grad[1] for grad in grads)]

    for got, want in zip(run(float("nan")), run(0.0), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_windows_stay_in_their_row_even_for_non_finite_real_tokens():
    """inf in every value of sample 0 (real tokens) leaves sample 1's output and gradients as they
    are with finite values there: no window reads another row."""
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(2, 2, 37, 8, generator=g, dtype=torch.float64) for _ in range(3))
    centroids = F.normalize(torch.randn(2, 3, 8, generator=g, dtype=torch.float64), dim=-1)

    def run(value):
        qkv = [q.clone(), k.clone(), v.clone()]
        qkv[2][0] = value
        qkv = [t.requires_grad_() for t in qkv]
        out = routing_attention(*qkv, centroids, window=7, causal=True)
        grads = torch.autograd.grad(out[1].square().sum(), qkv)
        return [out[1], *(grad[1] for grad in grads)]

    for got, want in zip(run(float("inf")), run(1.0), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
