r"""CCNet: Criss-Cross Attention for Semantic Segmentation.

Each pixel attends only to the pixels on its own row and its own column, the criss-cross path:
$H + W - 1$ keys instead of $H W$, so the map costs $N (H + W)$, about $N^{1.5}$ for a square
image. One pass reaches the cross; applying the same module again (the recurrent module, RCCA,
with shared weights) lets every pixel reach every other through the crossing points, so $R = 2$
passes give full-image context.

$$ H'_u = H_u + \sum_{i \in \Omega_u} \operatorname{softmax}_i\big(Q_u^\top K_i\big)\, V_i,
   \qquad \Omega_u = \{\text{pixels in the row or column of } u\} $$

applied $R$ times with the same weights.

Deviations from the paper: none in the formula. The authors' code scales the aggregated term by a
learnable scalar initialised to zero (the module starts as the identity); it is left out, as the
paper's equation has none.
"""

import torch
from einops import einsum
from torch import nn

from zoo.core.checks import check_image, positive_int
from zoo.core.masks import neg_fill


def criss_cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One criss-cross pass on image-shaped tensors.

    Args:
        q, k: `(b, d, y, x)`. v: `(b, e, y, x)`.

    Returns:
        `(b, e, y, x)`: each pixel's softmax-weighted sum of the values on its row and column
        (the pixel itself counted once).
    """
    hh, ww = q.shape[-2:]
    col = einsum(q, k, "b d y x, b d z x -> b y x z")  # key z in the same column, eq. (1)
    row = einsum(q, k, "b d y x, b d y w -> b y x w")  # key w in the same row
    # the pixel itself is on both; keep it in the column part only
    row = row.masked_fill(torch.eye(ww, dtype=torch.bool, device=q.device), neg_fill(row.dtype))
    attn = torch.cat([col, row], dim=-1).softmax(dim=-1)  # (b y x (z + w))
    a_col, a_row = attn.split([hh, ww], dim=-1)
    return (einsum(a_col, v, "b y x z, b e z x -> b e y x")  # eq. (2)
            + einsum(a_row, v, "b y x w, b e y w -> b e y x"))


class CrissCrossAttention(nn.Module):
    """Recurrent criss-cross attention (RCCA). `(b, dim, y, x) -> (b, dim, y, x)`.

    Args:
        dim: channels.
        reduction: queries and keys have `max(dim // reduction, 1)` channels (the paper's 8).
        recurrence: passes R through the same module (the paper's 2).
    """

    def __init__(self, dim: int, *, reduction: int = 8, recurrence: int = 2):
        super().__init__()
        self.dim = positive_int(dim, "dim")
        positive_int(reduction, "reduction")
        self.recurrence = positive_int(recurrence, "recurrence")
        inner = max(dim // reduction, 1)
        self.to_q = nn.Conv2d(dim, inner, 1)
        self.to_k = nn.Conv2d(dim, inner, 1)
        self.to_v = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image(x, self.dim, name=type(self).__name__, layer=self)
        for _ in range(self.recurrence):
            x = x + criss_cross_attention(self.to_q(x), self.to_k(x), self.to_v(x))
        return x
