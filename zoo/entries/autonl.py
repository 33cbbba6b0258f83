r"""Neural Architecture Search for Lightweight Non-Local Networks.

The lightweight non-local (LightNL) block that the AutoNL search places in a mobile network. It
strips the non-local block down: no query, key or value transformations (the input itself plays
all three roles), a 3x3 depthwise convolution in place of the output transformation, and affinities
computed from compact features: only a fraction of the channels on one side, and a spatially
strided grid of positions on the other. Without a softmax the product reassociates, so the cost is
linear in the number of pixels.

$$ y = \tfrac{1}{n}\, x_c \big(x_{sc}^\top x_s\big), \qquad z = x + \operatorname{DWConv}_{3\times3}(y) $$

where $x_c$ keeps the first `channel_ratio` of the channels, $x_s$ every `stride`-th row and
column, $x_{sc}$ both, and $n$ is the number of pixels of $x$.

Deviations from the paper: no BatchNorm after the depthwise convolution (its zero-initialised
scale makes the block start as the identity; left out so the reference is independent across the
batch, as for the non-local entry); the product is always taken in the linear order, where the
authors' code picks whichever order costs fewer operations for the feature-map size at hand (the
same result); the architecture search itself is not part of the entry.
"""

import torch
from einops import einsum
from torch import nn

from zoo.core.checks import check_image, positive_int


def light_non_local(x: torch.Tensor, *, channel_ratio: float, stride: int) -> torch.Tensor:
    """The LightNL aggregation on compact features.

    Args:
        x: `(b, c, y, x)`.
        channel_ratio: fraction of the channels (the first ones) the affinities are computed on.
        stride: spatial sampling step of the positions the affinities reach.

    Returns:
        `(b, c, y, x)`.
    """
    n = x.shape[2] * x.shape[3]
    used = max(int(channel_ratio * x.shape[1]), 1)
    x_s = x[:, :, ::stride, ::stride]  # spatially compact
    x_c, x_sc = x[:, :used], x_s[:, :used]  # channel-compact; both
    context = einsum(x_sc, x_s, "b d y x, b c y x -> b d c") / n  # x_sc^T x_s / n, (used, c)
    return einsum(x_c, context, "b d y x, b d c -> b c y x")


class AutoNL(nn.Module):
    """The LightNL block. `(b, dim, y, x) -> (b, dim, y, x)`.

    Args:
        dim: input channels.
        channel_ratio: fraction of channels used for the affinities, in (0, 1].
        stride: spatial sampling step for the affinities.
    """

    def __init__(self, dim: int, *, channel_ratio: float = 0.25, stride: int = 2):
        super().__init__()
        self.dim = positive_int(dim, "dim")
        if not isinstance(channel_ratio, (int, float)) or not 0 < channel_ratio <= 1:
            raise ValueError(f"channel_ratio must be in (0, 1], got {channel_ratio!r}")
        self.channel_ratio, self.stride = float(channel_ratio), positive_int(stride, "stride")
        self.depthwise = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image(x, self.dim, name=type(self).__name__, layer=self)
        y = light_non_local(x, channel_ratio=self.channel_ratio, stride=self.stride)
        return x + self.depthwise(y)
