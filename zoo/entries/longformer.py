r"""Longformer: The Long-Document Transformer.

Each token attends to a sliding window of $w/2$ tokens on each side, optionally dilated (every
$\delta$-th token, so the reach grows to $\delta w/2$ at the same cost), plus a few task-chosen
global tokens: every token attends to them and they attend to every token. Cost is linear in the
length. Global attention has its own projections $Q_g, K_g, V_g$, initialised as copies of the
local ones. For language modelling the window looks only to the left.

$$ O_i = \operatorname{softmax}_{j \in W_i \cup G}\!\big(Q_i K_j^\top/\sqrt{d}\big) V,\quad
   W_i = \{i + \delta m : |m| \le w/2\}; \qquad
   O_g = \operatorname{softmax}_j\!\big(Q_{g,g} K_{g,j}^\top/\sqrt{d}\big) V_g \ \ (g \in G) $$

Deviations from the paper:
- the global tokens are the first `global_tokens` positions (the paper picks them per task, e.g.
  [CLS] or the question);
- one window size and dilation for all heads (the paper varies them across layers and heads);
- `causal=True` keeps the left half of the window ($0 \le m \le w/2$, as in the paper's
  character-level LM) and restricts global attention to $j \le i$ (the paper has no causal global
  attention).

`longformer_attention_reference` is the pattern as an allowed `(i, j)` set and a dense softmax
over it (the global rows with their own projections). The fast path `longformer_attention`,
tested equal, computes the band only: each residue mod $\delta$ is an undilated band, cut into
blocks that read their neighbour blocks.
"""

import copy

import torch
import torch.nn.functional as F
from einops import einsum, rearrange

from zoo.core.checks import check_dtype, check_qkv, check_sequence, positive_int
from zoo.core.decoding import extend_kv, offset_causal, pattern_step
from zoo.core.masks import block_windows, neg_fill, pad_mask, pad_to_multiple
from zoo.core.shell import MultiHead
from zoo.core.softmax import softmax_attention


def longformer_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                   mask: torch.Tensor | None = None, *, window: int = 8,
                                   dilation: int = 1, global_tokens: int = 0, causal: bool = False,
                                   global_qkv: tuple | None = None) -> torch.Tensor:
    """`longformer_attention` as the paper's pattern: softmax over the allowed `(i, j)` set; the
    global rows with the global projections."""
    check_qkv(q, k, v, mask, name="longformer_attention")
    n = q.shape[2]
    g = min(global_tokens, n)
    allowed = longformer_pattern(n, window, dilation, global_tokens, causal=causal, device=q.device)
    out = softmax_attention(q, k, v, mask, causal=causal, allowed=allowed)
    if g == 0:
        return out
    qg, kg, vg = global_qkv or (q, k, v)
    out_g = softmax_attention(qg[:, :, :g], kg, vg, mask, causal=causal)  # (b h g e)
    return torch.cat([out_g, out[:, :, g:]], dim=2)


def longformer_pattern(n: int, window: int, dilation: int, global_tokens: int, *,
                       causal: bool = False, device=None) -> torch.Tensor:
    """`(i, j)` bool: key j is in query i's dilated window W_i, or i or j is global (causal: the
    left half of the window; `j <= i` is left to the causal mask)."""
    i = rearrange(torch.arange(n, device=device), "i -> i 1")
    j = rearrange(torch.arange(n, device=device), "j -> 1 j")
    m = (i - j) // dilation  # j = i - delta m, when (i - j) is a multiple of delta
    on_grid = (i - j) % dilation == 0
    in_window = on_grid & ((m >= 0) & (m <= window // 2) if causal else m.abs() <= window // 2)
    g = min(global_tokens, n)
    return in_window | (i < g) | (j < g)  # W_i, and the global rows and columns


def longformer_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         mask: torch.Tensor | None = None, *, window: int = 8, dilation: int = 1,
                         global_tokens: int = 0, causal: bool = False,
                         global_qkv: tuple | None = None) -> torch.Tensor:
    """Dilated sliding-window attention with global tokens.

    Args:
        q, k: `(b, h, n, d)`. v: `(b, h, n, e)`. mask: `(b, n)`, True = real token.
        window: `w`; each query sees `w // 2` window keys on each side (left only when causal).
        dilation: `delta`, the gap between window keys.
        global_tokens: the first positions, which attend and are attended everywhere.
        causal: keep only keys `j <= i`.
        global_qkv: `(q_g, k_g, v_g)` like q, k, v for the global rows; None reuses q, k, v.

    Returns:
        `(b, h, n, e)`.
    """
    check_qkv(q, k, v, mask, name="longformer_attention")
    b, h, n, d = q.shape
    if mask is not None:  # zeros at padded keys (a fill: NaN or inf there reaches nothing real)
        padded = rearrange(~mask, "b n -> b 1 n 1")
        k, v = (t.masked_fill(padded, 0.0) for t in (k, v))
        if global_qkv is not None:
            global_qkv = (global_qkv[0], *(t.masked_fill(padded, 0.0) for t in global_qkv[1:]))
    g, r = min(global_tokens, n), window // 2
    c, scale = max(r, 1), d ** -0.5
    (qp, pad), (kp, _), (vp, _) = (pad_to_multiple(t, c * dilation) for t in (q, k, v))
    real = pad_mask(mask, b, n, pad, q.device)
    real = torch.ones(b, n, dtype=torch.bool, device=q.device) if real is None else real
    pos = torch.arange(real.shape[1], device=q.device)

    # The window: residue s = i mod delta holds an undilated band over m = i // delta (eq. 1).
    def blocks(t):  # (b h n x) -> (bh s m c x)
        return rearrange(t, "b h (m c s) x -> (b h) s m c x", c=c, s=dilation)

    def residues(t):  # (b h n x) -> (bh s L x), L = n / delta
        return rearrange(t, "b h (L s) x -> (b h) s L x", s=dilation)

    after = 0 if causal else 1
    qb = blocks(qp * scale)
    # block m's keys: blocks m-1 .. m+after of its residue, as overlapping views (bh s m w x)
    kw, vw = (block_windows(residues(t), c, dim=2, after=after).movedim(-1, -2) for t in (kp, vp))
    key_ok = block_windows(residues(rearrange(real & (pos >= g), "b n -> b 1 n 1")), c, dim=2,
                           after=after, value=False)[..., 0, :]  # (b s m w): real, not global, in range
    # Query ci of a block and key wj of its window are c + ci - wj steps apart, in every block.
    steps = c + torch.arange(c, device=q.device)[:, None] - torch.arange(kw.shape[3], device=q.device)
    band = (steps >= 0) & (steps <= r) if causal else steps.abs() <= r  # (c w)
    ok_w = band & rearrange(key_ok, "b s m w -> b 1 s m 1 w")
    scores_w = einsum(qb, kw, "bh s m c d, bh s m w d -> bh s m c w")
    scores_w = rearrange(scores_w, "(b h) s m c w -> b h s m c w", b=b, h=h)
    # masked as an additive bias (0 or the most negative number): one add, cheaper than a fill
    scores_w = scores_w.add_((~ok_w).to(q.dtype) * neg_fill(q.dtype))

    # Every token attends to the global tokens (with the local projections).
    kg = rearrange(kp[:, :, :g], "b h g d -> (b h) g d")
    scores_g = einsum(qb, kg, "bh s m c d, bh g d -> bh s m c g")
    scores_g = rearrange(scores_g, "(b h) s m c g -> b h s m c g", b=b, h=h)
    ok_g = rearrange(real[:, :g], "b g -> b 1 1 1 1 g")
    if causal:
        i = blocks(rearrange(pos, "n -> 1 1 n 1"))[0, ..., 0]  # (s m c): each query's position
        ok_g = ok_g & (rearrange(i, "s m c -> s m c 1") >= torch.arange(g, device=q.device))
    scores_g = scores_g.masked_fill(~ok_g, neg_fill(q.dtype))

    attn = torch.cat([scores_w, scores_g], dim=-1).softmax(dim=-1)
    attn_w, attn_g = attn.split([scores_w.shape[-1], g], dim=-1)
    out = (einsum(attn_w, rearrange(vw, "(b h) s m w e -> b h s m w e", b=b, h=h),
                  "b h s m c w, b h s m w e -> b h s m c e")
           + einsum(attn_g, vp[:, :, :g], "b h s m c g, b h g e -> b h s m c e"))
    out = rearrange(out, "b h s m c e -> b h (m c s) e")[:, :, :n]
    if g == 0:
        return out

    # The global rows attend to every token, with their own projections (Sec. 3.1).
    qg, kg, vg = global_qkv or (q, k, v)
    scores = einsum(qg[:, :, :g], kg, "b h g d, b h j d -> b h g j") * scale
    ok = rearrange(real[:, :n], "b j -> b 1 1 j")
    if causal:
        ok = ok & (torch.arange(g, device=q.device)[:, None] >= torch.arange(n, device=q.device))
    out_g = einsum(scores.masked_fill(~ok, neg_fill(q.dtype)).softmax(-1), vg,
                   "b h g j, b h j e -> b h g e")
    return torch.cat([out_g, out[:, :, g:]], dim=2)


class Longformer(MultiHead):
    """Multi-head Longformer attention. `(b, n, dim) -> (b, n, dim)`.

    Args:
        window: `w`, the window (`w // 2` keys on each side).
        dilation: gap between window keys.
        global_tokens: how many leading positions are global; they get their own projections
            `to_qkv_global`, initialised as a copy of `to_qkv`.
    """

    def __init__(self, dim: int, *, heads: int = 8, dim_head: int | None = None,
                 causal: bool = False, window: int = 8, dilation: int = 1, global_tokens: int = 1):
        super().__init__(dim, heads=heads, dim_head=dim_head, causal=causal)
        self.window = positive_int(window, "window")
        self.dilation = positive_int(dilation, "dilation")
        if isinstance(global_tokens, bool) or not isinstance(global_tokens, int) or global_tokens < 0:
            raise ValueError(f"global_tokens must be a non-negative int, got {global_tokens!r}")
        self.global_tokens = global_tokens
        if global_tokens:
            self.to_qkv_global = copy.deepcopy(self.to_qkv)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        """The pattern with one set of projections for all rows: what `forward` computes while
        `to_qkv_global` equals `to_qkv` (as at initialisation), or with no global tokens."""
        return longformer_attention(q, k, v, mask, window=self.window, dilation=self.dilation,
                                    global_tokens=self.global_tokens, causal=self.causal)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        check_sequence(x, self.dim, mask, name=type(self).__name__)
        check_dtype(x, self, name=type(self).__name__)
        q, k, v = map(self.split_heads, self.to_qkv(x).chunk(3, dim=-1))
        global_qkv = None
        if self.global_tokens:  # global queries only for the global rows; their keys for all
            w_q, w_kv = self.to_qkv_global.weight.tensor_split([self.heads * self.dim_head])
            q_g = F.linear(x[:, :self.global_tokens], w_q)
            global_qkv = tuple(map(self.split_heads, (q_g, *F.linear(x, w_kv).chunk(2, dim=-1))))
        out = longformer_attention(q, k, v, mask, window=self.window, dilation=self.dilation,
                                   global_tokens=self.global_tokens, causal=self.causal,
                                   global_qkv=global_qkv)
        return self.to_out(self.merge_heads(out))

    def decode(self, x: torch.Tensor, cache, mask: torch.Tensor | None, start: int):
        """Decoding with a bounded cache: the keys of the global tokens and of the last
        `window // 2 * dilation` positions (all a later window reaches), plus the global rows' own
        keys while the chunk holds global rows."""
        g, reach, step = self.global_tokens, self.window // 2 * self.dilation, self.dilation
        local, glob = (None, None) if cache is None else cache
        q, k, v = map(self.split_heads, self.to_qkv(x).chunk(3, dim=-1))

        def allowed(i, j):  # a global key, or a window key of the query's residue
            return (j < g) | ((i - j <= reach) & ((i - j) % step == 0))

        def keep(j, later):
            return (j < g) | (j > later - 1 - reach)

        out, local = pattern_step(q, k, v, local, mask, start, allowed=allowed, keep=keep)
        rows = max(min(g - start, x.shape[1]), 0)  # global rows in this chunk
        if rows:  # they read every earlier token with their own projections (all global then)
            w_q, w_kv = self.to_qkv_global.weight.tensor_split([self.heads * self.dim_head])
            q_g = self.split_heads(F.linear(x[:, :rows], w_q))
            k_g, v_g = map(self.split_heads, F.linear(x[:, :rows], w_kv).chunk(2, dim=-1))
            k_g, v_g, m_g = glob = extend_kv(glob, k_g, v_g, None if mask is None else mask[:, :rows], start)
            out_g = softmax_attention(q_g, k_g, v_g, m_g, allowed=offset_causal(rows, start, x.device))
            out = torch.cat([out_g, out[:, :, rows:]], dim=2)
        return self.to_out(self.merge_heads(out)), (local, glob if start + x.shape[1] < g else None)
