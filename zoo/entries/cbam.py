r"""CBAM: Convolutional Block Attention Module.

Two gates in a row, each a sigmoid map multiplied into the features. The channel gate squeezes
every channel to two numbers (its average and its maximum over the image), passes both through
one shared bottleneck MLP and adds the results: a weight per channel. The spatial gate then
squeezes every pixel to two numbers (average and maximum over the channels) and convolves that
two-channel map with a k x k filter: a weight per pixel. Both are linear in the number of
pixels; no pixel is compared with another except through the convolution's neighbourhood.

$$ F' = \sigma\big(W_1\,\mathrm{relu}(W_0 F^c_{avg}) + W_1\,\mathrm{relu}(W_0 F^c_{max})\big) \odot F,
   \qquad
   F'' = \sigma\big(f^{k \times k}([F'^s_{avg}; F'^s_{max}])\big) \odot F' $$

Deviations from the paper:
- the MLP layers and the convolution carry biases (the paper's equations show weights only); the
  authors' code puts a BatchNorm after the convolution, left out here so the layer is independent
  across the batch (the convolution's bias takes the place of its shift).
"""

import torch
from einops import reduce
from torch import nn

from zoo.core.checks import check_image, positive_int


class CBAM(nn.Module):
    """Channel gate, then spatial gate. `(b, dim, y, x) -> (b, dim, y, x)`.

    Args:
        dim: channels.
        reduction: the MLP's bottleneck is `max(dim // reduction, 1)` wide (the paper's r).
        kernel_size: side of the spatial gate's convolution (odd; the paper's 7).
    """

    def __init__(self, dim: int, *, reduction: int = 16, kernel_size: int = 7):
        super().__init__()
        self.dim = positive_int(dim, "dim")
        positive_int(reduction, "reduction")
        if positive_int(kernel_size, "kernel_size") % 2 == 0:
            raise ValueError(f"kernel_size must be odd (same-size output), got {kernel_size}")
        hidden = max(dim // reduction, 1)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))  # W0, W1
        self.spatial = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2)  # f^{k x k}

    def channel_gate(self, x: torch.Tensor) -> torch.Tensor:
        """M_c `(b, dim, 1, 1)`, eq. (2)."""
        avg, peak = reduce(x, "b c y x -> b c", "mean"), reduce(x, "b c y x -> b c", "max")
        return torch.sigmoid(self.mlp(avg) + self.mlp(peak))[..., None, None]

    def spatial_gate(self, x: torch.Tensor) -> torch.Tensor:
        """M_s `(b, 1, y, x)`, eq. (3)."""
        pooled = torch.cat([reduce(x, "b c y x -> b 1 y x", "mean"),
                            reduce(x, "b c y x -> b 1 y x", "max")], dim=1)
        return torch.sigmoid(self.spatial(pooled))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image(x, self.dim, name=type(self).__name__, layer=self)
        x = self.channel_gate(x) * x  # eq. (1): F'
        return self.spatial_gate(x) * x  # F''
