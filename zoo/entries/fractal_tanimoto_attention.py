r"""Looking for change? Roll the Dice and demand Attention.

FracTAL replaces the dot product of attention by the fractal Tanimoto similarity, a bounded
similarity of two vectors that grows sharper with its depth d: the average over d levels of
$p \cdot l / (2^i (p \cdot p + l \cdot l) - (2^{i+1} - 1)\, p \cdot l)$, which is 1 for equal
vectors. Queries, keys and values are sigmoids of convolutions, in (0, 1). Two similarities are
taken, each with its complement (the same measure on $1 - p$ and $1 - l$): over the channels of
each pixel, a spatial map; over the pixels of each channel, a channel map. Both weight the
values, and the result modulates the input: $x \odot (1 + \gamma A)$ with $\gamma$ learned from
zero, so the layer starts as the identity. There is no pixel-by-pixel map: linear in the pixels.

$$ \mathcal{T}^d(p, l) = \frac{1}{d} \sum_{i=0}^{d-1}
   \frac{p \cdot l}{2^i (p \cdot p + l \cdot l) - (2^{i+1} - 1)\, p \cdot l}, \qquad
   \tilde{\mathcal{T}}^d(p, l) = \tfrac12\big(\mathcal{T}^d(p, l) + \mathcal{T}^d(1 - p, 1 - l)\big) $$
$$ A = \tfrac12\big(\tilde{\mathcal{T}}^d_{\text{channels}}(Q, K) \odot V
   + \tilde{\mathcal{T}}^d_{\text{pixels}}(Q, K) \odot V\big), \qquad
   z = x \odot (1 + \gamma A) $$

Deviations from the paper:
- the convolutions producing Q, K, V have no normalisation layer, and the BatchNorm after A is
  left out (batch independence);
- the layer is the FracTAL ResNet unit's fusion around the attention without the unit's
  convolutional residual branch: $x \odot (1 + \gamma A)$ instead of
  $(x + F(x)) \odot (1 + \gamma A)$;
- a smoothing constant (`smooth`, as in the authors' code) is added to each numerator and
  denominator, so saturated sigmoids (where $1 - p$ is exactly 0) stay finite; `smooth=0` is the
  definition.
"""

import torch
import torch.nn.functional as F
from torch import nn

from zoo.core.checks import check_image, nonnegative_float, positive_int


def fractal_tanimoto(p: torch.Tensor, l: torch.Tensor, *, depth: int = 5, dim=-1,
                     smooth: float = 0.0) -> torch.Tensor:
    """The fractal Tanimoto similarity of depth d, reducing over `dim` (kept, size 1)."""
    pl, pp, ll = ((a * b).sum(dim=dim, keepdim=True) for a, b in ((p, l), (p, p), (l, l)))
    return tanimoto_of_sums(pl, pp, ll, depth=depth, smooth=smooth)


def tanimoto_of_sums(pl: torch.Tensor, pp: torch.Tensor, ll: torch.Tensor, *, depth: int,
                     smooth: float) -> torch.Tensor:
    """The similarity from the three dot products `p.l`, `p.p`, `l.l`."""
    inverse = sum(1 / (2 ** i * (pp + ll) - (2 ** (i + 1) - 1) * pl + smooth)
                  for i in range(positive_int(depth, "depth")))
    return (pl + smooth) * inverse / depth


def fractal_tanimoto_complement(p: torch.Tensor, l: torch.Tensor, *, depth: int = 5, dim=-1,
                                smooth: float = 0.0) -> torch.Tensor:
    """The similarity with its complement: the mean of T(p, l) and T(1 - p, 1 - l)."""
    return 0.5 * (fractal_tanimoto(p, l, depth=depth, dim=dim, smooth=smooth)
                  + fractal_tanimoto(1 - p, 1 - l, depth=depth, dim=dim, smooth=smooth))


def spatial_and_channel(q: torch.Tensor, k: torch.Tensor, *, depth: int, smooth: float):
    """`fractal_tanimoto_complement` over the channels `(b, 1, y, x)` and over the pixels
    `(b, c, 1, 1)` of q, k `(b, c, y, x)`: each elementwise product is formed once and summed both
    ways."""
    spatial = channel = 0.0
    for p, l in ((q, k), (1 - q, 1 - k)):
        products = [a * b for a, b in ((p, l), (p, p), (l, l))]  # (b c y x) each
        spatial = spatial + tanimoto_of_sums(*(t.sum(1, keepdim=True) for t in products),
                                             depth=depth, smooth=smooth)
        channel = channel + tanimoto_of_sums(*(t.sum((2, 3), keepdim=True) for t in products),
                                             depth=depth, smooth=smooth)
    return 0.5 * spatial, 0.5 * channel


class FractalTanimotoAttention(nn.Module):
    """FracTAL. `(b, dim, y, x) -> (b, dim, y, x)`.

    Args:
        dim: channels.
        depth: depth d of the fractal Tanimoto similarity (the paper's 5).
        kernel_size: side of the convolutions producing Q, K, V (odd; the paper's 3).
        smooth: added to numerators and denominators of the similarity.
    """

    def __init__(self, dim: int, *, depth: int = 5, kernel_size: int = 3, smooth: float = 1e-5):
        super().__init__()
        self.dim, self.depth = positive_int(dim, "dim"), positive_int(depth, "depth")
        if positive_int(kernel_size, "kernel_size") % 2 == 0:
            raise ValueError(f"kernel_size must be odd (same-size output), got {kernel_size}")
        self.smooth = nonnegative_float(smooth, "smooth")
        self.to_q, self.to_k, self.to_v = (nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2)
                                           for _ in range(3))
        self.gamma = nn.Parameter(torch.zeros(1))

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """A `(b, dim, y, x)`."""
        convs = (self.to_q, self.to_k, self.to_v)  # run as one convolution with stacked weights
        qkv = F.conv2d(x, torch.cat([c.weight for c in convs]), torch.cat([c.bias for c in convs]),
                       padding=self.to_q.padding)
        q, k, v = qkv.sigmoid_().chunk(3, dim=1)
        spatial, channel = spatial_and_channel(q, k, depth=self.depth, smooth=self.smooth)
        return (spatial + channel).mul_(0.5).mul_(v)  # (b 1 y x) + (b c 1 1): (b c y x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image(x, self.dim, name=type(self).__name__, layer=self)
        return torch.addcmul(x, self.gamma * self.attention(x), x)  # x (1 + gamma A)
