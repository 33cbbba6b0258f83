r"""Generating Long Sequences with Sparse Transformers.

Factorise full attention into two sparse patterns of about $\sqrt{n}$ keys each, so that two hops
connect every pair of positions. *Strided*: the previous $l$ positions plus every $l$-th position
before them (suits data with a period, such as image rows). *Fixed*: the own block of $l$ positions
plus the last $c$ "summary" positions of every block (suits text). One "merged head" attends to the
union of both sets at once; with $l \approx \sqrt{n}$ time and memory are $O(n\sqrt{n})$.

$$ O_i = \sum_{j \in A_i} \operatorname{softmax}_{j \in A_i}\!\big(Q_i K_j^\top / \sqrt{d}\big) V_j,
   \qquad A_i = A^{(1)}_i \cup A^{(2)}_i $$

strided: $A^{(1)}_i = \{j : |i - j| \le l\}$, $A^{(2)}_i = \{j : (i - j) \bmod l = 0\}$;
fixed: $A^{(1)}_i = \{j : \lfloor j/l \rfloor = \lfloor i/l \rfloor\}$,
$A^{(2)}_i = \{j : j \bmod l \ge l - c\}$; causal keeps $j \le i$ in both.

Deviations from the paper:
- the merged head (Sec. 4.3, "a single head attends to the union") is the layer; the paper's other
  options (one pattern per layer, heads split between patterns) are architecture choices;
- the paper is autoregressive only; `causal=False` drops the $j \le i$ condition from both sets;
- the fixed pattern gives every head the same summary positions (the paper found distinct
  sub-blocks per head slightly better);
- `stride=None` picks $l = \lceil\sqrt{n}\rceil$ per call, the paper's $l \approx \sqrt{n}$.
"""

import math

import torch
from einops import einsum, rearrange

from zoo.core.checks import check_qkv, one_of, positive_int
from zoo.core.masks import block_windows, neg_fill, pad_qkv
from zoo.core.shell import MultiHead
from zoo.core.softmax import softmax_attention

PATTERNS = ("strided", "fixed")


def sparse_transformer_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                           mask: torch.Tensor | None = None, *,
                                           pattern: str = "strided", stride: int | None = None,
                                           summary: int = 1, causal: bool = False) -> torch.Tensor:
    """The merged head of Sec. 4.2 as an allowed `(i, j)` set, `A_i = A^(1)_i | A^(2)_i`:
    strided, `|i - j| <= l` or `(i - j) mod l = 0`; fixed, `floor(i / l) = floor(j / l)` or
    `j mod l >= l - c`; softmax over it. Same arguments as `sparse_transformer_attention`."""
    one_of(pattern, PATTERNS, "pattern")
    n = q.shape[2]
    l = stride or math.ceil(math.sqrt(n))  # noqa: E741 - the paper's name
    pos = torch.arange(n, device=q.device)
    i, j = rearrange(pos, "i -> i 1"), rearrange(pos, "j -> 1 j")
    if pattern == "strided":
        allowed = ((i - j).abs() <= l) | ((i - j) % l == 0)
    else:
        allowed = (i // l == j // l) | (j % l >= l - min(summary, l))
    return softmax_attention(q, k, v, mask, causal=causal, allowed=allowed)


def neighbour_blocks(t: torch.Tensor, l: int, before: int, after: int) -> torch.Tensor:  # noqa: E741
    """`(..., n, d)` -> `(..., r, w, d)`, `n = r l`: each block of `l` with its `before`/`after`
    neighbour blocks (zeros past the ends), `w = (before + 1 + after) l` (`block_windows`)."""
    return rearrange(block_windows(t, l, dim=-2, before=before, after=after), "... r d w -> ... r w d")


def sparse_transformer_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 mask: torch.Tensor | None = None, *, pattern: str = "strided",
                                 stride: int | None = None, summary: int = 1,
                                 causal: bool = False) -> torch.Tensor:
    """What the layer runs: `sparse_transformer_attention_reference` without the `n x n` pattern:
    A^(1) from neighbour blocks, A^(2) from the columns (strided) or the summary positions (fixed),
    both in one softmax (tested equal).

    Args:
        q, k: `(b, h, n, d)`. v: `(b, h, n, e)`. mask: `(b, n)`, True = real token.
        pattern: `"strided"` or `"fixed"`.
        stride: the block length `l`; None means `ceil(sqrt(n))`.
        summary: `c`, summary positions per block of the fixed pattern (at most `l` are used).
        causal: keep only keys `j <= i`.

    Returns:
        `(b, h, n, e)`.
    """
    check_qkv(q, k, v, mask, name="sparse_transformer_attention")
    one_of(pattern, PATTERNS, "pattern")
    b, _, n, d = q.shape
    l = stride or math.ceil(math.sqrt(n))  # noqa: E741 - the paper's name
    q, k, v, real = pad_qkv(q, k, v, mask, l)
    q = q * d ** -0.5  # scaled once here rather than every score

    # A^(1): a band around the query, read from neighbouring blocks (eq. 2 / eq. 3)
    before, after = (1, 0 if causal else 1) if pattern == "strided" else (0, 0)
    kw, vw = neighbour_blocks(k, l, before, after), neighbour_blocks(v, l, before, after)
    key_ok = rearrange(neighbour_blocks(real[..., None], l, before, after), "b r w 1 -> b 1 r 1 w")
    # query c of a block minus key w of its window: the same for every block
    delta = (torch.arange(l, device=q.device)[:, None] + before * l
             - torch.arange((before + 1 + after) * l, device=q.device))  # (c w)
    near = delta.abs() <= l if pattern == "strided" else delta.abs() < l
    if causal:
        near = near & (delta >= 0)
    q = rearrange(q, "b h (r c) d -> b h r c d", c=l)
    scores_w = einsum(q, kw, "b h r c d, b h r w d -> b h r c w")
    # Out of place: the einsum output may be a non-contiguous view, which torch.compile refuses
    # to fill in place.
    scores_w = scores_w.masked_fill(~(near & key_ok), neg_fill(scores_w.dtype))

    # A^(2), without the keys A^(1) already holds
    k, v = (rearrange(t, "b h (r c) d -> b h r c d", c=l) for t in (k, v))
    real = rearrange(real, "b (r c) -> b r c", c=l)
    rows = torch.arange(q.shape[2], device=q.device)
    gap = rearrange(rows, "r -> r 1") - rows  # query row minus key row
    if pattern == "strided":  # every l-th position: the same column c, rows two or more away
        ks, vs = (rearrange(t, "b h r c d -> b h c r d") for t in (k, v))
        scores_x = einsum(q, ks, "b h r c d, b h c j d -> b h r c j")
        far = gap >= 2 if causal else gap.abs() >= 2
        allowed = rearrange(far, "r j -> 1 1 r 1 j") & rearrange(real, "b j c -> b 1 1 c j")
        spec = "b h r c j, b h c j e -> b h r c e"
    else:  # the last min(summary, l) positions of every other block
        s = min(summary, l)
        ks, vs = (rearrange(t[:, :, :, l - s:], "b h r s d -> b h (r s) d") for t in (k, v))
        scores_x = einsum(q, ks, "b h r c d, b h j d -> b h r c j")
        other = (gap > 0 if causal else gap != 0).repeat_interleave(s, dim=1)  # (r j)
        allowed = (rearrange(other, "r j -> 1 1 r 1 j")
                   & rearrange(real[:, :, l - s:], "b r s -> b 1 1 1 (r s)"))
        spec = "b h r c j, b h j e -> b h r c e"
    scores_x = scores_x.masked_fill(~allowed, neg_fill(scores_x.dtype))

    attn = torch.cat([scores_w, scores_x], dim=-1).softmax(dim=-1)  # (b h r c w+j)
    attn_w, attn_x = attn.split([scores_w.shape[-1], scores_x.shape[-1]], dim=-1)
    out = einsum(attn_w, vw, "b h r c w, b h r w e -> b h r c e") + einsum(attn_x, vs, spec)
    return rearrange(out, "b h r c e -> b h (r c) e")[:, :, :n]


class SparseTransformer(MultiHead):
    """Multi-head factorised sparse attention (merged head). `(b, n, dim) -> (b, n, dim)`.

    Args:
        pattern: `"strided"` or `"fixed"`.
        stride: block length `l`; None means `ceil(sqrt(n))` at each call.
        summary: summary positions `c` per block (fixed pattern).
    """

    def __init__(self, dim: int, *, heads: int = 8, dim_head: int | None = None,
                 causal: bool = False, pattern: str = "strided", stride: int | None = None,
                 summary: int = 1):
        super().__init__(dim, heads=heads, dim_head=dim_head, causal=causal)
        self.pattern = one_of(pattern, PATTERNS, "pattern")
        self.stride = None if stride is None else positive_int(stride, "stride")
        self.summary = positive_int(summary, "summary")

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        return sparse_transformer_attention(q, k, v, mask, pattern=self.pattern, stride=self.stride,
                                            summary=self.summary, causal=self.causal)
