r"""Axial Attention in Multidimensional Transformers.

Lay the sequence out as a grid in raster order ($n = $ rows $\times$ width) and attend along one
axis at a time: first within each row, then within each column. Each step costs $O(n \cdot$ axis
length$)$, so with a square grid the layer costs $O(n\sqrt{n})$, yet after the two steps every
position has read every other one. Masked (causal) axial attention lets a row step see only
earlier columns and a column step only earlier rows, so the layer stays autoregressive in raster
order.

$$ Y = \mathrm{Attn}_{\text{column}}\big(\mathrm{Attn}_{\text{row}}(X)\big),\quad
   \mathrm{Attn}_{\text{axis}}(X)_i = W_o \sum_{j \in \text{axis}(i)}
   \operatorname{softmax}_j\!\big(Q_i K_j^\top/\sqrt{d}\big) V_j $$

Deviations from the paper:
- the layer is one row step followed by one column step, each with its own projections (the
  paper stacks such layers with residuals, layer norms and feed-forward blocks in between);
- with `causal=True` it is masked row then masked column attention, so position (r, c) reads
  rows <= r and columns <= c; the paper's shifts and inner/outer decoders, which give the rest
  of the raster context across layers, are architecture and left out;
- `width=None` picks $\lceil\sqrt{n}\rceil$ columns per call; a last row that is not full is
  padded and the padding masked.
"""

import math

import torch
from einops import einsum, rearrange
from torch import nn

from zoo.core.checks import check_qkv, check_sequence, one_of, positive_int
from zoo.core.masks import causal_mask, neg_fill, pad_mask, pad_to_multiple, zero_padded_tokens
from zoo.core.shell import MultiHead

AXES = {"row": "b h (r c) d -> b h r c d", "column": "b h (r c) d -> b h c r d"}


def axial_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    mask: torch.Tensor | None = None, *, width: int, axis: str = "row",
                    causal: bool = False) -> torch.Tensor:
    """Attention along one axis of the raster grid.

    Args:
        q, k: `(b, h, n, d)`. v: `(b, h, n, e)`, positions in raster order. mask: `(b, n)`.
        width: columns of the grid.
        axis: `"row"` (attend within a row) or `"column"` (within a column).
        causal: only earlier or equal positions along the axis.

    Returns:
        `(b, h, n, e)`.
    """
    check_qkv(q, k, v, mask, name="axial_attention")
    one_of(axis, tuple(AXES), "axis")
    b, _, n, d = q.shape
    (q, pad), (k, _), (v, _) = (pad_to_multiple(t, width) for t in (q, k, v))
    real = pad_mask(mask, b, n, pad, q.device)
    real = torch.ones(b, n, dtype=torch.bool, device=q.device) if real is None else real
    q, k, v = (rearrange(t, AXES[axis], c=width) for t in (q, k, v))  # (b h g t d), g lines
    real = rearrange(real[:, None, :, None], AXES[axis], c=width)[:, 0, ..., 0]  # (b g t)
    scores = einsum(q * d ** -0.5, k, "b h g i d, b h g j d -> b h g i j")
    if mask is not None or pad or causal:  # else every key is allowed: nothing to mask
        ok = rearrange(real, "b g j -> b 1 g 1 j")
        if causal:
            ok = ok & causal_mask(q.shape[3], q.shape[3], q.device)
        scores = scores.masked_fill(~ok, neg_fill(scores.dtype))
    attn = scores.softmax(dim=-1)
    out = einsum(attn, v, "b h g i j, b h g j e -> b h g i e")
    back = " -> ".join(reversed(AXES[axis].split(" -> ")))
    return rearrange(out, back.replace(" d", " e"), c=width)[:, :, :n]


class AxialAttention(MultiHead):
    """Row then column attention over a raster grid. `(b, n, dim) -> (b, n, dim)`.

    `to_qkv`/`to_out` serve the row step, `to_qkv_column`/`to_out_column` the column step.

    Args:
        width: columns of the grid; None means `ceil(sqrt(n))` at each call.
    """

    def __init__(self, dim: int, *, heads: int = 8, dim_head: int | None = None,
                 causal: bool = False, width: int | None = None):
        super().__init__(dim, heads=heads, dim_head=dim_head, causal=causal)
        self.width = None if width is None else positive_int(width, "width")
        self.to_qkv_column = nn.Linear(dim, 3 * heads * self.dim_head, bias=False)
        self.to_out_column = nn.Linear(heads * self.dim_head, dim)

    def step(self, x, mask, to_qkv, to_out, axis, width):
        q, k, v = map(self.split_heads, to_qkv(x).chunk(3, dim=-1))
        out = axial_attention(q, k, v, mask, width=width, axis=axis, causal=self.causal)
        return to_out(self.merge_heads(out))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        check_sequence(x, self.dim, mask, name=type(self).__name__, layer=self)
        x = zero_padded_tokens(x, mask)
        b, n, _ = x.shape
        width = self.width or math.ceil(math.sqrt(n))
        x = self.step(x, mask, self.to_qkv, self.to_out, "row", width)
        # The columns of the grid are the rows of its transpose: transposing x once (and the
        # output back) moves less memory than taking q, k, v and the output along columns.
        x, pad = pad_to_multiple(x, width)
        mask = pad_mask(mask, b, n, pad, x.device)
        rows = x.shape[1] // width
        to_columns = "b (r c) ... -> b (c r) ..."
        x = rearrange(x, to_columns, c=width)
        mask = None if mask is None else rearrange(mask, to_columns, c=width)
        x = self.step(x, mask, self.to_qkv_column, self.to_out_column, "row", rows)
        return rearrange(x, "b (c r) e -> b (r c) e", r=rows)[:, :n]
