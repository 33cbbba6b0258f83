r"""BP-Transformer: Modelling Long-Range Context via Binary Partitioning.

Binary partitioning turns the sequence into a tree of spans: level 0 holds the tokens, level
$l$ holds spans of $2^l$ tokens, each the union of two spans below. A token reads its context
fine-to-coarse: the $k$ nearest tokens on each side, then the $k$ next spans of 2 tokens, the $k$
next spans of 4, and so on. The spans are chosen so that they tile the rest of the sequence
without overlap (where the next span would straddle what is already covered, one span of the
level below takes its place), so a query reads $O(k \log(n/k))$ nodes and still covers all $n$
tokens. Causally only the left side and the token itself are read.

$$ O_i = \sum_{u \in \mathcal{C}_k(i)} \operatorname{softmax}_u\!\big(q_i^\top \bar k_u / \sqrt{d}\big)\,
   \bar v_u, \qquad \bar k_u = \tfrac{1}{|u|}\sum_{j \in u} k_j,\ \ \bar v_u = \tfrac{1}{|u|}\sum_{j \in u}
   v_j $$

$\mathcal{C}_k(i)$ is token $i$ itself plus its contextual nodes (the paper's contextual edges).
Each level's nodes of a query form one contiguous range of node indices, so a block of queries
reads one window of nodes per level: the attention is a few batched matrix products per level,
not a gather per query.

Deviations from the paper:
- One layer, tokens in and tokens out. In the paper span nodes are graph nodes with their own
  state, updated through the affiliated edges in every layer; here a span's key and value are the
  mean of its tokens' keys and values (what an attention over its tokens gives with equal
  weights). So the layer is linear in `v`, and its effective token-level map is a kernel.
- No relative position embeddings on the edges.
- Contextual nodes follow the rule of the authors' graph builder, except that a right-side span
  past the end of the sequence is left out (the builder wraps it to a node of the level above).
"""

import torch
import torch.nn.functional as F
from einops import einsum, rearrange, reduce

from zoo.checks import check_qkv, positive_int
from zoo.masks import neg_fill
from zoo.shell import MultiHead

QUERY_BLOCK = 8  # queries that share one window of nodes at the finest levels


def _floor_half(t: torch.Tensor) -> torch.Tensor:
    return torch.div(t, 2, rounding_mode="floor")


def contextual_ranges(n: int, k: int, *, causal: bool = False, device=None):
    """Per level, the contiguous range of nodes each query reads.

    Returns:
        A list of `(level, lo, hi)`, `lo` and `hi` `(n,)` inclusive node indices at that level (an
        empty range has `lo > hi`). Level 0 comes once, the query's own token included; every other
        level once for the left side and, unless causal, once for the right side.
    """
    i = torch.arange(n, device=device)
    sizes = [n]
    while sizes[-1] > 1:
        sizes.append((sizes[-1] + 1) // 2)
    out = []
    ptr, ovl = i - 1, torch.zeros_like(i, dtype=torch.bool)  # left side, walking down to 0
    for level in range(len(sizes)):
        nxt = ptr - k
        ext = (nxt >= 0) & (nxt % 2 == 0)  # nxt straddles the next level's span: take it here
        # With ovl, this level's first node was read one level down (as that level's ext).
        hi = i if level == 0 else ptr - ovl.long()
        out.append((level, (nxt + 1 - ext.long()).clamp(min=0), hi))
        ptr, ovl = _floor_half(nxt), ext
    if causal:
        return out
    ptr, ovl = i + 1, torch.zeros_like(i, dtype=torch.bool)  # right side, walking up to n - 1
    for level, size in enumerate(sizes):
        nxt = ptr + k
        ext = nxt % 2 == 1  # nxt straddles the next level's span (past the end it is clipped)
        hi = (nxt - 1 + ext.long()).clamp(max=size - 1)
        if level == 0:  # one contiguous range: left, the token itself, right
            out[0] = (0, out[0][1], hi)
        else:
            out.append((level, ptr + ovl.long(), hi))
        ptr, ovl = _floor_half(nxt), ext
    return out


def span_means(t: torch.Tensor, weight: torch.Tensor, *, ratio: int = 2,
               levels: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Mean and real-token count of aligned spans: level l holds spans of ratio^l tokens.

    Args:
        t: `(b, h, n, d)`. weight: `(b, n)`, 1 for real tokens and 0 for padding.
        ratio: tokens of level l - 1 per span of level l.
        levels: how many levels; None means until one span holds everything.

    Returns:
        Per level, `(means (b, h, n_l, d), counts (b, n_l))`; a span with no real token has mean 0.
    """
    sums, counts = t * rearrange(weight, "b n -> b 1 n 1"), weight
    out = [(sums, counts)]
    while (counts.shape[-1] > 1) if levels is None else (len(out) < levels):
        pad = (-counts.shape[-1]) % ratio
        sums = reduce(F.pad(sums, (0, 0, 0, pad)), "b h (m r) d -> b h m d", "sum", r=ratio)
        counts = reduce(F.pad(counts, (0, pad)), "b (m r) -> b m", "sum", r=ratio)
        out.append((sums, counts))
    return [(s / rearrange(c.clamp(min=1), "b m -> b 1 m 1"), c) for s, c in out]


def _window(lo: torch.Tensor, hi: torch.Tensor, block: int):
    """Group queries in blocks; each block reads one window of nodes covering its members' ranges.

    Returns:
        `idx (nb, w)` node indices of each block's window and `keep (nb, block, w)`, True where the
        node is in the query's own range; None when every range is empty.
    """
    lo, hi = F.pad(lo, (0, (-lo.shape[0]) % block), value=1), F.pad(hi, (0, (-hi.shape[0]) % block))
    lo, hi = rearrange(lo, "(nb c) -> nb c", c=block), rearrange(hi, "(nb c) -> nb c", c=block)
    empty = lo > hi  # padded queries too
    if bool(empty.all()):
        return None
    start = lo.masked_fill(empty, torch.iinfo(lo.dtype).max).amin(-1)
    start = torch.where(empty.all(-1), 0, start)
    width = int((hi - start[:, None]).masked_fill(empty, 0).max()) + 1
    idx = start[:, None] + torch.arange(width, device=lo.device)  # (nb w)
    keep = (idx[:, None, :] >= lo[..., None]) & (idx[:, None, :] <= hi[..., None])
    return idx, keep


def gather_nodes(t: torch.Tensor, node: torch.Tensor) -> torch.Tensor:
    """`t (b, h, m, d)`, `node (nb, w)` indices into m -> `(b, h, nb, w, d)` (one index_select)."""
    return rearrange(t.index_select(2, node.flatten()), "b h (nb w) d -> b h nb w d", w=node.shape[1])


def node_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                   ranges, *, ratio: int, levels: int | None = None,
                   scale: float | None = None) -> torch.Tensor:
    """One softmax over span nodes of several levels, each query reading a range of nodes per level.

    A node of level l is an aligned span of ratio^l tokens whose key and value are the means over
    its real tokens (`span_means`). Queries go in blocks of max(8, ratio^l): a block reads one
    window of nodes (`_window`), so its scores are one batched matrix product.

    Args:
        q, k: `(b, h, n, d)`. v: `(b, h, n, e)`. mask: `(b, n)`, True = real token.
        ranges: `(level, lo, hi)` with `lo`, `hi` `(n,)` inclusive node indices; nodes without a
            real token are left out.
        ratio, levels: the spans, as in `span_means`.
        scale: score scale; None means `d ** -0.5`.

    Returns:
        `(b, h, n, e)`; a query with no node at all gets the mean of its window's values.
    """
    b, h, n, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    weight = q.new_ones(b, n) if mask is None else mask.to(q.dtype)
    keys = span_means(k, weight, ratio=ratio, levels=levels)
    values = span_means(v, weight, ratio=ratio, levels=levels)
    parts = []  # (level, block, window indices, keep) of every level a query reads
    for level, lo, hi in ranges:
        block = max(QUERY_BLOCK, ratio ** level)
        window = _window(lo, hi, block)
        if window is not None:
            parts.append((level, block) + window)
    rows = max(idx.shape[0] * block for _, block, idx, _ in parts)
    q = F.pad(q * scale, (0, 0, 0, rows - n))  # scaled and padded once: query blocks are views
    # Two passes: scores and each query's maximum over all levels, then weights and sums.
    scores = []
    for level, block, idx, keep in parts:
        (k_mean, counts), size = keys[level], keys[level][1].shape[-1]
        node = idx.clamp(max=size - 1)
        keep = keep & (idx < size)[:, None, :] & (counts[:, node] > 0)[:, :, None, :]  # (b nb c w)
        q_blk = rearrange(q[:, :, :idx.shape[0] * block], "b h (nb c) d -> b h nb c d", c=block)
        s = einsum(q_blk, gather_nodes(k_mean, node), "b h nb c d, b h nb w d -> b h nb c w")
        scores.append(s.masked_fill(~keep[:, None], neg_fill(s.dtype)))
    top = torch.stack([F.pad(s.amax(-1).flatten(2), (0, rows - s.shape[2] * s.shape[3]),
                             value=neg_fill(s.dtype)) for s in scores]).amax(0)  # (b h rows)
    out = q.new_zeros(b, h, rows, values[0][0].shape[-1])
    norm = q.new_zeros(b, h, rows)
    for (level, block, idx, _), s in zip(parts, scores, strict=True):
        node, rows_l = idx.clamp(max=values[level][1].shape[-1] - 1), idx.shape[0] * block
        weights = (s - rearrange(top[:, :, :rows_l], "b h (nb c) -> b h nb c 1", c=block)).exp()
        rearrange(norm[:, :, :rows_l], "b h (nb c) -> b h nb c", c=block).add_(weights.sum(-1))
        rearrange(out[:, :, :rows_l], "b h (nb c) e -> b h nb c e", c=block).add_(
            einsum(weights, gather_nodes(values[level][0], node), "b h nb c w, b h nb w e -> b h nb c e"))
    return out[:, :, :n] / norm[:, :, :n, None]


def bp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 mask: torch.Tensor | None = None, *, k_per_level: int = 4,
                 causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """Fine-to-coarse attention over the binary-partition tree.

    Args:
        q, k: `(b, h, n, d)`. v: `(b, h, n, e)`. mask: `(b, n)`, True = real token.
        k_per_level: the paper's k, nodes read per level and side.
        causal: read only the token itself and the nodes to its left.
        scale: score scale; None means `d ** -0.5`.

    Returns:
        `(b, h, n, e)`.
    """
    check_qkv(q, k, v, mask, name="bp_attention")
    ranges = contextual_ranges(q.shape[2], k_per_level, causal=causal, device=q.device)
    return node_attention(q, k, v, mask, ranges, ratio=2, scale=scale)


class BPTransformer(MultiHead):
    """Multi-head BP-Transformer attention. `(b, n, dim) -> (b, n, dim)`.

    Args:
        k: nodes read per level and side (the paper's k); `k >= n - 1` reads every token itself,
            which is softmax attention.
    """

    def __init__(self, dim: int, *, heads: int = 8, dim_head: int | None = None,
                 causal: bool = False, k: int = 4):
        super().__init__(dim, heads=heads, dim_head=dim_head, causal=causal)
        self.k = positive_int(k, "k")

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        return bp_attention(q, k, v, mask, k_per_level=self.k, causal=self.causal)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, k={self.k}"
