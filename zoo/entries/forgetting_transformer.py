r"""Forgetting Transformer: Softmax Attention with a Forget Gate.

Forgetting attention: every token emits a scalar forget gate per head, $f_t = \sigma(w_f^\top x_t +
b_f)$, and the score of query $i$ for key $j$ is lowered by the log of the product of the gates in
between, $D_{ij} = \sum_{l=j+1}^{i} \log f_l$. It is the forget gate of recurrent models put into
softmax attention: a learned, data-dependent recency bias that needs no position embedding. With
$c_t = \sum_{l \le t} \log f_l$ the bias is a difference of cumulative sums, $D_{ij} = c_i - c_j$,
so a decoder caches $c$ beside its keys and values. All gates at 1 is softmax attention.

$$ O = \operatorname{softmax}\!\big(Q K^\top/\sqrt{d} + D\big)\, V,\qquad
   D_{ij} = c_i - c_j \ (j \le i),\quad c_t = \textstyle\sum_{l \le t} \log \sigma(w_f^\top x_t + b_f) $$

Deviations from the paper:
- the dense form is the reference and the layer (the paper computes it with a FlashAttention
  kernel that adds $D$ tile by tile: the same numbers, linear memory);
- the "Pro" block's extras (output gate, QK-norm, key-value shift, output norm) are left out;
- a padded token's gate is 1 (it forgets nothing), so padding changes no real output;
- `causal=False` (not in the paper, a decoder) uses $D_{ij} = -|c_i - c_j|$: the gates between
  the two tokens, in either direction.
"""

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from zoo.core.checks import check_dtype, check_sequence
from zoo.core.decoding import Cached, append, cached_attention, real_tokens
from zoo.core.masks import zero_padded_tokens
from zoo.core.shell import MultiHead


def cumulative_log_forget(log_forget: torch.Tensor, mask: torch.Tensor | None = None,
                          past: torch.Tensor | None = None) -> torch.Tensor:
    """`c_t = sum_{l <= t} log f_l` `(b, h, n)` from `log f` `(b, h, n)`; a padded token's gate is 1.

    `past` `(b, h)` is `c` before the first position (a decoder's running sum); None is 0.
    """
    if mask is not None:
        log_forget = torch.where(rearrange(mask, "b n -> b 1 n"), log_forget, log_forget.new_zeros(()))
    c = log_forget.cumsum(dim=-1)
    return c if past is None else c + past.unsqueeze(-1)


def forgetting_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, c: torch.Tensor,
                         mask: torch.Tensor | None = None, *, causal: bool = True) -> torch.Tensor:
    """Softmax attention with the cumulative log forget gates added to the scores.

    Args:
        q: `(b, h, i, d)`, the last `i` of the `j` positions. k: `(b, h, j, d)`. v: `(b, h, j, e)`.
        c: `(b, h, j)`, the cumulative log forget gates of every position (`cumulative_log_forget`).
        mask: `(b, j)`, True = real token.
        causal: query `i` reads keys `j <= i`; otherwise every key, with `D = -|c_i - c_j|`.

    Returns:
        `(b, h, i, e)`.
    """
    gap = rearrange(c[..., -q.shape[2]:], "b h i -> b h i 1") - rearrange(c, "b h j -> b h 1 j")
    bias = gap if causal else -gap.abs()  # D_ij = sum_{l=j+1}^{i} log f_l
    return cached_attention(q, k, v, real_tokens(k[:, 0], mask), causal=causal, bias=bias)


class ForgettingTransformer(Cached, MultiHead):
    """Multi-head forgetting attention. `(b, n, dim) -> (b, n, dim)`.

    Args:
        forget_gate: False fixes every gate at 1 (`log f = 0`): plain softmax attention, the paper's
            baseline, with no gate parameters.
    """

    def __init__(self, dim: int, *, heads: int = 8, dim_head: int | None = None,
                 causal: bool = False, forget_gate: bool = True):
        super().__init__(dim, heads=heads, dim_head=dim_head, causal=causal)
        if not isinstance(forget_gate, bool):
            raise ValueError(f"forget_gate must be True or False, got {forget_gate!r}")
        self.to_forget = nn.Linear(dim, heads) if forget_gate else None  # w_f, b_f per head

    def log_forget(self, x: torch.Tensor) -> torch.Tensor:
        """`log f_t = log sigmoid(w_f . x_t + b_f)` `(b, h, n)` (0 without a forget gate)."""
        if self.to_forget is None:
            return x.new_zeros(x.shape[0], self.heads, x.shape[1])
        return rearrange(F.logsigmoid(self.to_forget(x)), "b n h -> b h n")

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        check_sequence(x, self.dim, mask, name=type(self).__name__)
        check_dtype(x, self, name=type(self).__name__)
        x = zero_padded_tokens(x, mask)
        q, k, v = map(self.split_heads, self.to_qkv(x).chunk(3, dim=-1))
        c = cumulative_log_forget(self.log_forget(x), mask)
        out = forgetting_attention(q, k, v, c, mask, causal=self.causal)
        return self.to_out(self.merge_heads(out))

    def decode(self, x: torch.Tensor, cache: dict | None, mask: torch.Tensor | None,
               start: int) -> tuple[torch.Tensor, dict]:
        """One chunk. The cache is `{k, v, real}` and `c` `(b, h, n)`, the cumulative log gate of every
        cached token: `D` for a new query needs no earlier gate."""
        state = cache or {}
        q, k, v = map(self.split_heads, self.to_qkv(x).chunk(3, dim=-1))
        past = state.get("c")
        c = append(past, cumulative_log_forget(self.log_forget(x), mask,
                                               None if past is None else past[..., -1]), 2)
        k, v = append(state.get("k"), k, 2), append(state.get("v"), v, 2)
        real = append(state.get("real"), real_tokens(x, mask), 1)
        out = forgetting_attention(q, k, v, c, real, causal=True)
        return self.to_out(self.merge_heads(out)), {"k": k, "v": v, "c": c, "real": real}
