"""SMYRF: the asymmetric lift's identity, and balanced clusters that attend only to their matched
key cluster, merged over rounds, against an oracle that sorts and clusters token by token."""

import torch
import torch.nn.functional as F

from tests.oracles import assert_same_outputs_and_grads
from zoo.entries.smyrf import Smyrf, asymmetric_lift
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


def cluster_oracle(q, k, v, projections, mask, cluster_size):
    """Per round: rank the real queries and keys by the projection of their lifted vectors, cut
    clusters of `cluster_size` ranks, softmax inside matched clusters; merge rounds by their log
    normalisers."""
    b, h, n, d = q.shape
    out = torch.zeros(b, h, n, v.shape[-1], dtype=q.dtype)
    for bi in range(b):
        real = mask[bi].nonzero().flatten().tolist()
        for hi in range(h):
            qs, ks = q[bi, hi, real], k[bi, hi, real]
            m_q, m_k = qs.norm(dim=-1).max(), ks.norm(dim=-1).max()
            zero = torch.zeros(len(real), 1, dtype=q.dtype)
            lq = torch.cat([qs, (m_q ** 2 - qs.norm(dim=-1, keepdim=True) ** 2).sqrt(), zero], -1)
            lk = torch.cat([ks, zero, (m_k ** 2 - ks.norm(dim=-1, keepdim=True) ** 2).sqrt()], -1)
            rounds, norms = [], []
            for a in projections:
                q_cluster = (lq @ a).argsort().argsort() // cluster_size
                k_cluster = (lk @ a).argsort().argsort() // cluster_size
                scores = qs @ ks.T * d ** -0.5
                scores[q_cluster[:, None] != k_cluster[None, :]] = float("-inf")
                rounds.append(scores.softmax(-1) @ v[bi, hi, real])
                norms.append(scores.logsumexp(-1))
            w = torch.stack(norms).softmax(0)
            out[bi, hi, real] = (w[..., None] * torch.stack(rounds)).sum(0)
    return out


def test_clusters_attend_only_to_their_matched_key_cluster_and_rounds_merge():
    layer = Smyrf(32, heads=2, n_hashes=3, cluster_size=6, seed=2).double()
    q, k, v = qkv_for(layer, 40, b=2, seed=3)
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[1, 2::5] = False
    with torch.no_grad():
        out = layer.attend(q, k, v, mask)
    ref = cluster_oracle(q, k, v, layer.projections, mask, 6)
    keep = mask[:, None, :, None].expand_as(out)
    torch.testing.assert_close(out[keep], ref[keep], rtol=1e-10, atol=1e-12)


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
