r"""Linformer: Self-Attention with Linear Complexity.

The attention map is close to low rank, so keys and values need not keep their full length:
learned projections `E` and `F` mix the n keys and n values down to r slots before attention.
Each query then scores r projected keys instead of n, and time and memory are linear in n for a
fixed r. The projections have one column per position, so the layer has a `max_len`; shorter
sequences use the first n columns.

$$ O = \operatorname{softmax}\!\big(Q (E K)^\top / \sqrt{d}\big)\, F V,
   \qquad E, F \in \mathbb{R}^{r \times n} $$

Deviations from the paper:

- `E` and `F` start as segment means (slot i averages positions `i * max_len / r` up to the
  next slot's start) rather than at random; they are learned as in the paper. With
  `r = max_len` this start is the identity, and at n = max_len the layer is then exactly softmax
  attention (tested).
- A slot whose projection row has no weight on a real token (padding, or positions past n) is
  masked out of the softmax; padded keys and values are zeroed before projecting. With learned,
  dense rows this never triggers; with the segment-mean start it keeps padding and short inputs
  from adding empty slots.
- One `E`, `F` pair per head, as in the paper's eq. (7); its sharing variants (per layer,
  key-value, layer-wise) are not offered.
"""

import torch
from einops import einsum, rearrange, repeat
from torch import nn

from zoo.core.checks import check_qkv, positive_int, refuse_causal
from zoo.core.masks import neg_fill, zero_padded
from zoo.core.shell import MultiHead


def segment_mean_projection(r: int, n: int) -> torch.Tensor:
    """`(r, n)`: row i averages the positions j with `j * r // n == i` (the identity when r == n)."""
    slot = torch.arange(n) * r // n
    onehot = (slot == torch.arange(r)[:, None]).double()  # (r n)
    return onehot / onehot.sum(-1, keepdim=True).clamp(min=1)


def linformer_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, proj_k: torch.Tensor,
                        proj_v: torch.Tensor, mask: torch.Tensor | None = None, *,
                        scale: float | None = None) -> torch.Tensor:
    """Attention over r projected keys and values.

    Args:
        q, k: `(b, h, n, d)`. v: `(b, h, n, e)`. mask: `(b, n)`, True = real token.
        proj_k, proj_v: `E`, `F` as `(h, r, n)`, one per head.
        scale: score scale; None means `d ** -0.5`.

    Returns:
        `(b, h, n, e)`.
    """
    check_qkv(q, k, v, mask, name="linformer_attention")
    b, _, n, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    k, v = zero_padded(k, mask), zero_padded(v, mask)
    k = einsum(proj_k, k, "h r n, b h n d -> b h r d") * scale  # E K, eq. (7), scaled: r rows, not n
    v = einsum(proj_v, v, "h r n, b h n e -> b h r e")  # F V
    # a projected key that draws on no real key is left out
    live = (proj_k.ne(0).any(-1).expand(b, -1, -1) if mask is None else
            einsum(proj_k.abs(), mask.to(q.dtype), "h r n, b n -> b h r") > 0)  # (b h r)
    # Filled unconditionally: a branch on `live.all()` would read tensor values, which compiled
    # and exported graphs and the meta device cannot do.
    scores = einsum(q, k, "b h i d, b h r d -> b h i r")
    scores = scores.masked_fill(~rearrange(live, "b h r -> b h 1 r"), neg_fill(scores.dtype))
    attn = scores.softmax(dim=-1)  # (b h i r)
    return einsum(attn, v, "b h i r, b h r e -> b h i e")


class Linformer(MultiHead):
    """Multi-head Linformer attention, `(b, n, dim) -> (b, n, dim)` for n <= `max_len`.

    Args:
        max_len: the longest sequence; `E` and `F` have one column per position.
        r: number of projected slots (the paper's k).
    """

    def __init__(self, dim: int, *, heads: int = 8, dim_head: int | None = None,
                 causal: bool = False, max_len: int = 512, r: int = 64):
        refuse_causal(type(self).__name__, causal)
        super().__init__(dim, heads=heads, dim_head=dim_head, causal=False)
        self.max_len, self.r = positive_int(max_len, "max_len"), positive_int(r, "r")
        if r > max_len:
            raise ValueError(f"Linformer: r={r} must not exceed max_len={max_len}")
        start = repeat(segment_mean_projection(r, max_len), "r n -> h r n", h=heads).float()
        self.proj_k = nn.Parameter(start.clone())
        self.proj_v = nn.Parameter(start.clone())

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        n = k.shape[2]
        if n > self.max_len:
            raise ValueError(f"Linformer: sequence length {n} exceeds max_len={self.max_len}; "
                             f"build the layer with max_len >= {n}")
        return linformer_attention(q, k, v, self.proj_k[..., :n], self.proj_v[..., :n], mask)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, max_len={self.max_len}, r={self.r}"
