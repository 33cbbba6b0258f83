r"""Efficient Content-Based Sparse Attention with Routing Transformers.

Queries and keys are routed to the nearest of k centroids, and a query attends only to the keys
routed to its own centroid. The centroids are learned without gradients, by online mini-batch
k-means: in training mode every call moves them towards the mean of the unit-normalised queries
and keys assigned to them, through exponential moving averages of their sums and counts; in eval
mode they stay fixed. To keep the work bounded, tokens are sorted by cluster and cut into chunks of
the average cluster size n/k; each chunk attends to itself and the chunk before, within its
cluster. At k = 1 this is softmax attention; at k of about the square root of n, the paper's
choice, the cost is $O(n^{1.5} d)$.

$$ O_i = \sum_{j:\, \mu(Q_i) = \mu(K_j)} \operatorname{softmax}_j\!\big(s\, Q_i^\top K_j\big) V_j,
   \qquad \mu(x) = \arg\min_c \big\|\tfrac{x}{\|x\|} - \mu_c\big\| $$

$$ \tilde\mu_c \leftarrow \lambda\tilde\mu_c + (1-\lambda)\Big(\sum_{i:\,\mu(Q_i)=c}\hat Q_i
   + \sum_{j:\,\mu(K_j)=c}\hat K_j\Big), \quad
   n_c \leftarrow \lambda n_c + (1-\lambda)\,|X_c|, \quad \mu_c = \tilde\mu_c / n_c $$

`routing_attention_reference` is the first equation: routing by the nearest centroid as written
and the dense form of attention within clusters over sorted chunks
(`zoo.core.sorting.bucket_attention_reference`); the fast path `routing_attention`, tested equal,
sorts and gathers (`zoo.core.sorting.bucket_attention`).

Deviations from the paper:
- The layer shares one projection for queries and keys (the authors' code defaults to
  `share_qk`), so queries and keys sort the same way and causal chunks never see later tokens;
  `attend(q, k, v)` routes any `q` and `k` separately.
- Routing uses unit-normalised vectors rather than layer-normalised ones.
- Each centroid's top-(n/k) tokens are replaced by sorting on the cluster and cutting equal chunks
  of n/k (with the previous chunk; causal: the n/k sorted slots before a query).
- The paper's local-attention heads are a separate mechanism and are left out.
- Under data parallelism (a `torch.distributed` process group), the k-means statistics are summed
  over all ranks before the update, so every rank keeps the same centroids, learned from the
  whole global batch (as one process would), with no buffer broadcast from rank 0.
"""

import math

import torch
import torch.nn.functional as F
from einops import einsum, rearrange, repeat
from torch import nn

from zoo.core.checks import check_dtype, check_qkv, check_sequence, positive_int
from zoo.core.shell import MultiHead
from zoo.core.sorting import bucket_attention, bucket_attention_reference


def routing_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                centroids: torch.Tensor, mask: torch.Tensor | None = None, *,
                                window: int, causal: bool = False,
                                scale: float | None = None) -> torch.Tensor:
    """`routing_attention` as the equation: mu(x) the centroid nearest to x / |x|, and attention
    among the queries and keys routed alike, within sorted chunks of `window`, densely."""
    check_qkv(q, k, v, mask, name="routing_attention")
    q_clusters, k_clusters = (nearest_centroid_reference(t, centroids).unsqueeze(-1) for t in (q, k))
    return bucket_attention_reference(q, k, v, q_clusters, k_clusters, mask, chunk_size=window,
                                      causal=causal, scale=scale)


def nearest_centroid_reference(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """`nearest_centroid` as written: argmin_c |x / |x| - mu_c|, `(b, h, n)`."""
    unit = rearrange(F.normalize(x, dim=-1), "b h n d -> b h n 1 d")
    return (unit - rearrange(centroids, "h c d -> h 1 c d")).norm(dim=-1).argmin(dim=-1)


def nearest_centroid(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """x `(b, h, n, d)`, centroids `(h, k, d)` -> index `(b, h, n)` of the centroid nearest to x/|x|."""
    x = F.normalize(x, dim=-1)
    # |x - mu|^2 = 1 - 2 x.mu + |mu|^2 for unit x
    closeness = 2 * einsum(x, centroids, "b h n d, h c d -> b h n c") \
        - rearrange(centroids.square().sum(-1), "h c -> h 1 c")
    return closeness.argmax(dim=-1)


def routing_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, centroids: torch.Tensor,
                      mask: torch.Tensor | None = None, *, window: int, causal: bool = False,
                      scale: float | None = None) -> torch.Tensor:
    """Routing attention: queries attend to the keys of their own cluster.

    Args:
        q, k: `(b, h, n, d)`. v: `(b, h, n, e)`. centroids: `(h, k, d)`.
        mask: `(b, n)`, True = real token. window: chunk length of the sorted tokens.
        causal: query `i` sees keys `j <= i` only.

    Returns:
        `(b, h, n, e)`.
    """
    check_qkv(q, k, v, mask, name="routing_attention")
    q_clusters = nearest_centroid(q, centroids).unsqueeze(-1)
    # shared QK: one tensor for both, which bucket_attention recognises as shared
    k_clusters = q_clusters if k is q else nearest_centroid(k, centroids).unsqueeze(-1)
    return bucket_attention(q, k, v, q_clusters, k_clusters, mask, chunk_size=window,
                            causal=causal, scale=scale)


class RoutingTransformer(MultiHead):
    """Routing attention with centroids learned by online k-means. `(b, n, dim) -> (b, n, dim)`.

    Args:
        n_clusters: centroids per head, k; the chunk length is `ceil(n / k)`. The default is the
            paper's k = sqrt(n) at n = 16384.
        decay: lambda of the moving averages (training mode only).
        seed: seeds the initial centroids.
    """

    def __init__(self, dim: int, *, heads: int = 8, dim_head: int | None = None,
                 causal: bool = False, n_clusters: int = 128, decay: float = 0.999, seed: int = 0):
        super().__init__(dim, heads=heads, dim_head=dim_head, causal=causal)
        self.n_clusters = positive_int(n_clusters, "n_clusters")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay!r}")
        self.decay = decay
        del self.to_qkv  # shared QK: one projection for queries (and keys), one for values
        self.to_qv = nn.Linear(dim, 2 * heads * self.dim_head, bias=False)
        g = torch.Generator().manual_seed(seed)
        init = F.normalize(torch.randn(heads, n_clusters, self.dim_head, generator=g), dim=-1)
        self.register_buffer("centroids", init)
        self.register_buffer("centroid_sums", init.clone())
        self.register_buffer("centroid_counts", torch.ones(heads, n_clusters))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        check_sequence(x, self.dim, mask, name=type(self).__name__)
        check_dtype(x, self, name=type(self).__name__)
        q, v = map(self.split_heads, self.to_qv(x).chunk(2, dim=-1))
        return self.to_out(self.merge_heads(self.attend(q, q, v, mask)))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        out = routing_attention(q, k, v, self.centroids.to(q.dtype), mask,
                                window=math.ceil(q.shape[2] / self.n_clusters), causal=self.causal)
        if self.training:
            self.update_centroids(q, k, mask)
        return out

    @torch.no_grad()
    def update_centroids(self, q: torch.Tensor, k: torch.Tensor,
                         mask: torch.Tensor | None = None) -> None:
        """One mini-batch k-means step: moving averages of the sums and counts of the real
        queries and keys routed to each centroid, then centroid = sum / count."""
        x = F.normalize(torch.cat([q, k], dim=2), dim=-1).to(self.centroids.dtype)  # (b h 2n d)
        clusters = nearest_centroid(x, self.centroids)
        if mask is not None:  # padded tokens go to an extra slot that is dropped
            clusters = clusters.masked_fill(~repeat(mask, "b n -> b 1 (two n)", two=2),
                                            self.n_clusters)
        idx = rearrange(clusters, "b h n -> h (b n)")
        h, d = self.heads, self.dim_head
        sums = x.new_zeros(h, self.n_clusters + 1, d).scatter_add_(
            1, repeat(idx, "h m -> h m d", d=d), rearrange(x, "b h n d -> h (b n) d"))
        counts = x.new_zeros(h, self.n_clusters + 1).scatter_add_(
            1, idx, x.new_ones(idx.shape))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(sums)  # the global batch's statistics, on every rank
            torch.distributed.all_reduce(counts)
        self.centroid_sums.mul_(self.decay).add_(sums[:, :-1], alpha=1 - self.decay)
        self.centroid_counts.mul_(self.decay).add_(counts[:, :-1], alpha=1 - self.decay)
        self.centroids.copy_(self.centroid_sums / self.centroid_counts.unsqueeze(-1))
