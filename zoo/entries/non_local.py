r"""Non-local Neural Networks.

Every pixel attends to every other pixel: embedded-Gaussian affinities between 1x1-convolved
features, normalised by a softmax, pool a third embedding, and a 1x1 convolution maps the result
back and adds it to the input. The image baseline that efficient attention replaces; quadratic in
the number of pixels n = y x.

$$ z_i = x_i + W_z \sum_j \operatorname{softmax}_j\!\big(\theta(x_i)^\top \phi(x_j)\big)\, g(x_j) $$

Deviations from the paper: only the embedded-Gaussian pairwise function; no sub-sampling of
$\phi$ and $g$; $W_z$ is a plain 1x1 convolution without the paper's BatchNorm (whose zero-initialised
scale makes the block start as the identity), so the reference is independent across the batch.
"""

import torch
from einops import rearrange
from torch import nn

from zoo.core.checks import check_image, positive_int
from zoo.core.softmax import softmax_attention


class NonLocal(nn.Module):
    """Embedded-Gaussian non-local block. `(b, dim, y, x) -> (b, dim, y, x)`.

    Args:
        dim: input channels.
        inner_dim: channels of theta, phi and g; None means `max(dim // 2, 1)`, as in the paper.
    """

    def __init__(self, dim: int, *, inner_dim: int | None = None):
        super().__init__()
        self.dim = positive_int(dim, "dim")
        self.inner_dim = positive_int(max(dim // 2, 1) if inner_dim is None else inner_dim, "inner_dim")
        self.theta = nn.Conv2d(dim, self.inner_dim, 1)
        self.phi = nn.Conv2d(dim, self.inner_dim, 1)
        self.g = nn.Conv2d(dim, self.inner_dim, 1)
        self.w_z = nn.Conv2d(self.inner_dim, dim, 1)
        self.scale = 1.0  # the embedded-Gaussian map uses raw dot products

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        """The embedded-Gaussian map: softmax of raw dot products (no 1/sqrt(d) scale)."""
        return softmax_attention(q, k, v, mask, scale=self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image(x, self.dim, name=type(self).__name__, layer=self)

        def flat(t):
            return rearrange(t, "b c y x -> b 1 (y x) c")

        out = self.attend(flat(self.theta(x)), flat(self.phi(x)), flat(self.g(x)))
        out = rearrange(out, "b 1 (y x) c -> b c y x", y=x.shape[2])
        return x + self.w_z(out)
