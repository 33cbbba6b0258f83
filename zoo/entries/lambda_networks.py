r"""LambdaNetworks: Modeling Long-Range Interactions Without Attention.

Instead of an attention map per query, summarise the context into small linear functions, the
lambdas, and apply them to the queries. The content lambda is one `(k, v)` matrix for the whole
sequence: keys normalised by a softmax over positions, times the values. Position lambdas add what
depends on where a context token sits relative to the query; here they come from learned relative
embeddings over a local scope of `scope` tokens (the paper's lambda convolution), which keeps the
layer linear in the length. All heads share the keys and values and differ only in their queries
(the paper's multi-query lambdas).

$$ \bar K = \operatorname{softmax}_{\text{positions}}(K), \quad \lambda^c = \bar K^\top V, \quad
   \lambda^p_n = \sum_{o} e_o\, V_{n+o}^\top, \quad y_n = (\lambda^c + \lambda^p_n)^\top q_n $$

With `causal=True` the context of position n is the positions m <= n (the paper's masked
contexts): the softmax and the sums run over them only (prefix sums), and the scope looks back.

Deviations from the paper: no batch normalisation of queries and values (it couples the samples
of a batch); the global position lambdas (an embedding per pair of positions, quadratic in the
length) are not included, only the local ones of the lambda convolution, computed as
$y^p_n = \sum_o (q_n \cdot e_o)\, v_{n+o}$, which equals $(\lambda^p_n)^\top q_n$.
"""

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from torch import nn

from zoo.core.checks import check_qkv, check_sequence, positive_int
from zoo.core.masks import neg_fill, safe_denominator, zero_padded
from zoo.core.shell import MultiHead


def scope_offsets(scope: int, causal: bool) -> tuple[int, int]:
    """Tokens the local scope reaches to the left and to the right of its query."""
    return (scope - 1, 0) if causal else ((scope - 1) // 2, (scope - 1) // 2)


def lambda_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     emb: torch.Tensor | None = None, mask: torch.Tensor | None = None, *,
                     causal: bool = False) -> torch.Tensor:
    """Content lambda plus local position lambdas, applied to the queries.

    Args:
        q: `(b, h, n, d)` (d is the paper's |k|). k: `(b, h, n, d)`, or `(b, 1, n, d)` shared by
            all heads (multi-query). v: `(b, h, n, e)` or `(b, 1, n, e)` (e is |v|).
        emb: `(r, d)` relative position embeddings for offsets `-left .. right` (see
            `scope_offsets`); None leaves out the position lambdas.
        mask: `(b, n)`, True = real token; padded positions are not part of any context.
        causal: the context of position n is m <= n.

    Returns:
        `(b, h, n, e)`.
    """
    b, h = q.shape[:2]
    check_qkv(q, k.expand(b, h, -1, -1), v.expand(b, h, -1, -1), mask, name="lambda_attention")
    if mask is not None:
        k = k.masked_fill(~rearrange(mask, "b n -> b 1 n 1"), neg_fill(k.dtype))
    v = zero_padded(v, mask)
    if causal:
        # the key softmax over m <= n as prefix sums; the shift cancels in the ratio
        weights = zero_padded((k - k.amax(dim=2, keepdim=True).detach()).exp(), mask)
        # positions last: torch's cumsum is fastest along the innermost axis
        state = einsum(weights, v, "b h m d, b h m e -> b h d e m").cumsum(dim=-1)
        norm = rearrange(weights, "b h m d -> b h d 1 m").cumsum(dim=-1)
        content = state / safe_denominator(norm)  # lambda^c_n
        out = einsum(q, content, "b h n d, b h d e n -> b h n e")
    else:
        content = einsum(k.softmax(dim=2), v, "b h m d, b h m e -> b h d e")  # lambda^c
        out = einsum(q, content, "b h n d, b h d e -> b h n e")
    if emb is None:
        return out
    left, right = scope_offsets(emb.shape[0], causal)
    windows = F.pad(v, (0, 0, left, right)).unfold(2, left + right + 1, 1)  # (b h n e r)
    scores = einsum(q, emb, "b h n d, r d -> b h n r")
    return out + einsum(scores, windows, "b h n r, b h n e r -> b h n e")


class LambdaNetworks(MultiHead):
    """Multi-query lambda layer with a local scope of position lambdas. `(b, n, dim) -> same`.

    Args:
        heads: number of queries per position (|h|).
        dim_head: value width |v|; None means `dim // heads`.
        dim_key: query and key width |k|.
        scope: tokens the position lambdas see (odd unless causal); 0 keeps the content lambda only.
    """

    def __init__(self, dim: int, *, heads: int = 4, dim_head: int | None = None,
                 dim_key: int = 16, scope: int = 15, causal: bool = False):
        super().__init__(dim, heads=heads, dim_head=dim_head, causal=causal)
        self.dim_key = positive_int(dim_key, "dim_key")
        if isinstance(scope, bool) or not isinstance(scope, int) or scope < 0:
            raise ValueError(f"scope must be a non-negative int, got {scope!r}")
        if scope and not causal and scope % 2 == 0:
            raise ValueError(f"scope must be odd unless causal=True (centred on the query), "
                             f"got {scope}")
        self.scope = scope
        # one projection for the h queries and the shared key and value
        self.to_qkv = nn.Linear(dim, heads * dim_key + dim_key + self.dim_head, bias=False)
        self.emb = nn.Parameter(torch.randn(scope, dim_key) * dim_key ** -0.5) if scope else None

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        check_sequence(x, self.dim, mask, name=type(self).__name__, layer=self)
        h, d = self.heads, self.dim_key
        q, k, v = self.to_qkv(x).split([h * d, d, self.dim_head], dim=-1)
        q, k, v = self.split_heads(q), rearrange(k, "b n d -> b 1 n d"), rearrange(v, "b n e -> b 1 n e")
        return self.to_out(self.merge_heads(self.attend(q, k, v, mask)))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        return lambda_attention(q, k, v, self.emb, mask, causal=self.causal)
