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
`bp_attention_reference` is that equation: the nodes of each query walked one at a time
(`contextual_nodes`), then a softmax over the span means (`zoo.core.blocks.pooled_attention`).
The fast path `bp_attention`, tested equal, uses that each level's nodes of a query form one
contiguous range of node indices (`contextual_ranges`): a block of queries then reads one window
of nodes per level, and the attention is one batched product per chunk of blocks
(`zoo.core.blocks.window_attention`, shared with `multiscale-transformer`).

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

from zoo.core.blocks import level_sizes, level_windows, pooled_attention, static_tables, window_attention
from zoo.core.checks import check_qkv, positive_int
from zoo.core.shell import MultiHead

QUERY_BLOCK = 32  # queries that share one window of nodes per level (zoo.core.blocks)


def bp_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           mask: torch.Tensor | None = None, *, k_per_level: int = 4,
                           causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """`bp_attention` as the paper states it: every query's contextual nodes, walked one node at a
    time (`contextual_nodes`), as an `(i, u)` pattern over the span nodes; a node's key and value
    the mean over its real tokens; one softmax over the nodes read."""
    check_qkv(q, k, v, mask, name="bp_attention")
    n = q.shape[2]
    sizes = level_sizes(n, 2)
    first = [sum(sizes[:level]) for level in range(len(sizes))]  # node p of level l: row first[l] + p
    reads = torch.zeros(n, sum(sizes), dtype=torch.bool, device=q.device)
    for i in range(n):
        for level, p in contextual_nodes(n, k_per_level, i, causal=causal):
            reads[i, first[level] + p] = True
    return pooled_attention(q, k, v, mask, reads, ratio=2, scale=scale)


def contextual_nodes(n: int, k: int, i: int, *, causal: bool = False) -> set[tuple[int, int]]:
    """The `(level, index)` nodes token `i` reads, walked as the paper's binary partitioning
    describes: the token itself, then k nodes per level and side, fine to coarse; where the next
    level's first span would overlap what is covered, its uncovered half (one level down) is read
    instead. Causal: the left side only."""
    sizes = level_sizes(n, 2)
    nodes = {(0, i)}
    p, replace = i - 1, False  # left side, walking down to 0
    for level in range(len(sizes)):
        for t in range(k):
            if p < 0:
                break
            nodes.add((level - 1, 2 * p) if replace and t == 0 else (level, p))
            p -= 1
        replace, p = p % 2 == 0, p // 2
    if causal:
        return nodes
    p, replace = i + 1, False  # right side, walking up to the end
    for level, size in enumerate(sizes):
        for t in range(k):
            if p >= size:
                break
            node = (level - 1, 2 * p + 1) if replace and t == 0 else (level, p)
            if node[1] < sizes[node[0]]:  # a span past the end of the sequence is left out
                nodes.add(node)
            p += 1
        replace, p = p % 2 == 1, p // 2
    return nodes


def contextual_ranges(n: int, k: int, *, causal: bool = False) -> list[tuple[int, list[int], list[int]]]:
    """Per level, the contiguous range of nodes each query reads.

    Plain Python integers, not tensors: the ranges depend on the length alone, and computed from it
    they stay static under `torch.export`, `torch.compile` and the meta device (read back from a
    tensor, a window's width would be a data-dependent value).

    Returns:
        A list of `(level, lo, hi)`, `lo` and `hi` length-n lists of inclusive node indices at that
        level (an empty range has `lo > hi`). Level 0 comes once, the query's own token included;
        every other level once for the left side and, unless causal, once for the right side.
    """
    sizes = level_sizes(n, 2)
    out = []
    ptr, ovl = [i - 1 for i in range(n)], [False] * n  # left side, walking down to 0
    for level in range(len(sizes)):
        nxt = [p - k for p in ptr]
        ext = [x >= 0 and x % 2 == 0 for x in nxt]  # nxt straddles the next level's span: take it here
        # With ovl, this level's first node was read one level down (as that level's ext).
        hi = list(range(n)) if level == 0 else [p - o for p, o in zip(ptr, ovl, strict=True)]
        out.append((level, [max(x + 1 - e, 0) for x, e in zip(nxt, ext, strict=True)], hi))
        ptr, ovl = [x // 2 for x in nxt], ext
    if causal:
        return out
    ptr, ovl = [i + 1 for i in range(n)], [False] * n  # right side, walking up to n - 1
    for level, size in enumerate(sizes):
        nxt = [p + k for p in ptr]
        ext = [x % 2 == 1 for x in nxt]  # nxt straddles the next level's span (past the end: clipped)
        hi = [min(x - 1 + e, size - 1) for x, e in zip(nxt, ext, strict=True)]
        if level == 0:  # one contiguous range: left, the token itself, right
            out[0] = (0, out[0][1], hi)
        else:
            out.append((level, [p + o for p, o in zip(ptr, ovl, strict=True)], hi))
        ptr, ovl = [x // 2 for x in nxt], ext
    return out


@static_tables
def contextual_windows(n: int, k: int, causal: bool, block: int, device: torch.device):
    """`level_windows` of `contextual_ranges`: they depend on the length, not on the tokens, so
    they are built once per length (`static_tables`: a memo of up to 8 lengths)."""
    return level_windows(contextual_ranges(n, k, causal=causal), level_sizes(n, 2), block, device)


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
