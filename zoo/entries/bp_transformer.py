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
reads one window of nodes per level, and the windows of all levels side by side are the block's
keys: the attention is one batched matrix product, one softmax and one product per chunk of
blocks, not a gather per query.

The file runs past 250 lines because the tiling rule (which span of which level a query reads,
both sides, causal or not, near the ends) is built here as index windows, with the padding of
partial spans; the attention itself is the short `window_attention`.

Deviations from the paper:
- One layer, tokens in and tokens out. In the paper span nodes are graph nodes with their own
  state, updated through the affiliated edges in every layer; here a span's key and value are the
  mean of its tokens' keys and values (what an attention over its tokens gives with equal
  weights). So the layer is linear in `v`, and its effective token-level map is a kernel.
- No relative position embeddings on the edges.
- Contextual nodes follow the rule of the authors' graph builder, except that a right-side span
  past the end of the sequence is left out (the builder wraps it to a node of the level above).
"""

import functools

import torch
import torch.nn.functional as F
from einops import rearrange, reduce

from zoo.core.checks import check_qkv, positive_int
from zoo.core.masks import neg_fill, pad_to_multiple
from zoo.core.shell import MultiHead

QUERY_BLOCK = 32  # queries that share one window of nodes per level
CHUNK = 8  # query blocks per pass: their nodes, scores and weights stay in cache


def _floor_half(t: torch.Tensor) -> torch.Tensor:
    return torch.div(t, 2, rounding_mode="floor")


def level_sizes(n: int, ratio: int, levels: int | None = None) -> list[int]:
    """Spans per level when level l holds spans of ratio^l tokens; None levels: until one span."""
    sizes = [n]
    while (sizes[-1] > 1) if levels is None else (len(sizes) < levels):
        sizes.append(-(-sizes[-1] // ratio))
    return sizes


def contextual_ranges(n: int, k: int, *, causal: bool = False, device=None):
    """Per level, the contiguous range of nodes each query reads.

    Returns:
        A list of `(level, lo, hi)`, `lo` and `hi` `(n,)` inclusive node indices at that level (an
        empty range has `lo > hi`). Level 0 comes once, the query's own token included; every other
        level once for the left side and, unless causal, once for the right side.
    """
    i = torch.arange(n, device=device)
    sizes = level_sizes(n, 2)
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


def span_means(t: torch.Tensor, weight: torch.Tensor | None, *, ratio: int = 2,
               levels: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and real-token count of aligned spans: level l holds spans of ratio^l tokens.

    Args:
        t: `(b, h, n, d)`. weight: `(b, n)`, 1 for real tokens and 0 for padding; None: all real.
        ratio: tokens of level l - 1 per span of level l.
        levels: how many levels; None means until one span holds everything.

    Returns:
        All levels in one table, level after level (`level_sizes` spans each): `means (b, h, nodes,
        d)` and `counts (b, nodes)`. A span with no real token has mean 0.
    """
    # contiguous first: summing neighbours of a strided view (the heads of a projection) is slow
    sums = (t if weight is None else t * rearrange(weight, "b n -> b 1 n 1")).contiguous()
    counts = t.new_ones(t.shape[0], t.shape[2]) if weight is None else weight
    level_sums, level_counts = [sums], [counts]
    while (counts.shape[-1] > 1) if levels is None else (len(level_sums) < levels):
        sums = reduce(pad_to_multiple(sums, ratio)[0], "b h (m r) d -> b h m d", "sum", r=ratio)
        counts = reduce(pad_to_multiple(counts, ratio, dim=-1)[0], "b (m r) -> b m", "sum", r=ratio)
        level_sums.append(sums)
        level_counts.append(counts)
    counts = torch.cat(level_counts, -1)
    means = torch.cat(level_sums, 2).div_(rearrange(counts.clamp(min=1), "b m -> b 1 m 1"))
    return means, counts


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


def level_windows(ranges, sizes: list[int], block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block of queries, the windows of every level side by side (`_window` for each level).

    Args:
        ranges: `(level, lo, hi)` with `lo`, `hi` `(n,)` inclusive node indices.
        sizes: nodes per level (`level_sizes`).
        block: queries per block.

    Returns:
        `node (nb, w)`, rows of the all-level node table (`span_means`), and `keep (nb, block, w)`,
        True where the node is in the query's own range.
    """
    first = [sum(sizes[:level]) for level in range(len(sizes))]  # node u of level l: row first[l] + u
    node, keep = [], []
    for level, lo, hi in ranges:
        window = _window(lo, hi, block)
        if window is not None:
            idx, inside = window
            node.append(first[level] + idx.clamp(max=sizes[level] - 1))
            keep.append(inside & (idx < sizes[level])[:, None, :])
    return torch.cat(node, -1), torch.cat(keep, -1)


def node_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                   ranges, *, ratio: int, levels: int | None = None,
                   scale: float | None = None) -> torch.Tensor:
    """One softmax over span nodes of several levels, each query reading a range of nodes per level.

    Args:
        q, k: `(b, h, n, d)`. v: `(b, h, n, e)`. mask: `(b, n)`, True = real token.
        ranges: `(level, lo, hi)` with `lo`, `hi` `(n,)` inclusive node indices; nodes without a
            real token are left out.
        ratio, levels: the spans, as in `span_means`.
        scale: score scale; None means `d ** -0.5`.

    Returns:
        `(b, h, n, e)`, as `window_attention`.
    """
    node, keep = level_windows(ranges, level_sizes(q.shape[2], ratio, levels), QUERY_BLOCK)
    return window_attention(q, k, v, mask, node, keep, ratio=ratio, levels=levels, scale=scale)


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                     node: torch.Tensor, keep: torch.Tensor, *, ratio: int, levels: int | None = None,
                     scale: float | None = None) -> torch.Tensor:
    """One softmax over the span nodes each block of queries reads (`level_windows`).

    A node of level l is an aligned span of ratio^l tokens whose key and value are the means over
    its real tokens (`span_means`). A block's keys are the windows of all levels side by side, so
    its scores are one batched matrix product and one softmax.

    Args:
        q, k: `(b, h, n, d)`. v: `(b, h, n, e)`. mask: `(b, n)`, True = real token.
        node: `(nb, w)` rows of the all-level node table. keep: `(nb, c, w)`, True where query
            c of a block reads the node; nodes without a real token are left out.
        ratio, levels: the spans, as in `span_means`.
        scale: score scale; None means `d ** -0.5`.

    Returns:
        `(b, h, n, e)`; a query with no node at all gets the mean of its block's node values.
    """
    b, h, n, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    weight = None if mask is None else mask.to(q.dtype)
    k_all, counts = span_means(k, weight, ratio=ratio, levels=levels)  # (b h nodes d), (b nodes)
    v_all = span_means(v, weight, ratio=ratio, levels=levels)[0]
    keep = keep & (counts > 0)[:, node][:, :, None, :]  # (b nb c w)
    bias = (~keep).to(q.dtype) * neg_fill(q.dtype)  # added to the scores: 0 or the most negative
    nb, c, w = keep.shape[1:]
    q = rearrange(pad_to_multiple(q * scale, c)[0], "b h (nb c) d -> b h nb c d", c=c)
    # node rows of the flattened (b h nodes) table, so that a gather copies whole rows
    rows = rearrange(torch.arange(b * h, device=q.device) * k_all.shape[2], "bh -> bh 1 1") + node
    k_all, v_all = (rearrange(t, "b h m d -> (b h m) d") for t in (k_all, v_all))
    out = []
    for i in range(0, nb, CHUNK):  # over chunks of query blocks, not tokens
        blocks = slice(i, i + CHUNK)
        k_w, v_w = (rearrange(t.index_select(0, rows[:, blocks].flatten()), "(b h B w) d -> b h B w d",
                              b=b, h=h, w=w) for t in (k_all, v_all))
        scores = (q[:, :, blocks] @ k_w.transpose(-1, -2)).add_(bias[:, None, blocks])  # (b h B c w)
        out.append(scores.softmax(dim=-1) @ v_w)  # (b h B c e)
    return rearrange(torch.cat(out, dim=2), "b h nb c e -> b h (nb c) e")[:, :, :n]


@functools.lru_cache(maxsize=8)
def contextual_windows(n: int, k: int, causal: bool, block: int, device: torch.device):
    """`level_windows` of `contextual_ranges`: they depend on the length, not on the tokens, so
    they are built once per length (a memo of up to 8 lengths)."""
    ranges = contextual_ranges(n, k, causal=causal, device=device)
    return level_windows(ranges, level_sizes(n, 2), block)


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
    node, keep = contextual_windows(q.shape[2], k_per_level, causal, QUERY_BLOCK, q.device)
    return window_attention(q, k, v, mask, node, keep, ratio=2, scale=scale)


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
