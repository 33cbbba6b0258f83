r"""Time-aware Large Kernel Convolutions.

Replace attention by a sum over a window whose size each token chooses: from its own
representation a token predicts how far its window reaches to the left and to the right, as
fractions of the largest allowed reach, and the output is the sum of the values inside. The sum
over any window is a difference of two entries of a summed-area table (prefix sums), so every
window costs the same no matter how large, and the layer is linear in the length. Fractional window
ends interpolate linearly between neighbouring table entries, which keeps the offsets
differentiable. Each head (a group of channels) has its own windows.

$$ \alpha^{l}_i, \alpha^{r}_i = \sigma(W v_i + b), \quad
   a^l_i = \max(i - \alpha^l_i\, l_{\max}, 0), \quad a^r_i = \min(i + \alpha^r_i\, r_{\max}, n - 1),
   \quad o_i = \frac{F(a^r_i + 1) - F(a^l_i)}{l_{\max} + r_{\max} + 1} $$

where $F(a) = S_{\lfloor a \rfloor} + (a - \lfloor a \rfloor)\, v_{\lfloor a \rfloor}$ interpolates
the table $S_j = \sum_{t < j} v_t$. With `causal=True` there is no right offset ($a^r_i = i$), as in
the paper's decoder.

Deviations from the paper: the input projection is a plain linear map (the authors' layer can add a
GLU after it); no dropout on the offsets (a training regulariser).
"""

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from zoo.core.checks import check_sequence, positive_int
from zoo.core.masks import zero_padded, zero_padded_tokens
from zoo.core.shell import MultiHead


def talk_convolution(v: torch.Tensor, left: torch.Tensor, right: torch.Tensor | None = None,
                     mask: torch.Tensor | None = None, *, max_left: int,
                     max_right: int) -> torch.Tensor:
    """Sums over adaptive windows from a summed-area table.

    Args:
        v: `(b, h, n, e)`. left, right: `(b, h, n)` relative offsets in [0, 1]; `right=None` is
            the causal form (each window ends at its token).
        mask: `(b, n)`, True = real token; padded values count as zero.
        max_left, max_right: the largest reach in tokens (l_max, r_max).

    Returns:
        `(b, h, n, e)`, each window's sum divided by `max_left + max_right + 1`.
    """
    n = v.shape[2]
    # the summed-area table S_j = sum_{t < j} v_t, positions last for a fast cumsum
    table = rearrange(F.pad(zero_padded(v, mask), (0, 0, 1, 0)), "b h j e -> b h e j").cumsum(-1)
    table = rearrange(table, "b h e j -> b h j e")  # (b h n+1 e)

    def at(a):  # F(a): the table at a real index in [0, n], interpolated linearly
        base = a.detach().floor().long()
        frac = (a - base).unsqueeze(-1)
        rows = [table.gather(2, i.clamp(max=n).unsqueeze(-1).expand(-1, -1, -1, v.shape[-1]))
                for i in (base, base + 1)]
        return rows[0] + frac * (rows[1] - rows[0])

    pos = torch.arange(n, device=v.device, dtype=v.dtype)
    lower = at((pos - left * max_left).clamp(min=0))
    upper = table[:, :, 1:] if right is None else at((pos + right * max_right).clamp(max=n - 1) + 1)
    return (upper - lower) / (max_left + max_right + 1)


class TaLKConvolution(MultiHead):
    """TaLK convolution layer. `(b, n, dim) -> (b, n, dim)`.

    Args:
        heads: groups of channels with their own windows.
        max_left, max_right: the largest reach to the left and to the right, in tokens (the
            right one is unused when causal).
    """

    def __init__(self, dim: int, *, heads: int = 8, dim_head: int | None = None,
                 max_left: int = 15, max_right: int = 15, causal: bool = False):
        super().__init__(dim, heads=heads, dim_head=dim_head, causal=causal)
        self.max_left, self.max_right = positive_int(max_left, "max_left"), positive_int(
            max_right, "max_right")
        inner = self.heads * self.dim_head
        # no queries or keys: one value projection, and offsets predicted from the values
        del self.to_qkv
        self.to_v = nn.Linear(dim, inner)
        self.to_offsets = nn.Linear(inner, self.heads * (1 if causal else 2))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        check_sequence(x, self.dim, mask, name=type(self).__name__, layer=self)
        x = zero_padded_tokens(x, mask)
        v = self.to_v(x)
        offsets = rearrange(self.to_offsets(v).sigmoid(), "b n (s h) -> s b h n", h=self.heads)
        right = None if self.causal else offsets[1]
        out = talk_convolution(self.split_heads(v), offsets[0], right, mask,
                               max_left=self.max_left, max_right=self.max_right)
        return self.to_out(self.merge_heads(out))
