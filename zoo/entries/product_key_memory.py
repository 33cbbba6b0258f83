r"""Large Memory Layers with Product Keys.

A key-value memory with a very large number of slots, read by exact top-k search at a cost of
about the square root of the slot count. The keys are the Cartesian product of two small sets of
sub-keys: the query is split in two halves, each half finds its k best sub-keys, and since a
product key's score is the sum of its two sub-key scores, the k best product keys lie among the
k x k pairs of those winners (in fact among the about k ln k pairs that fewer than k pairs
beat for sure). The k selected values are averaged with softmax weights of their
scores; several heads (each with its own query and sub-keys) read the same values and are summed.
It replaces a feed-forward layer, not attention: every token reads the memory on its own, so the
layer is trivially autoregressive and ignores padding.

$$ \mathcal{I} = \operatorname{top}_k \big\{ q_1 c^{(1)}_i + q_2 c^{(2)}_j :
   i \in \operatorname{top}_k(q_1 C_1^\top),\ j \in \operatorname{top}_k(q_2 C_2^\top) \big\},
   \qquad m(x) = \sum_{(i, j) \in \mathcal{I}} \operatorname{softmax}(s)_{ij}\, v_{i |C| + j} $$

Deviations from the paper: no BatchNorm on the queries (it would tie samples in training mode);
the values are read with `F.embedding_bag` (the paper's EmbeddingBag) and are not trained with a
sparse optimiser or a higher learning rate (training choices).
"""

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from torch import nn

from zoo.core import decoding
from zoo.core.checks import check_sequence, positive_int


def product_key_topk_reference(q1: torch.Tensor, q2: torch.Tensor, keys1: torch.Tensor,
                               keys2: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k of all `c1 c2` product keys, every score `q1 . c1 + q2 . c2` written out (the
    paper's eq. 3 before its reduction). Same arguments as `product_key_topk`."""
    s1 = einsum(q1, keys1, "... h d, h c d -> ... h c")
    s2 = einsum(q2, keys2, "... h d, h c d -> ... h c")
    scores = rearrange(s1, "... c -> ... c 1") + rearrange(s2, "... c -> ... 1 c")  # (... h c1 c2)
    return rearrange(scores, "... c1 c2 -> ... (c1 c2)").topk(k, dim=-1)


def product_key_topk(q1: torch.Tensor, q2: torch.Tensor, keys1: torch.Tensor, keys2: torch.Tensor,
                     k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What the layer runs: `product_key_topk_reference` from the two sub-key top-k lists and only
    the pairs of winners that can rank among the best k (tested equal). Exact top-k over the
    product keys `(c1, c2)` with score `q1 . c1 + q2 . c2`.

    Args:
        q1, q2: query halves `(..., h, d)`. keys1, keys2: sub-keys `(h, c, d)`. k: how many.

    Returns:
        `(scores, indices)`, each `(..., h, k)`, best first; index `i * c + j` is the pair `(i, j)`.
    """
    s1, i1 = einsum(q1, keys1, "... h d, h c d -> ... h c").topk(k, dim=-1)  # (... h k), sorted
    s2, i2 = einsum(q2, keys2, "... h d, h c d -> ... h c").topk(k, dim=-1)
    # Of the k x k pairs (a, b) of winners, (a + 1)(b + 1) pairs score at least as high as (a, b),
    # so only pairs with (a + 1)(b + 1) <= k can be among the best k: about k ln k candidates.
    # Listed from k alone (not by a boolean mask over a tensor, whose result has a data-dependent
    # size that compiled and exported graphs and the meta device cannot handle).
    pairs = [(a, b) for a in range(k) for b in range(k // (a + 1))]
    a, b = torch.tensor(pairs, dtype=torch.long, device=q1.device).unbind(-1)
    scores, best = (s1[..., a] + s2[..., b]).topk(k, dim=-1)
    return scores, i1.gather(-1, a[best]) * keys2.shape[1] + i2.gather(-1, b[best])


class ProductKeyMemory(nn.Module):
    """Product-key memory layer. `(b, n, dim) -> (b, n, dim)`, token by token.

    Args:
        dim: model width.
        heads: memory heads (own queries and sub-keys, shared values), summed.
        num_keys: sub-keys per half, |C|; the memory has `num_keys ** 2` values.
        topk: k, both for the sub-key searches and for the values read.
        dim_key: query width per head (two halves); None means half of `dim`, rounded down to
            even (at least 2).
        causal: accepted for the common interface; each token is read alone either way.
    """

    def __init__(self, dim: int, *, heads: int = 4, num_keys: int = 64, topk: int = 16,
                 dim_key: int | None = None, causal: bool = False):
        super().__init__()
        self.dim, self.heads = positive_int(dim, "dim"), positive_int(heads, "heads")
        self.num_keys, self.topk = positive_int(num_keys, "num_keys"), positive_int(topk, "topk")
        self.dim_key = positive_int(2 * max(1, dim // 4) if dim_key is None else dim_key, "dim_key")
        if self.dim_key % 2 or topk > num_keys:
            raise ValueError(f"dim_key={self.dim_key} must be even and topk={topk} at most "
                             f"num_keys={num_keys}")
        self.causal = bool(causal)
        half = self.dim_key // 2
        self.to_queries = nn.Linear(dim, heads * self.dim_key, bias=False)
        self.keys = nn.Parameter(torch.randn(2, heads, num_keys, half) * half ** -0.5)
        self.values = nn.Parameter(torch.randn(num_keys ** 2, dim) * dim ** -0.5)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        check_sequence(x, self.dim, mask, name=type(self).__name__, layer=self)
        q1, q2 = rearrange(self.to_queries(x), "b n (h two d) -> two b n h d", h=self.heads, two=2)
        scores, idx = product_key_topk(q1, q2, self.keys[0], self.keys[1], self.topk)  # (b n h k)
        weights = scores.softmax(dim=-1)
        out = F.embedding_bag(rearrange(idx, "b n h k -> (b n) (h k)"), self.values, mode="sum",
                              per_sample_weights=rearrange(weights, "b n h k -> (b n) (h k)").to(
                              self.values.dtype))  # autocast leaves embedding_bag out: one dtype
        return rearrange(out, "(b n) x -> b n x", b=x.shape[0], n=x.shape[1])

    def step(self, x: torch.Tensor, state: decoding.DecodeState | None = None, *,
             mask: torch.Tensor | None = None) -> tuple[torch.Tensor, decoding.DecodeState]:
        """Decoding (see `zoo.core.decoding`): each token is read alone, so a chunk's output is its
        forward and the state holds nothing but the length."""
        return decoding.step(self, x, state, mask, decoding.pointwise(self))
