r"""Jukebox: A Generative Model for Music.

Jukebox's priors model very long sequences of audio codes with factorized attention: the
sequence is folded into rows of `c` positions, and a layer attends along one axis of that grid.
Row attention reads the query's own row, column attention the same place in every row, and
previous-row attention the whole row before the query's. The model cycles the three patterns
over its layers, so a few layers connect every pair of positions; each layer reads only
$O(c + n/c)$ keys per query, $O(n \sqrt n)$ in all with $c \approx \sqrt n$.

$$ O_i = \sum_{j \in S(i)} \operatorname{softmax}_j\!\big(q_i^\top k_j / \sqrt{d}\big)\, v_j, \quad
   S(i) = \begin{cases} \{j : \lfloor j/c \rfloor = \lfloor i/c \rfloor\} & \text{row} \\
   \{j : j \equiv i \pmod c\} & \text{column} \\
   \{j : \lfloor j/c \rfloor = \lfloor i/c \rfloor - 1\} & \text{previous row} \end{cases} $$

(with $j \le i$ when causal). A query with no key (the first row, under previous-row attention)
outputs zero, as in the authors' code, which attends to a zero-padded row there.

Deviations from the paper:
- The row length `c` defaults to $\lceil\sqrt n\rceil$ for each input (the paper fixes it with the
  context length); lengths that are not a multiple of `c` are padded and the padding masked.
- One layer holds one pattern (the `pattern` hyper-parameter); the paper's stack cycles them.
"""

import torch
from einops import einsum, rearrange

from zoo.core.checks import check_qkv, one_of, positive_int
from zoo.core.masks import neg_fill, pad_qkv
from zoo.core.shell import MultiHead
from zoo.core.softmax import softmax_attention

PATTERNS = ("row", "column", "previous-row")


def jukebox_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                mask: torch.Tensor | None = None, *, pattern: str = "row",
                                block: int | None = None, causal: bool = False,
                                scale: float | None = None) -> torch.Tensor:
    """The paper's three patterns on the grid of rows of `c` positions, as an allowed `(i, j)`
    set: the same row, the same column, or the previous row; softmax over it, and zero for a query
    with no key (row 0 of previous-row). Same arguments as `jukebox_attention`."""
    one_of(pattern, PATTERNS, "pattern")
    n = q.shape[2]
    c = default_block(n) if block is None else positive_int(block, "block")
    pos = torch.arange(n, device=q.device)
    i, j = rearrange(pos, "i -> i 1"), rearrange(pos, "j -> 1 j")
    allowed = {"row": i // c == j // c, "column": i % c == j % c,
               "previous-row": j // c == i // c - 1}[pattern]
    keep = allowed & (j <= i) if causal else allowed
    if mask is not None:
        keep = keep & rearrange(mask, "b j -> b 1 1 j")
    out = softmax_attention(q, k, v, mask, causal=causal, allowed=allowed, scale=scale)
    return out * keep.any(dim=-1, keepdim=True)


def default_block(n: int) -> int:
    """The row length used when none is given: the ceiling of sqrt(n)."""
    c = int(n ** 0.5)
    return c if c * c >= n else c + 1


def _groups(t: torch.Tensor, pattern: str, c: int) -> torch.Tensor:
    """`(b, h, (r c), ...)` -> `(b, h, groups, members, ...)`: rows, or columns ordered by row."""
    if pattern == "column":
        return rearrange(t, "b h (r c) ... -> b h c r ...", c=c)
    return rearrange(t, "b h (r c) ... -> b h r c ...", c=c)


def jukebox_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      mask: torch.Tensor | None = None, *, pattern: str = "row",
                      block: int | None = None, causal: bool = False,
                      scale: float | None = None) -> torch.Tensor:
    """What the layer runs: `jukebox_attention_reference` without the `n x n` pattern, the sequence
    folded into its rows (or columns, or rolled by a row) and attended group by group (tested
    equal). Row, column or previous-row attention over the sequence folded into rows of `block`.

    Args:
        q, k: `(b, h, n, d)`. v: `(b, h, n, e)`. mask: `(b, n)`, True = real token.
        pattern: `"row"`, `"column"` or `"previous-row"`.
        block: row length `c`; None means `ceil(sqrt(n))`.
        causal: keep keys `j <= i` (previous-row attention only ever reads earlier keys).
        scale: score scale; None means `d ** -0.5`.

    Returns:
        `(b, h, n, e)`.
    """
    check_qkv(q, k, v, mask, name="jukebox_attention")
    one_of(pattern, PATTERNS, "pattern")
    b, h, n, d = q.shape
    c = default_block(n) if block is None else positive_int(block, "block")
    scale = d ** -0.5 if scale is None else scale
    q, k, v, keep = pad_qkv(q, k, v, mask, c)
    keep = rearrange(keep, "b n -> b 1 n")
    if pattern == "previous-row":  # row r reads row r - 1; row 0 reads an empty row
        k, v, keep = (torch.roll(t, c, dims=2) for t in (k, v, keep))
        keep[..., :c] = False
    q, k, v = (_groups(t, pattern, c) for t in (q, k, v))
    keep = rearrange(_groups(keep.unsqueeze(-1), pattern, c), "b 1 g j 1 -> b 1 g 1 j")
    if causal and pattern != "previous-row":
        keep = keep & torch.ones(keep.shape[-1], keep.shape[-1], dtype=torch.bool,
                                 device=q.device).tril()
    scores = einsum(q, k, "b h g i d, b h g j d -> b h g i j") * scale
    attn = scores.masked_fill(~keep, neg_fill(scores.dtype)).softmax(dim=-1)  # (b h g i j)
    attn = attn * keep.any(dim=-1, keepdim=True)  # a query with no key outputs zero
    out = einsum(attn, v, "b h g i j, b h g j e -> b h g i e")
    out = rearrange(out, "b h c r e -> b h (r c) e" if pattern == "column" else
                    "b h r c e -> b h (r c) e")
    return out[:, :, :n]


class Jukebox(MultiHead):
    """Multi-head factorized attention of Jukebox. `(b, n, dim) -> (b, n, dim)`.

    Args:
        pattern: `"row"`, `"column"` or `"previous-row"`.
        block: row length; None means `ceil(sqrt(n))` for each input. With `pattern="row"` and
            `block >= n` the layer is softmax attention.
    """

    def __init__(self, dim: int, *, heads: int = 8, dim_head: int | None = None,
                 causal: bool = False, pattern: str = "row", block: int | None = None):
        super().__init__(dim, heads=heads, dim_head=dim_head, causal=causal)
        self.pattern = one_of(pattern, PATTERNS, "pattern")
        self.block = None if block is None else positive_int(block, "block")

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        return jukebox_attention(q, k, v, mask, pattern=self.pattern, block=self.block,
                                 causal=self.causal)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, pattern={self.pattern!r}, block={self.block}"
