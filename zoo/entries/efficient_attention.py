r"""Efficient Attention: Attention with Linear Complexities.

Normalise queries and keys separately instead of their product: each key channel becomes an
attention map over positions that pools the values into one global context vector, and each query
mixes those vectors. The `(d, e)` context replaces the `(n, n)` map, so time and memory are linear
in n. With the paper's scaling normalisation ($\rho(Y) = Y/\sqrt{n}$ on both sides) this is exactly
dot-product attention with the same normalisation, only reassociated.

$$ E = \rho_q(Q)\,\big(\rho_k(K)^\top V\big), \quad
   \rho_q = \operatorname{softmax}_{\text{row}},\ \rho_k = \operatorname{softmax}_{\text{column}} $$

Two layers: `EfficientAttention`, the sequence layer on the shared multi-head shell, and
`EfficientAttention2d`, a drop-in for the authors' module (same constructor, `state_dict` keys
and output, so its checkpoints load).

Deviations from the paper: multi-head splitting comes from the authors' code, not the paper.
`EfficientAttention2d` raises `ValueError` where the original crashes with a channel mismatch
(`value_channels` not divisible by `head_count`); like the original it ignores the last
`key_channels % head_count` key and query channels.
"""

import torch
from einops import einsum, rearrange
from torch import nn

from zoo.core.checks import check_image, check_qkv, one_of, positive_int, refuse_causal
from zoo.core.masks import neg_fill, zero_padded
from zoo.core.shell import MultiHead

NORMALIZATIONS = ("softmax", "scaling")


def efficient_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        mask: torch.Tensor | None = None, *,
                        normalization: str = "softmax") -> torch.Tensor:
    """Efficient attention on `(b, h, n, d)` tensors.

    Args:
        q, k: `(b, h, n, d)`. v: `(b, h, n, e)`. mask: `(b, n)`, True = real token.
        normalization: `"softmax"` (queries over channels, keys over positions; the default) or
            `"scaling"` (both divided by the square root of the number of real tokens).

    Returns:
        `(b, h, n, e)`.
    """
    check_qkv(q, k, v, mask, name="efficient_attention")
    one_of(normalization, NORMALIZATIONS, "normalization")
    if normalization == "softmax":
        q = q.softmax(dim=-1)
        if mask is not None:
            k = k.masked_fill(~rearrange(mask, "b n -> b 1 n 1"), neg_fill(k.dtype))
        k = k.softmax(dim=-2)
    else:
        n = k.shape[2] if mask is None else rearrange(mask.sum(-1).clamp(min=1).to(q.dtype),
                                                      "b -> b 1 1 1")
        q, k = q * n ** -0.5, zero_padded(k, mask) * n ** -0.5
    context = einsum(k, v, "b h n d, b h n e -> b h d e")
    return einsum(q, context, "b h n d, b h d e -> b h n e")


class EfficientAttention(MultiHead):
    """Multi-head efficient attention, `(b, n, dim) -> (b, n, dim)`. Not causal (the key softmax
    runs over every position)."""

    def __init__(self, dim: int, *, heads: int = 8, dim_head: int | None = None,
                 causal: bool = False, normalization: str = "softmax"):
        refuse_causal(type(self).__name__, causal)
        super().__init__(dim, heads=heads, dim_head=dim_head, causal=False)
        self.normalization = one_of(normalization, NORMALIZATIONS, "normalization")

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        return efficient_attention(q, k, v, mask, normalization=self.normalization)


class EfficientAttention2d(nn.Module):
    """Drop-in for the authors' `EfficientAttention` image module. `(b, c, y, x) -> same`.

    Args (positional, in the original's order):
        in_channels: channels of the input and output.
        key_channels: total key/query channels over all heads.
        head_count: number of heads.
        value_channels: total value channels; must be divisible by `head_count`.

    The output is `x + reprojection(attention)`, with softmax normalisation and no scale factor,
    as in the original.
    """

    def __init__(self, in_channels: int, key_channels: int, head_count: int, value_channels: int):
        super().__init__()
        for value, label in ((in_channels, "in_channels"), (key_channels, "key_channels"),
                             (head_count, "head_count"), (value_channels, "value_channels")):
            positive_int(value, label)
        if value_channels % head_count:
            raise ValueError(f"value_channels={value_channels} must be divisible by "
                             f"head_count={head_count}")
        if key_channels < head_count:
            raise ValueError(f"key_channels={key_channels} must be at least "
                             f"head_count={head_count}")
        self.in_channels, self.key_channels = in_channels, key_channels
        self.head_count, self.value_channels = head_count, value_channels
        # Registration order is the original's state_dict order.
        self.keys = nn.Conv2d(in_channels, key_channels, 1)
        self.queries = nn.Conv2d(in_channels, key_channels, 1)
        self.values = nn.Conv2d(in_channels, value_channels, 1)
        self.reprojection = nn.Conv2d(value_channels, in_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image(x, self.in_channels, name=type(self).__name__, layer=self)
        h = self.head_count
        used = (self.key_channels // h) * h  # the original drops the remainder channels

        def heads(t):
            return rearrange(t[:, :used] if t.shape[1] != used else t,
                             "b (h d) y x -> b h (y x) d", h=h)

        k, q = heads(self.keys(x)), heads(self.queries(x))
        v = rearrange(self.values(x), "b (h e) y x -> b h (y x) e", h=h)
        out = efficient_attention(q, k, v)
        out = rearrange(out, "b h (y x) e -> b (h e) y x", y=x.shape[2])
        return self.reprojection(out) + x
