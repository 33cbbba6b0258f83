r"""Fast Transformers with Clustered Attention.

Queries that are close get nearly the same attention, so compute it once per group: hash the
queries to B-bit codes with random hyperplanes, group them into C clusters by K-means in Hamming
space (a few Lloyd iterations), and let each cluster's centroid (the mean of its queries) attend
to all keys; every query takes its cluster's output. Improved clustered attention
(`variant="improved"`) then fixes what matters most: for each cluster it takes the top-k keys of
the centroid's attention and recomputes, for every query in the cluster, exact dot-product
attention over those keys, scaled to the mass the centroid gave them; the other keys keep the
centroid's weights. Time and memory are linear in n.

$$ A^c = \operatorname{softmax}\!\big(s\, Q^c K^\top\big), \qquad
   A^t_{ij} = \begin{cases} \hat m_{c_i}\, \dfrac{e^{s\, q_i^\top k_j}}{\sum_{l \in T_{c_i}}
   e^{s\, q_i^\top k_l}} & j \in T_{c_i} \\ A^c_{c_i j} & \text{else} \end{cases}, \qquad
   \hat m_c = \sum_{j \in T_c} A^c_{cj} $$

(clustered attention: $O_i = A^c_{c_i} V$; improved: $O_i = A^t_i V$.)

`clustered_attention_reference` is that definition, token by token in dense form: Hamming
distances counted bit by bit, each query's centroid row of $A^c$, and for the improved variant
the top-k set as a bool pattern over the keys. The fast path `clustered_attention`, tested equal,
works per cluster (agreements as one product, the top keys gathered).

Deviations from the paper: the initial centroids are a seeded buffer of random codes (rather than
codes of sampled queries), so the clustering is deterministic; a Hamming centroid is the majority
bit of its members and keeps its old bit on a tie or when empty.
"""

import torch
import torch.nn.functional as F
from einops import einsum, rearrange

from zoo.core.checks import check_qkv, one_of, positive_int, refuse_causal
from zoo.core.masks import masked_fill_scores
from zoo.core.shell import MultiHead

VARIANTS = ("clustered", "improved")


def clustered_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                  planes: torch.Tensor, centroids: torch.Tensor,
                                  mask: torch.Tensor | None = None, *, iterations: int = 10,
                                  variant: str = "clustered", topk: int = 32,
                                  scale: float | None = None) -> torch.Tensor:
    """`clustered_attention` as the definition: B-bit codes, Lloyd's K-means under the Hamming
    distance (majority bits over the real members; a tie or an empty cluster keeps its bit), the
    centroid's attention A^c for each query, and (improved) A^t on the centroid's top-k keys."""
    check_qkv(q, k, v, mask, name="clustered_attention")
    one_of(variant, VARIANTS, "variant")
    b, h, n, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    real = torch.ones(b, n, dtype=torch.bool, device=q.device) if mask is None else mask
    real_i = rearrange(real, "b n -> b 1 n 1")
    bits = einsum(q, planes, "b h n d, f d -> b h n f") >= 0  # (b h n f)
    cent = (centroids > 0).expand(b, h, *centroids.shape)  # (b h c f)

    def nearest(cent):  # (b h n): the centroid with the fewest differing bits, the first on a tie
        differ = rearrange(bits, "b h n f -> b h n 1 f") != rearrange(cent, "b h c f -> b h 1 c f")
        return differ.sum(-1).argmin(dim=-1)

    for _ in range(iterations):
        members = (F.one_hot(nearest(cent), centroids.shape[0]).bool() & real_i).to(q.dtype)
        ones = einsum(members, bits.to(q.dtype), "b h n c, b h n f -> b h c f")
        total = rearrange(members.sum(2), "b h c -> b h c 1")
        cent = torch.where(2 * ones > total, True, torch.where(2 * ones < total, False, cent))
    pick = F.one_hot(nearest(cent), centroids.shape[0]).to(q.dtype)  # (b h n c): c_i
    members = pick * real_i
    q_c = einsum(members, q, "b h n c, b h n d -> b h c d") / \
        rearrange(members.sum(2).clamp(min=1), "b h c -> b h c 1")  # the mean of its real queries
    real_j = rearrange(real, "b j -> b 1 1 j")
    a_c = masked_fill_scores(einsum(q_c, k, "b h c d, b h j d -> b h c j") * scale,
                             real_j).softmax(dim=-1)  # A^c
    a_i = einsum(pick, a_c, "b h n c, b h c j -> b h n j")  # row c_i of A^c for query i
    if variant == "clustered":
        return a_i @ v
    top = torch.zeros_like(a_c, dtype=torch.bool).scatter(-1, a_c.topk(min(topk, n), dim=-1).indices,
                                                          True)  # (b h c j): T_c
    in_top = einsum(pick, top.to(q.dtype), "b h n c, b h c j -> b h n j") > 0  # j in T_{c_i}
    mass = einsum(pick, (a_c * top).sum(-1), "b h n c, b h c -> b h n").unsqueeze(-1)  # m_{c_i}
    exact = masked_fill_scores(einsum(q, k, "b h i d, b h j d -> b h i j") * scale,
                               in_top & real_j).softmax(dim=-1)  # softmax over T_{c_i}
    return torch.where(in_top, mass * exact, a_i) @ v  # A^t V


def hamming_kmeans(codes: torch.Tensor, centroids: torch.Tensor, iterations: int,
                   weight: torch.Tensor) -> torch.Tensor:
    """Lloyd's K-means on +-1 codes under the Hamming distance.

    Args:
        codes: `(b, h, n, f)` in {-1, +1}. centroids: `(c, f)` initial codes.
        weight: `(b, h, n)`, 1 for the queries that vote (real tokens), else 0.

    Returns:
        cluster index `(b, h, n)`.
    """
    cent = centroids.expand(*codes.shape[:2], *centroids.shape)  # (b h c f)
    for _ in range(iterations):
        # the most agreeing bits = the smallest Hamming distance
        assign = einsum(codes, cent, "b h n f, b h c f -> b h n c").argmax(dim=-1)
        members = F.one_hot(assign, cent.shape[2]).to(codes.dtype) * weight.unsqueeze(-1)
        votes = einsum(members, codes, "b h n c, b h n f -> b h c f")
        cent = torch.where(votes == 0, cent, votes.sign())
    return einsum(codes, cent, "b h n f, b h c f -> b h n c").argmax(dim=-1)


def clustered_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, planes: torch.Tensor,
                        centroids: torch.Tensor, mask: torch.Tensor | None = None, *,
                        iterations: int = 10, variant: str = "clustered", topk: int = 32,
                        scale: float | None = None) -> torch.Tensor:
    """Clustered (or improved clustered) attention.

    Args:
        q, k: `(b, h, n, d)`. v: `(b, h, n, e)`. planes: `(f, d)` hashing hyperplanes.
        centroids: `(c, f)` initial +-1 codes. mask: `(b, n)`, True = real token.
        iterations: Lloyd iterations. variant: "clustered" or "improved". topk: keys recomputed
            exactly per cluster (improved only).

    Returns:
        `(b, h, n, e)`.
    """
    check_qkv(q, k, v, mask, name="clustered_attention")
    one_of(variant, VARIANTS, "variant")
    b, h, n, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    if mask is not None:  # zeros at padded tokens (a fill: NaN or inf there reaches nothing real)
        q, k, v = (t.masked_fill(rearrange(~mask, "b n -> b 1 n 1"), 0.0) for t in (q, k, v))
    real = q.new_ones(b, 1, n) if mask is None else rearrange(mask, "b n -> b 1 n").to(q.dtype)
    codes = torch.where(einsum(q, planes, "b h n d, f d -> b h n f") >= 0, 1.0, -1.0).to(q.dtype)
    assign = hamming_kmeans(codes, centroids, iterations, real.expand(b, h, n))  # (b h n)
    members = F.one_hot(assign, centroids.shape[0]).to(q.dtype) * real.unsqueeze(-1)  # (b h n c)
    q_c = einsum(members, q, "b h n c, b h n d -> b h c d") / \
        members.sum(dim=2).clamp(min=1).unsqueeze(-1)  # centroids in query space
    key_mask = None if mask is None else rearrange(mask, "b j -> b 1 1 j")
    a_c = masked_fill_scores(einsum(q_c, k, "b h c d, b h j d -> b h c j") * scale,
                             key_mask).softmax(dim=-1)  # (b h c j)
    pick = F.one_hot(assign, centroids.shape[0]).to(q.dtype)  # (b h n c)
    if variant == "clustered":
        return einsum(pick, a_c @ v, "b h n c, b h c e -> b h n e")
    top = a_c.topk(min(topk, n), dim=-1).indices  # (b h c t)
    mass = a_c.gather(-1, top).sum(-1)  # (b h c)
    rest = einsum(a_c.scatter(-1, top, 0.0), v, "b h c j, b h j e -> b h c e")
    k_top, v_top = (t.gather(2, rearrange(top, "b h c t -> b h (c t) 1").expand(-1, -1, -1,
                                                                               t.shape[-1]))
                    for t in (k, v))
    k_top, v_top = (rearrange(t, "b h (c t) d -> b h c t d", c=top.shape[2]) for t in (k_top, v_top))
    # every query against every cluster's top keys, then its own cluster's row
    scores = einsum(pick, einsum(q, k_top, "b h n d, b h c t d -> b h n c t"),
                    "b h n c, b h n c t -> b h n t") * scale
    if mask is not None:
        top_real = torch.gather(rearrange(mask, "b j -> b 1 1 j").expand(-1, h, top.shape[2], -1),
                                -1, top)  # (b h c t)
        scores = masked_fill_scores(scores, einsum(pick, top_real.to(q.dtype),
                                                   "b h n c, b h c t -> b h n t") > 0)
    attn = scores.softmax(dim=-1) * einsum(pick, mass, "b h n c, b h c -> b h n").unsqueeze(-1)
    weights = rearrange(pick, "b h n c -> b h n c 1") * rearrange(attn, "b h n t -> b h n 1 t")
    return einsum(weights, v_top, "b h n c t, b h c t e -> b h n e") + \
        einsum(pick, rest, "b h n c, b h c e -> b h n e")


class ClusteredAttention(MultiHead):
    """Clustered attention. `(b, n, dim) -> (b, n, dim)`. Not causal.

    Args:
        n_clusters: query clusters C. bits: LSH code length for the clustering.
        iterations: Lloyd iterations. variant: "clustered" or "improved".
        topk: keys per cluster recomputed exactly (improved only).
        seed: seeds the hyperplanes and the initial centroids (buffers).
    """

    def __init__(self, dim: int, *, heads: int = 8, dim_head: int | None = None,
                 causal: bool = False, n_clusters: int = 32, bits: int = 32, iterations: int = 10,
                 variant: str = "clustered", topk: int = 32, seed: int = 0):
        refuse_causal(type(self).__name__, causal)
        super().__init__(dim, heads=heads, dim_head=dim_head, causal=False)
        for value, name in ((n_clusters, "n_clusters"), (bits, "bits"), (topk, "topk")):
            positive_int(value, name)
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
            raise ValueError(f"iterations must be a non-negative int, got {iterations!r}")
        self.iterations, self.topk = iterations, topk
        self.variant = one_of(variant, VARIANTS, "variant")
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("planes", torch.randn(bits, self.dim_head, generator=g))
        self.register_buffer("centroids",
                             torch.randint(0, 2, (n_clusters, bits), generator=g) * 2.0 - 1.0)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        return clustered_attention(q, k, v, self.planes.to(q.dtype), self.centroids.to(q.dtype),
                                   mask, iterations=self.iterations, variant=self.variant,
                                   topk=self.topk)
