r"""Fastformer: Additive Attention Can Be All You Need.

No pairwise scores at all: additive attention pools the queries into one global query vector,
which multiplies every key element-wise; a second additive attention pools those products into one
global key vector, which multiplies every value element-wise. A linear map of the result plus the
token's own query is the output. Each pooling step is a softmax over positions of a learned
projection, so the whole layer is linear in the length.

$$ \alpha_i = \operatorname{softmax}_i\!\big(w_q^\top q_i / \sqrt{d}\big),\quad
   \mathbf{q} = \textstyle\sum_i \alpha_i q_i,\quad p_i = \mathbf{q} \odot k_i,\quad
   \beta_i = \operatorname{softmax}_i\!\big(w_k^\top p_i / \sqrt{d}\big),\quad
   \mathbf{k} = \textstyle\sum_i \beta_i p_i,\quad o_i = W_r(\mathbf{k} \odot v_i) + q_i $$

Deviations from the paper: separate query and value projections (the paper shares them to save
parameters, an option it reports alongside sharing across layers); $W_r$ acts on the concatenated
heads, and the shell's output projection follows.
"""

import torch
from einops import einsum, rearrange
from torch import nn

from zoo.core.checks import check_qkv, check_sequence, refuse_causal
from zoo.core.masks import masked_fill_scores, zero_padded_tokens
from zoo.core.shell import MultiHead


def additive_pool(x: torch.Tensor, w: torch.Tensor, mask: torch.Tensor | None = None):
    """`sum_i softmax_i(w . x_i / sqrt(d)) x_i`: `(b, h, n, d)` and `w` `(h, d)` -> `(b, h, 1, d)`."""
    scores = einsum(x, w, "b h n d, h d -> b h n") * x.shape[-1] ** -0.5
    if mask is not None:
        scores = masked_fill_scores(scores, rearrange(mask, "b n -> b 1 n"))
    return einsum(scores.softmax(dim=-1), x, "b h n, b h n d -> b h d").unsqueeze(2)


def fastformer_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w_q: torch.Tensor,
                         w_k: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The key-value interactions `k_glob * v_i`, before the output transform.

    Args:
        q, k, v: `(b, h, n, d)`. w_q, w_k: `(h, d)`. mask: `(b, n)`, True = real token; padded
            tokens are left out of both pools.

    Returns:
        `(b, h, n, d)`.
    """
    check_qkv(q, k, v, mask, name="fastformer_attention")
    global_q = additive_pool(q, w_q, mask)  # (b h 1 d)
    global_k = additive_pool(global_q * k, w_k, mask)
    return global_k * v


class Fastformer(MultiHead):
    """Multi-head Fastformer attention. `(b, n, dim) -> (b, n, dim)`. Not causal: both pools run
    over the whole sequence."""

    def __init__(self, dim: int, *, heads: int = 8, dim_head: int | None = None,
                 causal: bool = False):
        refuse_causal(type(self).__name__, causal)
        super().__init__(dim, heads=heads, dim_head=dim_head, causal=False)
        inner = self.heads * self.dim_head
        self.w_q = nn.Parameter(torch.randn(self.heads, self.dim_head) * self.dim_head ** -0.5)
        self.w_k = nn.Parameter(torch.randn(self.heads, self.dim_head) * self.dim_head ** -0.5)
        self.to_r = nn.Linear(inner, inner)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        check_sequence(x, self.dim, mask, name=type(self).__name__, layer=self)
        x = zero_padded_tokens(x, mask)
        q, k, v = map(self.split_heads, self.to_qkv(x).chunk(3, dim=-1))
        u = fastformer_attention(q, k, v, self.w_q, self.w_k, mask)
        return self.to_out(self.to_r(self.merge_heads(u)) + self.merge_heads(q))
