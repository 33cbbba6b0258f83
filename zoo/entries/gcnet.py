r"""GCNet: Non-local Networks Meet Squeeze-Excitation Networks and Beyond.

The non-local block's attention maps turn out to be nearly the same for every query pixel, so the
global context block computes one: a 1x1 convolution scores every pixel, a softmax over the
pixels turns the scores into weights, and the weighted sum of the features is one context vector
per image. A bottleneck transform (1x1 convolution, LayerNorm, ReLU, 1x1 convolution), as in
squeeze-excitation, maps it to one vector that is added to every pixel. Linear in the pixels.

$$ z_i = x_i + W_{v2}\,\mathrm{relu}\Big(\mathrm{LN}\Big(W_{v1} \sum_j
   \frac{e^{W_k x_j}}{\sum_m e^{W_k x_m}}\, x_j\Big)\Big) $$

Deviations from the paper: only the paper's default block (attention pooling, addition fusion);
$W_k$ has no bias (a constant added to every score leaves the softmax unchanged); the authors'
zero initialisation of $W_{v2}$, which starts the block as the identity, is not copied; the
bottleneck is at least 2 wide.
"""

import torch
from einops import einsum, rearrange
from torch import nn

from zoo.core.checks import check_image, positive_int


def global_context(x: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Attention pooling: x `(b, c, y, x)`, scores `(b, 1, y, x)` -> context `(b, c)`."""
    weights = rearrange(scores, "b 1 y x -> b (y x)").softmax(dim=-1)  # alpha_j
    return einsum(weights, rearrange(x, "b c y x -> b (y x) c"), "b n, b n c -> b c")


class GCNet(nn.Module):
    """Global context block. `(b, dim, y, x) -> (b, dim, y, x)`.

    Args:
        dim: channels.
        reduction: the transform's bottleneck is `dim // reduction` wide (the paper's r), at least
            2: LayerNorm over a single channel would erase the context.
    """

    def __init__(self, dim: int, *, reduction: int = 16):
        super().__init__()
        self.dim = positive_int(dim, "dim")
        positive_int(reduction, "reduction")
        hidden = max(dim // reduction, 2)
        self.w_k = nn.Conv2d(dim, 1, 1, bias=False)
        self.transform = nn.Sequential(nn.Linear(dim, hidden), nn.LayerNorm(hidden), nn.ReLU(),
                                       nn.Linear(hidden, dim))  # W_v1, LN, relu, W_v2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image(x, self.dim, name=type(self).__name__, layer=self)
        context = global_context(x, self.w_k(x))  # (b c)
        return x + self.transform(context)[..., None, None]
