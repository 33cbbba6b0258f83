r"""GQA: Training Generalized Multi-Query Transformer Models from Multi-Head Checkpoints.

The query heads are split into $G$ groups and each group shares one key head and one value head.
$G = H$ is multi-head attention; $G = 1$ is multi-query attention (Shazeer 2019), one key and
value head for all. Attention itself is unchanged; what shrinks is the key-value cache a decoder
keeps, by the group factor $H / G$, and the memory traffic of reading it at every step. The paper
also converts a multi-head checkpoint by mean-pooling the key and value heads of each group
(`GroupedQueryAttention.from_multi_head`), then uptrains briefly.

$$ O_i = \operatorname{softmax}\!\big(Q_i K_{g(i)}^\top / \sqrt{d}\big)\, V_{g(i)},
   \qquad g(i) = \lfloor i\, G / H \rfloor $$

Deviations from the paper: none in the mechanism (uptraining is training, not part of the layer).
"""

import torch
from einops import rearrange, reduce, repeat
from torch import nn

from zoo.core.checks import check_dtype, check_key_mask, check_sequence, check_tensor, positive_int
from zoo.core.decoding import Cached, append, cached_attention, real_tokens
from zoo.core.masks import zero_padded_tokens
from zoo.core.shell import MultiHead


def grouped_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            mask: torch.Tensor | None = None, *, causal: bool = False) -> torch.Tensor:
    """Softmax attention in which consecutive groups of query heads share a key and value head.

    Args:
        q: `(b, h, i, d)`. k: `(b, g, j, d)`. v: `(b, g, j, e)`, with `g` dividing `h`.
        mask: `(b, j)`, True = real token.
        causal: the queries are the last `i` of the `j` positions and read no later key.

    Returns:
        `(b, h, i, e)`.
    """
    for t, label in ((q, "q"), (k, "k"), (v, "v")):
        check_tensor(t, label)
    h, g = q.shape[1], k.shape[1]
    if (q.ndim, k.ndim, v.ndim) != (4, 4, 4) or k.shape[:3] != v.shape[:3] or h % g \
            or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"grouped_query_attention: expected q (b, h, i, d) and k, v (b, g, j, d) "
                         f"with g dividing h, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    check_key_mask(mask, k.shape[0], k.shape[2], name="grouped_query_attention")
    # query head i reads key-value head i // (h / g): each kv head serves h / g query heads
    k, v = (repeat(t, "b g j d -> b (g r) j d", r=h // g) for t in (k, v))
    return cached_attention(q, k, v, real_tokens(k[:, 0], mask), causal=causal)


class GroupedQueryAttention(Cached, MultiHead):
    """Multi-head attention with `kv_heads` key-value heads. `(b, n, dim) -> (b, n, dim)`.

    Args:
        kv_heads: `G`, the number of key-value heads; it must divide `heads`. 1 is multi-query
            attention, `heads` is multi-head attention.
    """

    def __init__(self, dim: int, *, heads: int = 8, dim_head: int | None = None,
                 causal: bool = False, kv_heads: int = 2):
        super().__init__(dim, heads=heads, dim_head=dim_head, causal=causal)
        self.kv_heads = positive_int(kv_heads, "kv_heads")
        if heads % kv_heads:
            raise ValueError(f"kv_heads={kv_heads} must divide heads={heads}")
        # queries for every head, keys and values for kv_heads only (same layout as the shell's)
        self.to_qkv = nn.Linear(dim, (heads + 2 * kv_heads) * self.dim_head, bias=False)

    @classmethod
    def from_multi_head(cls, layer: MultiHead, kv_heads: int) -> "GroupedQueryAttention":
        """The paper's conversion (Sec. 2.1): the key and value projection of each group is the mean
        of the group's heads in a multi-head layer; query and output projections are kept."""
        gqa = cls(layer.dim, heads=layer.heads, dim_head=layer.dim_head, causal=layer.causal,
                  kv_heads=kv_heads).to(layer.to_qkv.weight.dtype)
        w_q, w_k, w_v = layer.to_qkv.weight.detach().chunk(3, dim=0)
        pooled = [reduce(w, "(g r d) c -> (g d) c", "mean", g=kv_heads, d=layer.dim_head)
                  for w in (w_k, w_v)]
        with torch.no_grad():
            gqa.to_qkv.weight.copy_(torch.cat([w_q, *pooled]))
            gqa.to_out.load_state_dict(layer.to_out.state_dict())
        return gqa

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q `(b, h, n, d)`, k and v `(b, kv_heads, n, d)`."""
        inner = self.kv_heads * self.dim_head
        q, k, v = self.to_qkv(x).split([self.heads * self.dim_head, inner, inner], dim=-1)
        return self.split_heads(q), *(rearrange(t, "b n (g d) -> b g n d", g=self.kv_heads)
                                      for t in (k, v))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        """k and v may have `kv_heads` heads, or any number dividing `heads` (`heads`: one each)."""
        return grouped_query_attention(q, k, v, mask, causal=self.causal)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        check_sequence(x, self.dim, mask, name=type(self).__name__)
        check_dtype(x, self, name=type(self).__name__)
        q, k, v = self.project(zero_padded_tokens(x, mask))
        return self.to_out(self.merge_heads(self.attend(q, k, v, mask)))

    def decode(self, x: torch.Tensor, cache: dict | None, mask: torch.Tensor | None,
               start: int) -> tuple[torch.Tensor, dict]:
        """One chunk; the cache `{k, v, real}` holds keys and values of `kv_heads` heads only."""
        state = cache or {}
        q, k, v = self.project(x)
        k, v = append(state.get("k"), k, 2), append(state.get("v"), v, 2)
        real = append(state.get("real"), real_tokens(x, mask), 1)
        out = grouped_query_attention(q, k, v, real, causal=True)
        return self.to_out(self.merge_heads(out)), {"k": k, "v": v, "real": real}
