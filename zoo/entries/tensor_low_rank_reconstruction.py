r"""Tensor Low-Rank Reconstruction for Semantic Segmentation.

Instead of an (H W) x (H W) attention map, build a C x H x W attention tensor of low CP rank.
The tensor generation module (TGM) makes r rank-1 pieces: for each piece, a channel vector from
the globally pooled channels, a height vector from the features averaged over channels and width,
and a width vector likewise, each through a linear map and a sigmoid. The tensor reconstruction
module (TRM) sums their outer products with learned weights and multiplies the result into the
features. Every step is linear in the number of pixels.

$$ v^i_c = \sigma\big(W^i_c\, \bar x_c + b^i_c\big),\quad
   v^i_h = \sigma\big(W^i_h\, \bar x_h + b^i_h\big),\quad
   v^i_w = \sigma\big(W^i_w\, \bar x_w + b^i_w\big) $$
$$ A = \sum_{i=1}^{r} \lambda_i\, v^i_c \otimes v^i_h \otimes v^i_w, \qquad Y = A \odot X $$

with $\bar x_c, \bar x_h, \bar x_w$ the averages of X over (H, W), (C, W) and (C, H).

Deviations from the paper:
- the height and width maps $W_h, W_w$ act across positions, so their size is tied to the image
  size; they are stored for `max_size` positions and an image of height H uses their top-left
  H x H block (as Linformer truncates its projection), with a clear error past `max_size`;
- the BatchNorms after the generators' convolutions are replaced by biases (batch independence);
- the network around the module (concatenating Y with X and a pooled global feature) is not part
  of the layer: it returns Y.
"""

import torch
from einops import einsum, rearrange, reduce
from torch import nn

from zoo.core.checks import check_image, positive_int


class TensorLowRankReconstruction(nn.Module):
    """TGM + TRM. `(b, dim, y, x) -> (b, dim, y, x)`.

    Args:
        dim: channels.
        rank: number r of rank-1 tensors.
        max_size: largest height and width the position generators take.
    """

    def __init__(self, dim: int, *, rank: int = 64, max_size: int = 64):
        super().__init__()
        self.dim, self.rank = positive_int(dim, "dim"), positive_int(rank, "rank")
        self.max_size = positive_int(max_size, "max_size")
        self.to_c = nn.Linear(dim, rank * dim)  # W_c, b_c for all i
        bound = max_size ** -0.5  # nn.Linear's default range for max_size inputs
        self.w_h = nn.Parameter(torch.empty(rank, max_size, max_size).uniform_(-bound, bound))
        self.b_h = nn.Parameter(torch.empty(rank, max_size).uniform_(-bound, bound))
        self.w_w = nn.Parameter(torch.empty(rank, max_size, max_size).uniform_(-bound, bound))
        self.b_w = nn.Parameter(torch.empty(rank, max_size).uniform_(-bound, bound))
        self.lam = nn.Parameter(torch.full((rank,), 1.0 / rank))

    def generate(self, x: torch.Tensor):
        """TGM: `(v_c (b, r, c), v_h (b, r, y), v_w (b, r, x))`."""
        hh, ww = x.shape[2:]
        if max(hh, ww) > self.max_size:
            raise ValueError(f"{type(self).__name__}: image of {hh} x {ww} exceeds "
                             f"max_size={self.max_size}; build the layer with a larger max_size")
        v_c = rearrange(self.to_c(reduce(x, "b c y x -> b c", "mean")), "b (r c) -> b r c",
                        r=self.rank)
        mean_h, mean_w = reduce(x, "b c y x -> b y", "mean"), reduce(x, "b c y x -> b x", "mean")
        v_h = einsum(self.w_h[:, :hh, :hh], mean_h, "r y z, b z -> b r y")
        v_w = einsum(self.w_w[:, :ww, :ww], mean_w, "r x z, b z -> b r x")
        return (torch.sigmoid(v_c), torch.sigmoid(v_h + self.b_h[:, :hh]),
                torch.sigmoid(v_w + self.b_w[:, :ww]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image(x, self.dim, name=type(self).__name__, layer=self)
        v_c, v_h, v_w = self.generate(x)
        ch = einsum(self.lam, v_c, v_h, "r, b r c, b r y -> b r c y")
        attn = einsum(ch, v_w, "b r c y, b r x -> b c y x")  # TRM: A
        return attn * x
