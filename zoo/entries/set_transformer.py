r"""Set Transformer: A Framework for Attention-based Permutation-Invariant Neural Networks.

Self-attention over a set costs n^2. The induced set attention block (ISAB) routes it through m
learned inducing points instead: the inducing points first attend to the whole set and summarise
it into m vectors, then every element attends to those m summaries. Both steps are multi-head
attention blocks (MAB: attention with a residual and layer norm, then a row-wise feed-forward
layer with a residual and layer norm). Nothing depends on the order of the elements, so permuting
the input permutes the output, and the cost is linear in the set size.

$$ \operatorname{ISAB}_m(X) = \operatorname{MAB}(X, H), \qquad H = \operatorname{MAB}(I, X) $$

$$ \operatorname{MAB}(X, Y) = \operatorname{LN}\big(H' + \operatorname{rFF}(H')\big), \qquad
   H' = \operatorname{LN}\big(X + \operatorname{Multihead}(X, Y, Y)\big) $$

Deviations from the paper:

- rFF is one linear layer followed by ReLU (the paper leaves its depth open); scores are scaled
  by the head width, `dim_head ** -0.5`.
- Padded elements are masked as keys when the inducing points read the set, so a padded set acts
  as the set of its real elements (tested).
"""

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from zoo.core.checks import check_sequence, positive_int, refuse_causal
from zoo.core.masks import zero_padded_tokens
from zoo.core.softmax import softmax_attention


def head_width(dim: int, heads: int, dim_head: int | None, name: str) -> int:
    """`dim_head`, or `dim // heads` when None (then `heads` must divide `dim`), as the shell does
    for layers that do not use it."""
    if dim_head is None:
        if dim % heads:
            raise ValueError(f"{name}: heads={heads} must divide dim={dim}, or pass dim_head")
        dim_head = dim // heads
    return positive_int(dim_head, "dim_head")


class MAB(nn.Module):
    """Multihead attention block `MAB(X, Y)`: `(b, i, dim)`, `(b, j, dim)` -> `(b, i, dim)`
    (the paper's eq. 6-7)."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim)
        self.norm_attn = nn.LayerNorm(dim)
        self.rff = nn.Linear(dim, dim)
        self.norm_rff = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None):
        q = rearrange(self.to_q(x), "b i (h d) -> b h i d", h=self.heads)
        k, v = rearrange(self.to_kv(y), "b j (two h d) -> two b h j d", two=2, h=self.heads)
        attn = rearrange(softmax_attention(q, k, v, mask), "b h i e -> b i (h e)")
        hidden = self.norm_attn(x + self.to_out(attn))
        return self.norm_rff(hidden + F.relu(self.rff(hidden)))


class SetTransformer(nn.Module):
    """The induced set attention block `ISAB_m`, `(b, n, dim) -> (b, n, dim)`; not causal.

    Args:
        dim: model width.
        heads: number of heads.
        dim_head: width of one head; None means `dim // heads`.
        causal: must be False (a set has no order).
        inducing: m, the number of inducing points.
    """

    def __init__(self, dim: int, *, heads: int = 8, dim_head: int | None = None,
                 causal: bool = False, inducing: int = 16):
        refuse_causal(type(self).__name__, causal)
        super().__init__()
        self.dim, self.heads = positive_int(dim, "dim"), positive_int(heads, "heads")
        self.dim_head = dim_head = head_width(dim, heads, dim_head, type(self).__name__)
        self.inducing = positive_int(inducing, "inducing")
        self.inducing_points = nn.Parameter(torch.randn(inducing, dim) * dim ** -0.5)  # I
        self.summarise = MAB(dim, heads, dim_head)  # H = MAB(I, X), eq. (10)
        self.broadcast = MAB(dim, heads, dim_head)  # MAB(X, H), eq. (9)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        check_sequence(x, self.dim, mask, name=type(self).__name__, layer=self)
        # a copy per sample, not a view: a view of a parameter made under no_grad trips module hooks
        points = self.inducing_points.repeat(x.shape[0], 1, 1)  # (b m dim)
        # padded elements are filled, not only masked, where they are keys and values
        summary = self.summarise(points, zero_padded_tokens(x, mask), mask)  # (b m dim)
        return self.broadcast(x, summary)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.heads}, dim_head={self.dim_head}, "
                f"inducing={self.inducing}")
