r"""Attention over pooled spans: the machinery of the tree and multi-scale entries (bp-transformer,
multiscale-transformer).

A node of level $l$ is an aligned span of $r^l$ tokens; its key and value are the means of the
keys and values of its real tokens. Each query reads some nodes of some levels and takes one
softmax over all of them:

$$ O_i = \sum_{u \in \mathcal{R}(i)} \operatorname{softmax}_u\!\big(q_i^\top \bar k_u s\big)\, \bar v_u,
   \qquad \bar k_u = \tfrac{1}{|u|}\sum_{j \in u} k_j,\ \ \bar v_u = \tfrac{1}{|u|}\sum_{j \in u} v_j $$

`pooled_attention` is that equation on a dense `(i, u)` pattern, and `node_attention_reference`
builds the pattern from per-level ranges of nodes. The fast path,
`node_attention` (and `window_attention` under it), needs no such pattern: each query reads one
contiguous range of nodes per level, so a block of queries reads one window of nodes per level,
and the windows of all levels side by side are the block's keys; the attention is then one
batched matrix product, one softmax and one product per chunk of query blocks.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
from einops import einsum, rearrange, reduce

from zoo.core.masks import neg_fill, pad_to_multiple
from zoo.core.softmax import softmax_attention

QUERY_BLOCK = 32  # queries that share one window of nodes per level
CHUNK = 8  # query blocks per pass: their nodes, scores and weights stay in cache


def node_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             mask: torch.Tensor | None, ranges, *, ratio: int,
                             levels: int | None = None, scale: float | None = None) -> torch.Tensor:
    """`node_attention` as its definition: the `(i, u)` pattern of the ranges, nodes as means of
    their real tokens, softmax over the nodes read that hold a real token."""
    n = q.shape[2]
    sizes = level_sizes(n, ratio, levels)
    first = [sum(sizes[:level]) for level in range(len(sizes))]
    u = torch.arange(sum(sizes), device=q.device)
    reads = torch.zeros(n, len(u), dtype=torch.bool, device=q.device)
    for level, lo, hi in ranges:  # query i reads node first[level] + p for lo[i] <= p <= hi[i]
        p = u - first[level]
        lo_t, hi_t = (rearrange(torch.tensor(t, device=q.device), "i -> i 1") for t in (lo, hi))
        reads |= (p >= lo_t) & (p <= hi_t) & (p < sizes[level])
    return pooled_attention(q, k, v, mask, reads, ratio=ratio, levels=levels, scale=scale)


def pooled_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                     reads: torch.Tensor, *, ratio: int, levels: int | None = None,
                     scale: float | None = None) -> torch.Tensor:
    """Softmax over the span nodes each query reads, written out densely (the specification the
    fast path is tested against; quadratic in the length).

    Args:
        q, k: `(b, h, n, d)`. v: `(b, h, n, e)`. mask: `(b, n)`, True = real token.
        reads: `(n, u)` bool, True where query i reads node u (nodes as in `span_members`).
        ratio, levels: the spans, as in `span_means`.

    Returns:
        `(b, h, n, e)`.
    """
    member = span_members(q.shape[2], ratio, levels, q.device)  # (u j)
    if mask is not None:
        member = member & rearrange(mask, "b j -> b 1 j")
    counts = member.sum(-1)  # (u) or (b u): real tokens per node
    pool = member.to(q.dtype) / counts.clamp(min=1).unsqueeze(-1).to(q.dtype)  # (b? u j)
    pattern = "u j" if mask is None else "b u j"
    k_u, v_u = (einsum(pool, t, f"{pattern}, b h j d -> b h u d") for t in (k, v))
    has_real = None if mask is None else counts > 0  # a node without a real token is not read
    return softmax_attention(q, k_u, v_u, has_real, allowed=reads, scale=scale)


def level_sizes(n: int, ratio: int, levels: int | None = None) -> list[int]:
    """Spans per level when level l holds spans of ratio^l tokens; None levels: until one span."""
    sizes = [n]
    while (sizes[-1] > 1) if levels is None else (len(sizes) < levels):
        sizes.append(-(-sizes[-1] // ratio))
    return sizes


def span_members(n: int, ratio: int, levels: int | None = None, device=None) -> torch.Tensor:
    """`(u, j)` bool, True where token `j` lies in node `u`; the nodes of all levels one after
    another, `level_sizes` of them per level (the rows of `span_means`)."""
    j = torch.arange(n, device=device)
    return torch.cat([rearrange(torch.arange(size, device=device), "u -> u 1")
                      == j // ratio ** level
                      for level, size in enumerate(level_sizes(n, ratio, levels))])


def span_means(t: torch.Tensor, mask: torch.Tensor | None, *, ratio: int = 2,
               levels: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and real-token count of aligned spans: level l holds spans of ratio^l tokens.

    Args:
        t: `(b, h, n, d)`. mask: `(b, n)`, True = real token; None: all real.
        ratio: tokens of level l - 1 per span of level l.
        levels: how many levels; None means until one span holds everything.

    Returns:
        All levels in one table, level after level (`level_sizes` spans each): `means (b, h, nodes,
        d)` and `counts (b, nodes)`. A span with no real token has mean 0.
    """
    # a fill, not a product with the mask, so that NaN or inf at a padded token stays out of the
    # sums; contiguous first: summing neighbours of a strided view (the heads of a projection) is slow
    sums = (t if mask is None else t.masked_fill(~rearrange(mask, "b n -> b 1 n 1"), 0)).contiguous()
    counts = t.new_ones(t.shape[0], t.shape[2]) if mask is None else mask.to(t.dtype)
    level_sums, level_counts = [sums], [counts]
    while (counts.shape[-1] > 1) if levels is None else (len(level_sums) < levels):
        sums = reduce(pad_to_multiple(sums, ratio)[0], "b h (m r) d -> b h m d", "sum", r=ratio)
        counts = reduce(pad_to_multiple(counts, ratio, dim=-1)[0], "b (m r) -> b m", "sum", r=ratio)
        level_sums.append(sums)
        level_counts.append(counts)
    counts = torch.cat(level_counts, -1)
    means = torch.cat(level_sums, 2).div_(rearrange(counts.clamp(min=1), "b m -> b 1 m 1"))
    return means, counts


T = TypeVar("T")


def static_tables(build: Callable[..., T]) -> Callable[..., T]:
    """Memoise a builder of index tables that depend on sizes alone (its arguments hashable; up to
    8 of them kept). Under `torch.export` the tables are built afresh, since the tensors it traces
    must not enter the memo; `torch.compile` runs the builder eagerly (one graph break).

    The compiler's `disable` wrapper is made only once dynamo is loaded: making it imports dynamo,
    a second's work that a process which never compiles (a benchmark worker, the site build, a
    user's script) need not pay. It is made outside a trace whenever dynamo is loaded before the
    first call (a call compiled before any eager one counts one more graph break, once)."""
    memo = functools.lru_cache(maxsize=8)(build)
    skipped: list[Callable[..., T]] = []

    @functools.wraps(build)
    def tables(*args):
        if torch.compiler.is_exporting():
            return build(*args)
        if torch.compiler.is_compiling() or "torch._dynamo" in sys.modules:
            if not skipped:
                skipped.append(torch.compiler.disable(memo))
            return skipped[0](*args)
        return memo(*args)
    return tables


def _window(lo: Sequence[int], hi: Sequence[int], block: int) -> tuple[list[int], int] | None:
    """Group queries in blocks; each block reads one window of nodes covering its members' ranges.

    On plain integers (the ranges are static: `level_windows`).

    Returns:
        `starts`, each block's first node, and `width`, the widest block's window (every block
        reads `width` nodes from its start); None when every range is empty.
    """
    starts, width = [], 0
    for s in range(0, len(lo), block):
        read = [(a, b) for a, b in zip(lo[s:s + block], hi[s:s + block], strict=True) if a <= b]
        start = min((a for a, _ in read), default=0)
        starts.append(start)
        width = max([width] + [b - start + 1 for _, b in read])
    return (starts, width) if width else None


def level_windows(ranges, sizes: list[int], block: int,
                  device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block of queries, the windows of every level side by side (`_window` for each level).

    Args:
        ranges: `(level, lo, hi)` with `lo`, `hi` length-n lists of inclusive node indices.
        sizes: nodes per level (`level_sizes`).
        block: queries per block.
        device: where the tables go.

    Returns:
        `node (nb, w)`, rows of the all-level node table (`span_means`), and `keep (nb, block, w)`,
        True where the node is in the query's own range.
    """
    first = [sum(sizes[:level]) for level in range(len(sizes))]  # node u of level l: row first[l] + u
    node, keep = [], []
    for level, lo, hi in ranges:
        window = _window(lo, hi, block)
        if window is None:
            continue
        starts, width = window
        pad = (-len(lo)) % block  # padded queries read nothing
        lo_t = rearrange(torch.tensor([*lo, *[1] * pad], device=device), "(nb c) -> nb c 1", c=block)
        hi_t = rearrange(torch.tensor([*hi, *[0] * pad], device=device), "(nb c) -> nb c 1", c=block)
        start = rearrange(torch.tensor(starts, device=device), "nb -> nb 1 1")
        idx = start + torch.arange(width, device=device)  # (nb 1 w)
        node.append(first[level] + idx[:, 0].clamp(max=sizes[level] - 1))  # (nb w)
        keep.append((idx >= lo_t) & (idx <= hi_t) & (idx < sizes[level]))  # (nb c w)
    return torch.cat(node, -1), torch.cat(keep, -1)


def node_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                   ranges, *, ratio: int, levels: int | None = None,
                   scale: float | None = None) -> torch.Tensor:
    """One softmax over span nodes of several levels, each query reading a range of nodes per level.

    Args:
        q, k: `(b, h, n, d)`. v: `(b, h, n, e)`. mask: `(b, n)`, True = real token.
        ranges: `(level, lo, hi)` with `lo`, `hi` length-n tuples of inclusive node indices (their
            windows are memoised: pass the same ranges object for the same length); nodes without a
            real token are left out.
        ratio, levels: the spans, as in `span_means`.
        scale: score scale; None means `d ** -0.5`.

    Returns:
        `(b, h, n, e)`, as `window_attention`.
    """
    node, keep = _node_windows(tuple(ranges), q.shape[2], ratio, levels, q.device)
    return window_attention(q, k, v, mask, node, keep, ratio=ratio, levels=levels, scale=scale)


@static_tables
def _node_windows(ranges, n: int, ratio: int, levels: int | None, device: torch.device):
    return level_windows(ranges, level_sizes(n, ratio, levels), QUERY_BLOCK, device)


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
    k_all, counts = span_means(k, mask, ratio=ratio, levels=levels)  # (b h nodes d), (b nodes)
    v_all = span_means(v, mask, ratio=ratio, levels=levels)[0]
    keep = keep & (counts > 0)[:, node][:, :, None, :]  # (b nb c w)
    bias = (~keep).to(q.dtype) * neg_fill(q.dtype)  # added to the scores: 0 or the most negative
    nb, c, w = keep.shape[1:]
    q = rearrange(pad_to_multiple(q * scale, c)[0], "b h (nb c) d -> b h nb c d", c=c)
    # node rows of the flattened (b h nodes) table, so that a gather copies whole rows
    rows = rearrange(torch.arange(b * h, device=q.device) * k_all.shape[2], "bh -> bh 1 1") + node
    k_all, v_all = (rearrange(t, "b h m d -> (b h m) d") for t in (k_all, v_all))
    out = [q.new_empty(b, h, 0, c, v.shape[-1])]  # then one (b h B c e) per chunk of B blocks
    for i in range(0, nb, CHUNK):  # over chunks of query blocks, not tokens
        blocks = slice(i, i + CHUNK)
        index = rows[:, blocks]  # (bh B w)
        k_w, v_w = (t.index_select(0, index.flatten()).unflatten(0, (b, h, index.shape[1], w))
                    for t in (k_all, v_all))  # (b h B w d)
        scores = (q[:, :, blocks] @ k_w.transpose(-1, -2)).add_(bias[:, None, blocks])  # (b h B c w)
        out.append(scores.softmax(dim=-1) @ v_w)  # (b h B c e)
    return rearrange(torch.cat(out, dim=2), "b h nb c e -> b h (nb c) e")[:, :, :n]
