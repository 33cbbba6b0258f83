r"""Input-independent Attention Weights Are Expressive Enough: A Study of Attention in Self-supervised Audio Transformers.

The paper finds that the attention maps of self-supervised audio transformers fall into a few
recurring cases, from a frame attending to itself (diagonal) to broad averaging (global), and that
fixed maps chosen from those cases, the same for every input, work as well as computed ones while
skipping the query-key products. This reference fixes one family spanning that range: head $h$
averages the values in a window of radius $r_h = \rho\, 2^h - 1$ around the query, so with
$\rho = 1$ head 0 is the diagonal case, and each further head is twice as broad, approaching the
global case. No queries or keys are computed; the map depends on positions only.

$$ O^h_i = \frac{1}{|W^h_i|} \sum_{j \in W^h_i} v^h_j, \qquad
   W^h_i = \{ j : |i - j| \le \rho\, 2^h - 1,\ j \text{ real} \} $$

Because the weights are box windows, each head is a sliding average (an average pool of width
$2 r_h + 1$): the layer is linear in the length, without any $n \times n$ map.

Deviations from the paper:
- The paper picks its fixed weights from the cases it observes in trained models; the box windows
  of doubling width are this reference's hand-crafted family for those cases.
- The paper's model is a bidirectional encoder, so there is no causal form.
"""
# ruff: noqa: E501 - the title on the docstring's first line is longer than a line; the rest is not.

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from zoo.core.checks import check_qkv, check_sequence, check_tensor, positive_int, refuse_causal
from zoo.core.masks import zero_padded_tokens
from zoo.core.shell import MultiHead


def head_radii(heads: int, radius: int = 1) -> list[int]:
    """The window radius of each head, `radius * 2^h - 1`: plain ints, from sizes alone (a tensor
    read back with `.tolist()` would break compiled and exported graphs)."""
    return [radius * 2 ** head - 1 for head in range(heads)]


def window_mean(t: torch.Tensor, r: int) -> torch.Tensor:
    """`(b, c, n)` means over the positions within `r` of each position that lie in the sequence."""
    return F.avg_pool1d(t, 2 * r + 1, stride=1, padding=r, count_include_pad=False)


def hand_crafted_attention(v: torch.Tensor, mask: torch.Tensor | None = None, *,
                           radius: int = 1) -> torch.Tensor:
    """Fixed box-window averages, one width per head; no queries or keys.

    Args:
        v: `(b, h, n, e)`. mask: `(b, n)`, True = real token; padding is left out of every window.
        radius: head h averages the tokens within `radius * 2^h - 1` of the query.

    Returns:
        `(b, h, n, e)`; a window with no real token gives 0.
    """
    check_tensor(v, "v")
    h, n = v.shape[1:3]
    weight = None if mask is None else rearrange(mask.to(v.dtype), "b n -> b 1 n")
    heads = []
    for head, r in enumerate(min(r, n - 1) for r in head_radii(h, radius)):
        x = rearrange(v[:, head], "b n e -> b e n")
        if weight is None:
            heads.append(window_mean(x, r))
        else:  # the mean over real tokens: mean of the masked values over the mean of the mask
            share = window_mean(weight, r)  # (b 1 n), 0 where the window holds no real token
            heads.append(window_mean(x * weight, r) / share.masked_fill(share == 0, 1))
    return rearrange(torch.stack(heads, dim=1), "b h e n -> b h n e")


class HandCraftedAttention(MultiHead):
    """Multi-head fixed-window attention. `(b, n, dim) -> (b, n, dim)`.

    Only values are projected (`to_v`): the weights depend on positions, not on the input.

    Args:
        radius: head h averages the tokens within `radius * 2^h - 1` of the query (head 0 with
            radius 1 is the token itself).
    """

    def __init__(self, dim: int, *, heads: int = 8, dim_head: int | None = None,
                 causal: bool = False, radius: int = 1):
        refuse_causal(type(self).__name__, causal)
        super().__init__(dim, heads=heads, dim_head=dim_head, causal=False)
        self.radius = positive_int(radius, "radius")
        del self.to_qkv  # no queries or keys
        self.to_v = nn.Linear(dim, heads * self.dim_head, bias=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        check_sequence(x, self.dim, mask, name=type(self).__name__, layer=self)
        x = zero_padded_tokens(x, mask)
        v = self.split_heads(self.to_v(x))
        return self.to_out(self.merge_heads(hand_crafted_attention(v, mask, radius=self.radius)))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        """q and k are ignored (the map is the same for every input), but their shapes must agree
        with v's, as for every other kernel entry."""
        check_qkv(q, k, v, mask, name=type(self).__name__)
        return hand_crafted_attention(v, mask, radius=self.radius)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, radius={self.radius}"
