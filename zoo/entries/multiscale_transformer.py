r"""Multi-scale Transformer Language Models.

The paper studies language models that see text at several scales at once. Its retina model
does it inside one attention layer, the way a retina sees: sharply at the centre, coarsely in the
periphery. Keys and values are average-pooled into blocks of $r^s$ tokens for scales
$s = 0, \dots, S-1$, and a query reads a window of $w$ positions on each side at every scale,
so the near context is read token by token and the far context through ever larger block means.
Every query reads $S (2w + 1)$ positions: the cost is linear in the length.

$$ O_i = \sum_{s=0}^{S-1} \sum_{u \in W_s(i)}
   \operatorname{softmax}_{(s, u)}\!\big(q_i^\top \bar k^s_u / \sqrt d\big)\, \bar v^s_u,
   \qquad \bar k^s_u = \tfrac{1}{r^s} \sum_{j = u r^s}^{(u+1) r^s - 1} k_j $$

$W_s(i) = \{c - w, \dots, c + w\}$ with $c = \lfloor i / r^s \rfloor$ the query's own block; when
causal, $\{i - w, \dots, i\}$ at scale 0 and $\{c - w, \dots, c - 1\}$ (complete blocks only) above.
With one scale and $w \ge n$ this is softmax attention.

Deviations from the paper:
- Only the retina model's attention is here; the paper's bottom-up and top-down models are whole
  networks (pooling and upsampling between groups of layers), not one attention layer.
- Where the windows sit is this reference's choice: aligned to each scale's grid of pooled blocks
  and overlapping across scales (the near context is read at every scale), one softmax over all.

`retina_attention_reference` is the formula: the pattern of $W_s(i)$ over the pooled blocks of all
scales and one softmax (`zoo.core.blocks.pooled_attention`). The fast path `retina_attention`,
tested equal, reads each scale's blocks as one range per query and shares the windowed machinery
of `bp-transformer` (`zoo.core.blocks.node_attention`).
"""

import functools

import torch
from einops import rearrange, reduce

from zoo.core.blocks import level_sizes, node_attention, pooled_attention
from zoo.core.checks import check_qkv, positive_int
from zoo.core.shell import MultiHead
from zoo.core.softmax import softmax_attention


def retina_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               mask: torch.Tensor | None = None, *, window: int = 8, ratio: int = 4,
                               scales: int = 3, causal: bool = False,
                               scale: float | None = None) -> torch.Tensor:
    """`retina_attention` as the formula: query i reads block u of scale s for u in W_s(i); the
    blocks of all scales, as means over their real tokens, share one softmax."""
    check_qkv(q, k, v, mask, name="retina_attention")
    n = q.shape[2]
    i = rearrange(torch.arange(n, device=q.device), "i -> i 1")
    reads = []
    for s, size in enumerate(level_sizes(n, ratio, scales)):
        u, own = torch.arange(size, device=q.device), i // ratio ** s  # (u), (i 1)
        if causal:  # the tokens i - w .. i; above, the w complete blocks before the query's own
            w_s = (u >= i - window) & (u <= i) if s == 0 else (u >= own - window) & (u < own)
        else:
            w_s = (u - own).abs() <= window
        reads.append(w_s)  # (i u)
    return pooled_attention(q, k, v, mask, torch.cat(reads, -1), ratio=ratio, levels=scales,
                            scale=scale)


@functools.lru_cache(maxsize=8)
def retina_ranges(n: int, window: int, ratio: int, scales: int, *,
                  causal: bool = False) -> tuple[tuple[int, tuple[int, ...], tuple[int, ...]], ...]:
    """Per scale, the range of pooled blocks each query reads.

    Plain Python integers, static in the length (as `bp_transformer.contextual_ranges`); memoised,
    so the same length gives the same object (`node_attention` memoises its windows on it).

    Returns:
        `(scale, lo, hi)` per scale, `lo` and `hi` length-n tuples of inclusive block indices.
    """
    out = []
    for scale in range(scales):
        size = -(-n // ratio ** scale)
        own = [i // ratio ** scale for i in range(n)]
        if causal:  # a coarse block is read once complete
            hi = list(range(n)) if scale == 0 else [o - 1 for o in own]
        else:
            hi = [o + window for o in own]
        out.append((scale, tuple(max(o - window, 0) for o in own), tuple(min(h, size - 1) for h in hi)))
    return tuple(out)


def retina_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     mask: torch.Tensor | None = None, *, window: int = 8, ratio: int = 4,
                     scales: int = 3, causal: bool = False,
                     scale: float | None = None) -> torch.Tensor:
    """Multi-scale (retina) attention.

    Args:
        q, k: `(b, h, n, d)`. v: `(b, h, n, e)`. mask: `(b, n)`, True = real token.
        window: positions read on each side at every scale.
        ratio: tokens per block grow by this factor from one scale to the next.
        scales: number of scales (scale 0 is the tokens themselves).
        causal: read only the token itself, earlier tokens and complete earlier blocks.
        scale: score scale; None means `d ** -0.5`.

    Returns:
        `(b, h, n, e)`.
    """
    check_qkv(q, k, v, mask, name="retina_attention")
    ranges = retina_ranges(q.shape[2], window, ratio, scales, causal=causal)
    return node_attention(q, k, v, mask, ranges, ratio=ratio, levels=scales, scale=scale)


class MultiscaleTransformer(MultiHead):
    """Multi-head retina attention. `(b, n, dim) -> (b, n, dim)`.

    Args:
        window: positions read on each side at every scale.
        ratio: pooling factor between consecutive scales (at least 2).
        scales: number of scales; `scales=1` with `window >= n` is softmax attention.
    """

    def __init__(self, dim: int, *, heads: int = 8, dim_head: int | None = None,
                 causal: bool = False, window: int = 8, ratio: int = 4, scales: int = 3):
        super().__init__(dim, heads=heads, dim_head=dim_head, causal=causal)
        self.window = positive_int(window, "window")
        self.ratio = positive_int(ratio, "ratio")
        if ratio < 2:
            raise ValueError(f"ratio must be at least 2, got {ratio}")
        self.scales = positive_int(scales, "scales")

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        return retina_attention(q, k, v, mask, window=self.window, ratio=self.ratio,
                                scales=self.scales, causal=self.causal)

    def attend_step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache,
                    mask: torch.Tensor | None = None, start: int = 0):
        """Decoding with a bounded cache: the last `(window + 1) ratio^(scales - 1)` tokens hold
        every block a later query reads; the blocks' means are taken from them at each step."""
        w, t = self.window, q.shape[2]
        weight = torch.ones_like(k[:, 0, :, 0]) if mask is None else mask.to(k.dtype)  # (b n)
        if cache is not None:
            k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
            weight = torch.cat([cache[2], weight], dim=1)
        first, end = start + t - k.shape[2], start + t  # positions of the kept tokens
        i = torch.arange(start, end, device=q.device)[:, None]
        keys, values, live, allowed = [], [], [], []
        for scale in range(self.scales):
            size = self.ratio ** scale
            lo, hi = -(-first // size), end // size  # the blocks wholly kept: lo <= u < hi
            if hi <= lo:
                continue
            part = slice(lo * size - first, hi * size - first)
            counts = reduce(weight[:, part], "b (u r) -> b u", "sum", r=size)
            for t_all, out in ((k, keys), (v, values)):
                sums = reduce(t_all[:, :, part] * weight[:, None, part, None], "b h (u r) d -> b h u d",
                              "sum", r=size)
                out.append(sums / counts.clamp(min=1)[:, None, :, None])
            u, own = torch.arange(lo, hi, device=q.device), i // size
            # as retina_ranges: tokens i - w .. i at scale 0, complete blocks own - w .. own - 1 above
            allowed.append((u >= own - w) & (u <= (i if scale == 0 else own - 1)))
            live.append(counts > 0)
        out = softmax_attention(q, torch.cat(keys, dim=2), torch.cat(values, dim=2),
                                torch.cat(live, dim=1), allowed=torch.cat(allowed, dim=1))
        cut = max(k.shape[2] - (w + 1) * self.ratio ** (self.scales - 1), 0)
        return out, (k[:, :, cut:], v[:, :, cut:], weight[:, cut:])

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, window={self.window}, ratio={self.ratio}, "
                f"scales={self.scales}")
