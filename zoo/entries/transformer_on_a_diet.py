r"""Transformer on a Diet.

Keep the Transformer but give each layer a sparse, WaveNet-like context instead of all previous
tokens. *Dilated*: layer $l$ attends to $k$ tokens spaced $\delta = b^l$ apart, so a stack of
layers covers an exponentially long context. *Dilated-memory*: layer $l$ also keeps the positions
of all lower layers' dilations. *Cascade*: layer $l$ attends to a window of $w\,b^l$ previous
tokens, growing with depth. Each costs $O(n k)$ per layer.

$$ O_i = \operatorname{softmax}_{j \in S_i}\!\big(Q_i K_j^\top/\sqrt{d}\big) V_j,\quad
   S_i = \bigcup_{\delta \in \Delta} \{i - \delta m : 0 \le m < k\} $$

with $\Delta = \{b^l\}$ (dilated), $\{b^0, \dots, b^l\}$ (dilated-memory), or $\delta = 1$ and
$k = w\,b^l$ (cascade).

Deviations from the paper:
- one layer of the stack: `layer` is its index $l$, which sets the dilation or window;
- one growth factor `base` for the dilation and the cascade window (the authors' runs use 2 for
  both);
- the paper is a language model (left context only); `causal=False` mirrors each set to the right
  ($|m| < k$).

`diet_attention_reference` is the key sets as a pattern under one softmax; `diet_attention`, what
the layer runs, gathers the bands block by block (tested equal).
"""

import math

import torch
from einops import einsum, rearrange

from zoo.core.checks import check_qkv, one_of, positive_int
from zoo.core.decoding import pattern_step
from zoo.core.masks import block_windows, neg_fill, pad_qkv
from zoo.core.shell import MultiHead
from zoo.core.softmax import softmax_attention

PATTERNS = ("dilated", "dilated-memory", "cascade")


def diet_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             mask: torch.Tensor | None = None, *, levels: list[tuple[int, int]],
                             causal: bool = False) -> torch.Tensor:
    """The paper's key sets as an allowed `(i, j)` pattern, and softmax over it: key `j` is in
    `S_i` when `i - j = dilation m` with `0 <= m <= reach` (`|m| <= reach` when not causal) for
    one of the levels. Same arguments as `diet_attention`."""
    n = q.shape[2]
    pos = torch.arange(n, device=q.device)
    gap = rearrange(pos, "i -> i 1") - rearrange(pos, "j -> 1 j")  # i - j
    allowed = torch.zeros(n, n, dtype=torch.bool, device=q.device)
    for dil, reach in levels:
        allowed |= (gap % dil == 0) & (gap.abs() <= dil * reach) & ((gap >= 0) | (not causal))
    return softmax_attention(q, k, v, mask, causal=causal, allowed=allowed)


def diet_levels(pattern: str, layer: int, kernel_size: int, base: int, window: int):
    """`[(dilation, reach), ...]`: the key sets of one layer, each `{i - dilation m : m <= reach}`."""
    if pattern == "cascade":
        return [(1, window * base ** layer - 1)]
    levels = range(layer + 1) if pattern == "dilated-memory" else [layer]
    return [(base ** level, kernel_size - 1) for level in levels]


def diet_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   mask: torch.Tensor | None = None, *, levels: list[tuple[int, int]],
                   causal: bool = False) -> torch.Tensor:
    """What the layer runs: `diet_attention_reference` without the `n x n` pattern. Each level
    is an undilated band over the positions of one residue mod its dilation, in blocks with their
    neighbours; the levels' scores share one softmax (tested equal).

    Args:
        q, k: `(b, h, n, d)`. v: `(b, h, n, e)`. mask: `(b, n)`, True = real token.
        levels: `(dilation, reach)` pairs; query i sees `i - dilation m` for `0 <= m <= reach`
            (`|m| <= reach` when not causal).
        causal: left context only.

    Returns:
        `(b, h, n, e)`.
    """
    check_qkv(q, k, v, mask, name="diet_attention")
    b, h, n, d = q.shape
    step = math.lcm(*(dil * max(reach, 1) for dil, reach in levels))
    q, k, v, real = pad_qkv(q, k, v, mask, step)
    after = 0 if causal else 1
    scores, values = [], []
    for level, (dil, reach) in enumerate(levels):
        c = max(reach, 1)

        def blocks(t, c=c, dil=dil):  # residue s = i mod dil; an undilated band over i // dil
            return rearrange(t, "b h (m c s) d -> b h s m c d", c=c, s=dil)

        def with_neighbours(t, c=c):  # block m with blocks m-1 .. m+after, zeros past the ends
            flat = rearrange(t, "b h s m c d -> b h s (m c) d")
            return rearrange(block_windows(flat, c, dim=3, after=after), "b h s m d w -> b h s m w d")

        pos = rearrange(torch.arange(q.shape[2], device=q.device), "n -> 1 1 n 1")
        i = blocks(pos)[0, 0, ..., 0]  # (s m c)
        j = with_neighbours(blocks(pos + 1))[0, 0, ..., 0] - 1  # (s m w); -1 past the ends
        m = (rearrange(i, "s m c -> s m c 1") - rearrange(j, "s m w -> s m 1 w")) // dil
        ok = (m >= 0) & (m <= reach) if causal else m.abs() <= reach
        for dil_low, reach_low in levels[:level]:  # a key a lower level already holds
            ok = ok & ~((m * dil % dil_low == 0) & ((m * dil // dil_low).abs() <= reach_low))
        key_ok = with_neighbours(blocks(rearrange(real, "b n -> b 1 n 1").float()))[:, 0, ..., 0]
        ok = rearrange(ok, "s m c w -> 1 1 s m c w") & rearrange(key_ok > 0,
                                                                   "b s m w -> b 1 s m 1 w")
        s = einsum(blocks(q), with_neighbours(blocks(k)), "b h s m c d, b h s m w d -> b h s m c w")
        s = (s * d ** -0.5).masked_fill(~ok, neg_fill(q.dtype))
        scores.append(rearrange(s, "b h s m c w -> b h (m c s) w"))
        values.append((with_neighbours(blocks(v)), blocks))
    attn = torch.cat(scores, dim=-1).softmax(dim=-1).split([s.shape[-1] for s in scores], dim=-1)
    out = 0
    for a, (vw, blocks) in zip(attn, values, strict=True):
        a = blocks(a)  # back to the level's (s m c) layout
        out = out + rearrange(einsum(a, vw, "b h s m c w, b h s m w e -> b h s m c e"),
                              "b h s m c e -> b h (m c s) e")
    return out[:, :, :n]


class TransformerOnADiet(MultiHead):
    """Multi-head attention with one layer's sparse pattern. `(b, n, dim) -> (b, n, dim)`.

    Args:
        pattern: `"dilated"`, `"dilated-memory"` or `"cascade"`.
        layer: index `l` of the layer in the stack (0 = bottom).
        kernel_size: `k`, keys per dilation.
        base: growth per layer: dilation `base ** l`, cascade window `window * base ** l`.
        window: the cascade window of the bottom layer.
    """

    def __init__(self, dim: int, *, heads: int = 8, dim_head: int | None = None,
                 causal: bool = False, pattern: str = "dilated", layer: int = 0,
                 kernel_size: int = 3, base: int = 2, window: int = 4):
        super().__init__(dim, heads=heads, dim_head=dim_head, causal=causal)
        self.pattern = one_of(pattern, PATTERNS, "pattern")
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
            raise ValueError(f"layer must be a non-negative int, got {layer!r}")
        self.layer = layer
        self.kernel_size = positive_int(kernel_size, "kernel_size")
        self.base = positive_int(base, "base")
        self.window = positive_int(window, "window")
        self.levels = diet_levels(pattern, layer, kernel_size, base, window)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        return diet_attention(q, k, v, mask, levels=self.levels, causal=self.causal)

    def attend_step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache,
                    mask: torch.Tensor | None = None, start: int = 0):
        """Decoding with a bounded cache: the keys of the last `max(dilation * reach)` positions."""
        furthest = max(dil * reach for dil, reach in self.levels)

        def allowed(i, j):
            return torch.stack([((i - j) % dil == 0) & ((i - j) <= dil * reach)
                                for dil, reach in self.levels]).any(dim=0)

        return pattern_step(q, k, v, cache, mask, start, allowed=allowed,
                            keep=lambda j, later: j >= later - furthest)
