r"""Kronecker Attention Networks.

Flattening an image into N = H W tokens treats it as one long vector; assuming instead that it
follows a matrix-variate normal distribution (a Kronecker product of a row and a column
covariance) suggests summarising it by its H row averages (the lateral average, over the width)
and its W column averages (the horizontal average, over the height). The Kronecker attention
operator attends among these H + W summary tokens (KAO_QKV; the default) and returns an image as
the outer sum of the row and column outputs, $O_{ij} = O^L_i + O^H_j$, so the attention costs
$(H + W)^2$ instead of $(H W)^2$. The lighter variant KAO_KV keeps every pixel as a query and
uses the H + W summaries as keys and values, $N (H + W)$.

$$ C = \big[\bar X^L;\ \bar X^H\big],\quad
   \bar X^L_i = \tfrac{1}{W}\textstyle\sum_j X_{ij},\quad
   \bar X^H_j = \tfrac{1}{H}\textstyle\sum_i X_{ij} $$
$$ \text{QKV:}\ O = \operatorname{softmax}\big(C W_q (C W_k)^\top\big)\, C W_v,\quad
   Y_{ij} = W_o\,(O_i + O_{H + j}) \qquad
   \text{KV:}\ Y = W_o \operatorname{softmax}\big(X W_q (C W_k)^\top\big)\, C W_v $$

Deviations from the paper: multi-head splitting and the output projection $W_o$ are ours (the
paper's operator has one head; its transforms of Q, K, V are linear maps, applied here to the
summaries, which equals averaging the transformed pixels). Scores are unscaled, as in the paper.
"""

import torch
from einops import rearrange, reduce
from torch import nn

from zoo.core.checks import check_image, one_of, positive_int
from zoo.core.softmax import softmax_attention

VARIANTS = ("qkv", "kv")


def summaries(x: torch.Tensor) -> torch.Tensor:
    """`(b, c, y, x) -> (b, y + x, c)`: the lateral (row) averages, then the horizontal (column)
    averages."""
    return torch.cat([reduce(x, "b c y x -> b y c", "mean"), reduce(x, "b c y x -> b x c", "mean")],
                     dim=1)


class KroneckerAttention(nn.Module):
    """Kronecker attention operator. `(b, dim, y, x) -> (b, dim, y, x)`.

    Args:
        dim: channels.
        heads: attention heads.
        dim_head: width of one head; None means `dim // heads`.
        variant: `"qkv"` (queries, keys and values all summaries; outer-sum output) or `"kv"`
            (pixels query the summaries).
    """

    def __init__(self, dim: int, *, heads: int = 1, dim_head: int | None = None,
                 variant: str = "qkv"):
        super().__init__()
        self.dim, self.heads = positive_int(dim, "dim"), positive_int(heads, "heads")
        if dim_head is None and dim % heads:
            raise ValueError(f"heads={heads} must divide dim={dim}, or pass dim_head")
        self.dim_head = positive_int(dim // heads if dim_head is None else dim_head, "dim_head")
        self.variant = one_of(variant, VARIANTS, "variant")
        inner = heads * self.dim_head
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Conv2d(inner, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image(x, self.dim, name=type(self).__name__, layer=self)
        hh = x.shape[2]
        c = summaries(x)  # (b (y + x) c)
        k, v = rearrange(self.to_kv(c), "b r (two h d) -> two b h r d", two=2, h=self.heads)
        if self.variant == "qkv":
            q = rearrange(self.to_q(c), "b r (h d) -> b h r d", h=self.heads)
            o = rearrange(softmax_attention(q, k, v, scale=1.0), "b h r e -> b r (h e)")
            out = rearrange(o[:, :hh], "b y c -> b c y 1") + rearrange(o[:, hh:], "b x c -> b c 1 x")
        else:
            pixels = rearrange(x, "b c y x -> b (y x) c")
            q = rearrange(self.to_q(pixels), "b n (h d) -> b h n d", h=self.heads)
            out = rearrange(softmax_attention(q, k, v, scale=1.0), "b h (y x) e -> b (h e) y x",
                            y=hh)
        return self.to_out(out)
