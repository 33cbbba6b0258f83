r"""SMYRF: Efficient Attention using Asymmetric Clustering.

Large dot products should land in the same cluster, but LSH finds near neighbours, not maximum
inner products. Two different maps fix that: $F$ lifts the queries and $G$ the keys onto spheres
so that the distance between $F(q)$ and $G(k)$ falls exactly as $q^\top k$ grows. Queries and keys
are then hashed by a random projection of the lifted vectors, sorted by it, and cut into clusters
of equal size (balanced clustering): the t-th query cluster attends to the t-th key cluster. Several
hash rounds are merged by their softmax normalisers.

$$ F(q) = \big[q;\ \sqrt{M_Q^2 - \|q\|^2};\ 0\big], \quad G(k) = \big[k;\ 0;\ \sqrt{M_K^2 - \|k\|^2}\big],
   \quad \|F(q) - G(k)\|^2 = M_Q^2 + M_K^2 - 2\, q^\top k $$

$$ O_i = \sum_r w^{(r)}_i \sum_{j \in C^{(r)}(i)} \operatorname{softmax}_j\big(s\, q_i^\top k_j\big) v_j,
   \qquad w^{(r)}_i = \operatorname{softmax}_r\big(z^{(r)}_i\big) $$

($M_Q$, $M_K$ are the largest query and key norms of the sequence; $C^{(r)}(i)$ the key cluster
matched with query $i$'s cluster in round $r$; $z^{(r)}_i$ its log normaliser.)

`smyrf_attention_reference` is that definition, densely: each token's rank in the order of its
hash, clusters of `cluster_size` ranks, softmax inside matched clusters, rounds merged. The fast
path `smyrf_attention`, tested equal, sorts, cuts the sorted rows into chunks and scatters back
(`zoo.core.sorting`).

Deviations from the paper: the clusters are cut from the order of the raw projection
$a^\top F(q)$ (the E2LSH hash before quantisation, which only breaks its ties); $M_Q$ and $M_K$
are taken over real (unpadded) tokens.
"""

import math

import torch
from einops import einsum, rearrange

from zoo.core.checks import check_qkv, positive_int, refuse_causal
from zoo.core.masks import pad_mask, pad_to_multiple, zero_padded
from zoo.core.shell import MultiHead
from zoo.core.sorting import (
    chunk_softmax,
    combine_rounds,
    softmax_with_lse,
    stable_places,
    to_chunks,
    unsort,
)


def smyrf_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              projections: torch.Tensor, mask: torch.Tensor | None = None, *,
                              cluster_size: int, scale: float | None = None) -> torch.Tensor:
    """`smyrf_attention` as the definition: lift F(q), G(k) with M over the real tokens, hash
    a^T F(q) and a^T G(k), rank the real tokens by it (padded ones last), cluster t = ranks
    t c .. t c + c - 1, softmax over the keys of the matched cluster; rounds merge by softmax_r."""
    check_qkv(q, k, v, mask, name="smyrf_attention")
    b, h, n, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    c = min(cluster_size, n)
    real = torch.ones(b, n, dtype=torch.bool, device=q.device) if mask is None else mask
    behind = rearrange(~real, "b n -> b 1 n")
    q2, k2 = (t.square().sum(-1) for t in (q, k))  # (b h n)
    m_q, m_k = (t.masked_fill(behind, 0).amax(-1, keepdim=True) for t in (q2, k2))  # M^2
    zero = torch.zeros_like(q2)
    lifted_q = torch.cat([q, torch.stack([(m_q - q2).clamp(min=0).sqrt(), zero], -1)], -1)
    lifted_k = torch.cat([k, torch.stack([zero, (m_k - k2).clamp(min=0).sqrt()], -1)], -1)
    scores = einsum(q, k, "b h i d, b h j d -> b h i j") * scale
    outs, lses = [], []
    for a in projections:  # one round each
        q_cluster, k_cluster = (stable_places((t @ a).masked_fill(behind, math.inf)) // c
                                for t in (lifted_q, lifted_k))  # (b h n)
        matched = rearrange(q_cluster, "b h i -> b h i 1") == rearrange(k_cluster, "b h j -> b h 1 j")
        out, lse = softmax_with_lse(scores, matched & rearrange(real, "b j -> b 1 1 j"), v)
        outs.append(out)
        lses.append(lse)
    weights = torch.stack(lses).softmax(dim=0)  # (r b h i)
    return einsum(weights, torch.stack(outs), "r b h i, r b h i e -> b h i e")


def asymmetric_lift(q: torch.Tensor, k: torch.Tensor, real: torch.Tensor):
    """F(q), G(k): `(b, h, n, d)` -> `(b, h, n, d + 2)`; M over the tokens real in `(b, n)`."""
    q2, k2 = (zero_padded(t, real).square().sum(-1, keepdim=True) for t in (q, k))
    m_q, m_k = (t.amax(dim=2, keepdim=True) for t in (q2, k2))
    zeros = torch.zeros_like(q2)
    lifted_q = torch.cat([q, (m_q - q2).clamp(min=0).sqrt(), zeros], dim=-1)
    lifted_k = torch.cat([k, zeros, (m_k - k2).clamp(min=0).sqrt()], dim=-1)
    return lifted_q, lifted_k


def smyrf_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, projections: torch.Tensor,
                    mask: torch.Tensor | None = None, *, cluster_size: int,
                    scale: float | None = None) -> torch.Tensor:
    """Balanced asymmetric-LSH clustering attention.

    Args:
        q, k: `(b, h, n, d)`. v: `(b, h, n, e)`. projections: `(r, d + 2)`, one per hash round.
        mask: `(b, n)`, True = real token. cluster_size: queries (and keys) per cluster.

    Returns:
        `(b, h, n, e)`.
    """
    check_qkv(q, k, v, mask, name="smyrf_attention")
    b, h, n, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    c = min(cluster_size, n)
    (q, pad), (k, _), (v, _) = (pad_to_multiple(t, c) for t in (q, k, v))
    real = pad_mask(mask, b, n, pad, q.device)
    real = torch.ones(b, n + pad, dtype=torch.bool, device=q.device) if real is None else real
    behind = rearrange(~real, "b n -> b 1 n 1")
    if mask is not None:  # zeros at padded tokens (a fill: NaN or inf there reaches nothing real)
        q, k, v = (t.masked_fill(behind, 0.0) for t in (q, k, v))
    lifted_q, lifted_k = asymmetric_lift(q, k, real)
    # Padded tokens sort behind every real one, on both sides, so the clusters stay aligned.
    hq, hk = (einsum(t, projections, "b h n f, r f -> b h n r").masked_fill(behind, float("inf"))
              for t in (lifted_q, lifted_k))
    key_real = rearrange(real, "b n -> b 1 n").expand(b, h, -1)
    outs, lses = [], []
    for r in range(projections.shape[0]):
        q_order, k_order = (t[..., r].argsort(dim=-1, stable=True) for t in (hq, hk))
        qc = to_chunks(q, q_order, c)  # (b h nc c d)
        kc, vc, keep = (to_chunks(t, k_order, c) for t in (k, v, key_real))
        scores = einsum(qc, kc, "b h nc i d, b h nc j d -> b h nc i j") * scale
        out, lse = chunk_softmax(scores, rearrange(keep, "b h nc j -> b h nc 1 j"), vc)
        outs.append(unsort(rearrange(out, "b h nc c e -> b h (nc c) e"), q_order))
        lses.append(unsort(rearrange(lse, "b h nc c -> b h (nc c)"), q_order))
    return combine_rounds(torch.stack(outs), torch.stack(lses))[:, :, :n]


class Smyrf(MultiHead):
    """SMYRF attention. `(b, n, dim) -> (b, n, dim)`. Not causal.

    Args:
        n_hashes: hash rounds. cluster_size: queries and keys per cluster.
        seed: seeds the random projections (a buffer).
    """

    def __init__(self, dim: int, *, heads: int = 8, dim_head: int | None = None,
                 causal: bool = False, n_hashes: int = 2, cluster_size: int = 64, seed: int = 0):
        refuse_causal(type(self).__name__, causal)
        super().__init__(dim, heads=heads, dim_head=dim_head, causal=False)
        positive_int(n_hashes, "n_hashes")
        self.cluster_size = positive_int(cluster_size, "cluster_size")
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("projections", torch.randn(n_hashes, self.dim_head + 2, generator=g))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        return smyrf_attention(q, k, v, self.projections.to(q.dtype), mask,
                               cluster_size=self.cluster_size)
