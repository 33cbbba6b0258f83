r"""Real-time Semantic Segmentation with Fast Attention.

Drop the softmax of non-local attention and compare pixels by cosine similarity instead: queries
and keys are l2-normalised over channels, and the affinities are averaged over the n = y x pixels.
With no softmax in the way, the product reassociates: keys and values first fold into one small
`(d, e)` matrix that every query reads, so cost grows linearly with the number of pixels rather
than quadratically.

$$ Y = \tfrac{1}{n}\, \tilde Q \big(\tilde K^\top V\big), \qquad
   \tilde Q_i = \frac{Q_i}{\lVert Q_i \rVert_2},\ \tilde K_j = \frac{K_j}{\lVert K_j \rVert_2},
   \qquad Z = X + W_o Y $$

Deviations from the paper: $Q$, $K$, $V$ and $W_o$ are plain 1x1 convolutions with no
normalisation layers, and the block is residual ($Z = X + W_o Y$) like the non-local block it
replaces; the rest of FANet (spatial reduction, multi-level feature fusion) is not part of the
entry.
"""

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from torch import nn

from zoo.core.checks import check_image, check_qkv, positive_int
from zoo.core.masks import zero_padded


def fast_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """Cosine-similarity attention, reassociated.

    Args:
        q, k: `(b, h, n, d)`. v: `(b, h, n, e)`. mask: `(b, n)`, True = real position; padded
            keys are left out and n counts only the real ones.

    Returns:
        `(b, h, n, e)`.
    """
    check_qkv(q, k, v, mask, name="fast_attention")
    q, k = F.normalize(q, dim=-1), zero_padded(F.normalize(k, dim=-1), mask)
    n = k.shape[2] if mask is None else rearrange(mask.sum(-1).clamp(min=1).to(q.dtype),
                                                  "b -> b 1 1 1")
    # keys and values fold first: (K^T V) costs n d e, never an n x n map
    context = einsum(k, v, "b h n d, b h n e -> b h d e")
    return einsum(q, context, "b h n d, b h d e -> b h n e") / n


class FastAttention(nn.Module):
    """The fast attention block. `(b, dim, y, x) -> (b, dim, y, x)`.

    Args:
        dim: input channels.
        inner_dim: channels of the queries, keys and values; None means `max(dim // 2, 1)`.
    """

    def __init__(self, dim: int, *, inner_dim: int | None = None):
        super().__init__()
        self.dim = positive_int(dim, "dim")
        self.inner_dim = positive_int(max(dim // 2, 1) if inner_dim is None else inner_dim, "inner_dim")
        self.to_q = nn.Conv2d(dim, self.inner_dim, 1)
        self.to_k = nn.Conv2d(dim, self.inner_dim, 1)
        self.to_v = nn.Conv2d(dim, self.inner_dim, 1)
        self.to_out = nn.Conv2d(self.inner_dim, dim, 1)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        return fast_attention(q, k, v, mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image(x, self.dim, name=type(self).__name__, layer=self)

        def flat(t):
            return rearrange(t, "b c y x -> b 1 (y x) c")

        out = self.attend(flat(self.to_q(x)), flat(self.to_k(x)), flat(self.to_v(x)))
        out = rearrange(out, "b 1 (y x) c -> b c y x", y=x.shape[2])
        return x + self.to_out(out)
