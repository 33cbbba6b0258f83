r"""Interlaced Sparse Self-Attention for Semantic Segmentation.

Factorise the dense affinity between all pixels into two sparse ones. Split the image into blocks
of $P_y \times P_x$ pixels. The long-range step attends among the pixels that sit at the same
offset in every block (an interlaced, strided grid spanning the image); the short-range step then
attends within each block. After both steps every pixel has information from every other one,
and with $P_y P_x \approx \sqrt{N}$ each step costs $O(N\sqrt{N})$ instead of $O(N^2)$.

$$ Z = \mathrm{SA}_{\text{short}}\big(\mathrm{SA}_{\text{long}}(X)\big),\quad
   \mathrm{SA}(X) = W_o \operatorname{softmax}\!\big(\theta(X)\,\phi(X)^\top/\sqrt{d}\big)\, g(X)
   \ \text{within each group} $$

Deviations from the paper:
- each step is a plain single-head self-attention with linear (1x1) $\theta, \phi, g, W_o$: no
  BatchNorm/ReLU in the embeddings, and no concatenation with the input and fusion convolution
  after the module (segmentation-head details);
- `block=None` picks $P = \lceil\sqrt{\text{side}}\rceil$ per axis at each call, the paper's
  optimum $P_y P_x \approx \sqrt{N}$; sides that are not a multiple of the block are zero-padded and
  the padding is masked out of both steps.
"""

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from zoo.core.checks import check_image, positive_int
from zoo.core.softmax import softmax_attention


class GroupAttention(nn.Module):
    """Single-head self-attention within groups: `(g, t, dim)`, key mask `(g, t)` -> same."""

    def __init__(self, dim: int, inner_dim: int):
        super().__init__()
        self.to_qkv = nn.Linear(dim, 3 * inner_dim, bias=False)  # theta, phi, g
        self.to_out = nn.Linear(inner_dim, dim)  # W_o

    def forward(self, x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        q, k, v = (rearrange(t, "g t d -> g 1 t d") for t in self.to_qkv(x).chunk(3, dim=-1))
        return self.to_out(rearrange(softmax_attention(q, k, v, real), "g 1 t e -> g t e"))


def block_sizes(y: int, x: int, block: int | None) -> tuple[int, int]:
    """`(P_y, P_x)`: `block` (at most the side) or `ceil(sqrt(side))` per axis."""
    return tuple(min(block, s) if block else math.ceil(math.sqrt(s)) for s in (y, x))


class InterlacedSparseAttention(nn.Module):
    """Interlaced sparse self-attention. `(b, dim, y, x) -> (b, dim, y, x)`.

    Args:
        dim: input channels.
        inner_dim: channels of theta, phi and g; None means `max(dim // 2, 1)`.
        block: block side `P` for both axes; None means `ceil(sqrt(side))` per axis at each call.
    """

    def __init__(self, dim: int, *, inner_dim: int | None = None, block: int | None = None):
        super().__init__()
        self.dim = positive_int(dim, "dim")
        self.inner_dim = positive_int(max(dim // 2, 1) if inner_dim is None else inner_dim, "inner_dim")
        self.block = None if block is None else positive_int(block, "block")
        self.long_range = GroupAttention(dim, self.inner_dim)
        self.short_range = GroupAttention(dim, self.inner_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image(x, self.dim, name=type(self).__name__, layer=self)
        b, _, y, w = x.shape
        py, px = block_sizes(y, w, self.block)
        pad = (0, (-w) % px, 0, (-y) % py)
        x = F.pad(x, pad)
        real = F.pad(x.new_ones(b, 1, y, w, dtype=torch.bool), pad, value=False)
        qy, qx = x.shape[2] // py, x.shape[3] // px
        sizes = dict(py=py, px=px, qy=qy, qx=qx)
        # long range: the pixels at one offset (py, px) in every block form a group
        long_groups = "b c (qy py) (qx px) -> (b py px) (qy qx) c"
        t = self.long_range(rearrange(x, long_groups, **sizes),
                            rearrange(real, long_groups, **sizes)[..., 0])
        # short range: the pixels of one block (qy, qx) form a group
        t = rearrange(t, "(b py px) (qy qx) c -> (b qy qx) (py px) c", b=b, **sizes)
        short_groups = "b c (qy py) (qx px) -> (b qy qx) (py px) c"
        t = self.short_range(t, rearrange(real, short_groups, **sizes)[..., 0])
        out = rearrange(t, "(b qy qx) (py px) c -> b c (qy py) (qx px)", b=b, **sizes)
        return out[:, :, :y, :w]
