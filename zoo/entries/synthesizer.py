r"""Synthesizer: Rethinking Self-Attention in Transformer Models.

Do attention weights need token-token interactions at all? The Synthesizer replaces the
query-key product by weights synthesized without it. The dense synthesizer predicts each
token's row of weights from that token alone, with a two-layer network whose output has one entry
per position; the random synthesizer learns the weight matrix itself, the same for every input.
Either way the weights index positions, so the layer is bound to a maximum length $\ell$ (rows and
columns are cut to the input's $n \le \ell$), and it stays quadratic in $n$.

$$ \text{dense: } B^h_i = W^h_2\, \sigma_R(W_1 X_i + b_1) + b^h_2, \qquad
   \text{random: } B^h = R^h, \qquad O^h = \operatorname{softmax}(B^h)\, G^h(X) $$

with $G^h$ the value projection of head $h$, $B^h$ cut to $n \times n$, and the upper triangle
masked when causal.

Deviations from the paper:
- Multi-head dense synthesizer: the hidden layer $W_1$ is shared by the heads and each head has
  its own output layer $W^h_2$.
- The random matrix $R$ is trained (the paper's "Random"; its "Fixed Random" and factorized and
  mixed variants are not here); it starts from $\mathcal{N}(0, 1)$ entries.
"""

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from torch import nn

from zoo.core.checks import check_sequence, one_of, positive_int
from zoo.core.masks import masked_fill_scores, score_mask, zero_padded_tokens
from zoo.core.shell import MultiHead

VARIANTS = ("dense", "random")


def dense_synthesized_scores(x: torch.Tensor, w1: nn.Linear, w2: torch.Tensor,
                             b2: torch.Tensor) -> torch.Tensor:
    """B = W2 relu(W1 x + b1) + b2, cut to the first n positions.

    Args:
        x: `(b, n, dim)`. w1: the shared hidden layer. w2: `(h, l, dim)`. b2: `(h, l)`, `l >= n`.

    Returns:
        `(b, h, n, n)`.
    """
    n = x.shape[1]
    hidden = F.relu(w1(x))  # (b n dim)
    return einsum(hidden, w2[:, :n], "b i c, h j c -> b h i j") + b2[:, None, :n]


def synthesizer_attention(scores: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                          *, causal: bool = False) -> torch.Tensor:
    """softmax(B) G: attention with synthesized weights.

    Args:
        scores: `(b or 1, h, n, n)` synthesized weights before the softmax. v: `(b, h, n, e)`.
        mask: `(b, n)`, True = real token. causal: query i keeps keys j <= i.

    Returns:
        `(b, h, n, e)`.
    """
    n = v.shape[2]
    scores = masked_fill_scores(scores, score_mask(mask, n, n, causal=causal, device=v.device))
    attn = scores.softmax(dim=-1)  # (b h i j)
    return einsum(attn, v, "b h i j, b h j e -> b h i e")


class Synthesizer(MultiHead):
    """Multi-head dense or random synthesizer. `(b, n, dim) -> (b, n, dim)` for `n <= max_len`.

    Args:
        variant: `"dense"` (weights predicted from each token) or `"random"` (a learned matrix).
        max_len: the longest input; the synthesized weights have this many columns.
    """

    def __init__(self, dim: int, *, heads: int = 8, dim_head: int | None = None,
                 causal: bool = False, variant: str = "dense", max_len: int = 512):
        super().__init__(dim, heads=heads, dim_head=dim_head, causal=causal)
        self.variant = one_of(variant, VARIANTS, "variant")
        self.max_len = positive_int(max_len, "max_len")
        del self.to_qkv  # no queries or keys: only values are projected
        self.to_v = nn.Linear(dim, heads * self.dim_head, bias=False)
        if variant == "dense":
            self.w1 = nn.Linear(dim, dim)
            # each head's output layer starts like an nn.Linear(dim, max_len)
            self.w2 = nn.Parameter(torch.empty(heads, max_len, dim).uniform_(-dim ** -0.5, dim ** -0.5))
            self.b2 = nn.Parameter(torch.zeros(heads, max_len))
        else:
            self.r = nn.Parameter(torch.randn(heads, max_len, max_len))

    def synthesize(self, x: torch.Tensor) -> torch.Tensor:
        """The weights before the softmax: `(b, h, n, n)` (dense) or `(1, h, n, n)` (random)."""
        n = x.shape[1]
        if self.variant == "dense":
            return dense_synthesized_scores(x, self.w1, self.w2, self.b2)
        return rearrange(self.r[:, :n, :n], "h i j -> 1 h i j")

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        check_sequence(x, self.dim, mask, name=type(self).__name__, layer=self)
        x = zero_padded_tokens(x, mask)
        if x.shape[1] > self.max_len:
            raise ValueError(f"{type(self).__name__}: the input has length {x.shape[1]}, but the "
                             f"synthesized weights cover max_len={self.max_len} positions; pass a "
                             "larger max_len")
        v = self.split_heads(self.to_v(x))
        out = synthesizer_attention(self.synthesize(x), v, mask, causal=self.causal)
        return self.to_out(self.merge_heads(out))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, variant={self.variant!r}, max_len={self.max_len}"
