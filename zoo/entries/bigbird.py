r"""Big Bird: Transformers for Longer Sequences.

Three sparse parts in blocks of $c$ tokens: each query block attends to its own and the two
neighbouring key blocks (window), to $g$ global blocks, and to $r$ random key blocks; the global
blocks attend to everything. The random part makes the graph an expander, so information mixes
in few layers, and the global blocks make the model a universal approximator; all at linear cost.

$$ O_B = \operatorname{softmax}\!\big(Q_B K_{S(B)}^\top/\sqrt{d}\big) V_{S(B)},\quad
   S(B) = \{B-1, B, B+1\} \cup \{0, .., g-1\} \cup R(B) $$

(in blocks; a global block $B < g$ has $S(B)$ = every block).

Deviations from the paper:
- the global blocks are the first `global_blocks` blocks by default; `global_at="ends"` puts
  the last `global_blocks // 2` of them at the end instead: with 2 global blocks, the first and
  the last block, as the authors' code and transformers' `BigBirdBlockSparseAttention` (ITC) lay
  them out (tested equal to it in training mode, with its random blocks; in eval mode
  transformers takes every random block to be block 0, so that block enters each middle row's
  softmax r + 1 times, where ours keeps its random blocks);
- $R(B)$ is drawn once, at construction, from a generator seeded with `seed`: the buffer `draw`,
  `(h, nb, r)` random integers, picks without replacement from the blocks that are neither window
  nor global at the length at hand, so the pattern is fixed in eval and training mode alike.

`bigbird_attention_reference` is the pattern $S(B)$ as an allowed `(i, j)` set and one dense
softmax over it. The fast path `bigbird_attention`, tested equal, never builds that set: it
gathers each query block's key blocks, in chunks of query blocks that stay in cache, and runs the
global blocks' rows through torch's fused softmax attention.
"""

import math

import torch
import torch.nn.functional as F
from einops import rearrange, repeat

from zoo.core.checks import check_qkv, one_of, positive_int, refuse_causal
from zoo.core.masks import neg_fill, pad_mask, pad_to_multiple
from zoo.core.shell import MultiHead
from zoo.core.softmax import softmax_attention

CHUNK = 16  # query blocks per pass of the block attention


def bigbird_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                mask: torch.Tensor | None = None, *, block: int = 64,
                                global_blocks: int = 2,
                                random: torch.Tensor | None = None) -> torch.Tensor:
    """`bigbird_attention` as the paper's pattern: softmax over the allowed `(i, j)` set."""
    check_qkv(q, k, v, mask, name="bigbird_attention")
    allowed = bigbird_pattern(q.shape[2], block, global_blocks, random, device=q.device)
    return softmax_attention(q, k, v, mask, allowed=allowed)  # (b h n e)


def bigbird_pattern(n: int, block: int, global_blocks: int, random: torch.Tensor | None,
                    device=None) -> torch.Tensor:
    """`(h, i, j)` (`(1, i, j)` without random blocks): query i reads key j when j's block is in
    S(i's block), or when i's block is global.

    Args:
        random: `(h, nb, r)` random key blocks per query block, -1 = none; None: no random part.
    """
    nb = -(-n // block)
    g = min(global_blocks, nb)
    qb = rearrange(torch.arange(n, device=device) // block, "i -> i 1")  # query blocks B
    kb = rearrange(torch.arange(n, device=device) // block, "j -> 1 j")  # key blocks C
    window = (qb - kb).abs() <= 1  # C in {B - 1, B, B + 1}
    glob = (qb < g) | (kb < g)  # C global, or B global (it reads every block)
    if random is None:
        return (window | glob)[None]
    # R(B): the key blocks drawn for B, as an (h, B, C) table; -1 matches no block
    drawn = (random[..., None] == torch.arange(nb, device=device)).any(-2)
    return window | glob | drawn[:, qb, kb]


def draw_random_blocks(draw: torch.Tensor, nb: int, global_blocks: int) -> torch.Tensor:
    """Distinct random key blocks per query block, none of them window or global blocks.

    Args:
        draw: `(h, >= nb, r)` random non-negative integers.
        nb: number of blocks.

    Returns:
        `(h, nb, r)` block indices, -1 where fewer than `r` blocks are eligible.
    """
    draw = draw[:, :nb]
    query = torch.arange(nb, device=draw.device)[:, None]
    window = query + torch.arange(-1, 2, device=draw.device)  # (nb 3), ascending
    in_window = (window >= global_blocks) & (window < nb)
    eligible = nb - global_blocks - in_window.sum(-1)  # (nb)
    chosen = []
    for t in range(draw.shape[-1]):
        rank = draw[..., t] % (eligible - t).clamp(min=1)  # among the blocks left
        for taken in torch.stack(chosen, -1).sort(-1).values.unbind(-1) if chosen else []:
            rank = rank + (rank >= taken)  # skip ranks drawn before: no replacement
        chosen.append(rank)
    block = torch.stack(chosen, -1) + global_blocks  # (h nb r), rank among eligible -> block
    for w in range(3):  # skip the window blocks, in ascending order
        block = block + (in_window[:, w:w + 1] & (block >= window[:, w:w + 1]))
    valid = torch.arange(draw.shape[-1], device=draw.device) < eligible[:, None]
    return torch.where(valid, block, -1)


def bigbird_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      mask: torch.Tensor | None = None, *, block: int = 64, global_blocks: int = 2,
                      random: torch.Tensor | None = None) -> torch.Tensor:
    """Blocked window + global + random attention.

    Args:
        q, k: `(b, h, n, d)`. v: `(b, h, n, e)`. mask: `(b, n)`, True = real token.
        block: `c`, the block length.
        global_blocks: `g`, leading blocks that attend and are attended everywhere.
        random: `(h, nb, r)` random key blocks per query block (-1 = none), `nb = ceil(n / c)`;
            None means no random part.

    Returns:
        `(b, h, n, e)`.
    """
    check_qkv(q, k, v, mask, name="bigbird_attention")
    b, h, n, d = q.shape
    if mask is not None:  # zeros at padded keys (a fill: NaN or inf there reaches nothing real)
        k, v = (t.masked_fill(rearrange(~mask, "b n -> b 1 n 1"), 0.0) for t in (k, v))
    (qp, pad), (kp, _), (vp, _) = (pad_to_multiple(t, block) for t in (q, k, v))
    real = pad_mask(mask, b, n, pad, q.device)
    nb, g = qp.shape[2] // block, min(global_blocks, qp.shape[2] // block)
    random = q.new_full((h, nb, 0), -1, dtype=torch.long) if random is None else random
    scale = d ** -0.5

    # S(B) of each query block B as s = 3 + g + r key-block indices: window, global, random. The
    # global query blocks get one too, to keep the blocks a plain view; their rows are replaced.
    query = torch.arange(nb, device=q.device)[:, None]  # (nb 1)
    near = query + torch.arange(-1, 2, device=q.device)  # (nb 3)
    glob = torch.arange(g, device=q.device).expand(nb, g)  # (nb g)
    sel = torch.cat([near, glob], -1).expand(h, -1, -1)  # (h nb s)
    sel = torch.cat([sel, random], -1)
    ok = torch.cat([(near >= g) & (near < nb), glob >= 0], -1).expand(h, -1, -1)
    ok = torch.cat([ok, random >= 0], -1)  # (h nb s), False: no block there
    sel, s = sel.clamp(0, nb - 1), sel.shape[-1]
    # S(B) as indices into the flattened (b h nb) key blocks, and an additive mask on its scores:
    # 0 on the keys of S(B), the most negative number on missing blocks and padding
    flat = rearrange(torch.arange(b * h, device=q.device) * nb, "(b h) -> b h 1 1", b=b, h=h) + sel
    flat = rearrange(flat, "b h nb s -> (b h nb) s")
    key_ok = repeat(ok, "h nb s -> b h nb s c", b=b, c=block)
    if real is not None:
        key_ok = key_ok & rearrange(real, "b (nb c) -> b nb c", c=block)[:, sel]
    bias = rearrange((~key_ok).to(q.dtype) * neg_fill(q.dtype), "b h nb s c -> (b h nb) 1 (s c)")

    # Query blocks in chunks of CHUNK: a chunk's gathered keys and values, scores and weights
    # stay in cache, and no (b h nb c (s c)) tensor is built.
    q_blk, k_blk, v_blk = (rearrange(t, "b h (nb c) d -> (b h nb) c d", c=block) for t in (qp, kp, vp))
    out = [q.new_empty(0, block, v.shape[-1])]  # then one (B c e) per chunk of B query blocks
    for i in range(0, q_blk.shape[0], CHUNK):  # over chunks of query blocks, not tokens
        blocks = slice(i, i + CHUNK)
        k_s, v_s = (rearrange(t.index_select(0, flat[blocks].flatten()), "(B s) c d -> B (s c) d", s=s)
                    for t in (k_blk, v_blk))  # K_S(B), V_S(B)
        scores = torch.baddbmm(bias[blocks], q_blk[blocks], k_s.transpose(1, 2), alpha=scale)  # (B c w)
        out.append(torch.bmm(scores.softmax(dim=-1), v_s))  # (B c e)
    out = rearrange(torch.cat(out), "(b h nb) c e -> b h (nb c) e", b=b, h=h, nb=nb)

    # the global blocks attend to every key: softmax attention, by torch's fused kernel (on the
    # blocks' contiguous copies of q, k, v)
    qp, kp, vp = (rearrange(t, "(b h nb) c d -> b h (nb c) d", b=b, h=h, nb=nb)
                  for t in (q_blk, k_blk, v_blk))
    key_bias = None if real is None else rearrange(
        (~real).to(q.dtype) * neg_fill(q.dtype), "b j -> b 1 1 j")
    out[:, :, :g * block] = F.scaled_dot_product_attention(qp[:, :, :g * block], kp, vp,
                                                           attn_mask=key_bias, scale=scale)
    return out[:, :, :n]


class BigBird(MultiHead):
    """Multi-head BigBird (ITC) attention. `(b, n, dim) -> (b, n, dim)`. Not causal.

    Args:
        block: block length `c`.
        global_blocks: leading global blocks `g`.
        random_blocks: random key blocks `r` per query block.
        max_len: longest sequence; the random draw covers `ceil(max_len / block)` query blocks.
        seed: seed of the random draw.
        global_at: `"start"` (the first `g` blocks are global) or `"ends"` (the first
            `g - g // 2` and the last `g // 2` blocks; with g = 2 transformers' layout).
    """

    def __init__(self, dim: int, *, heads: int = 8, dim_head: int | None = None,
                 causal: bool = False, block: int = 64, global_blocks: int = 2,
                 random_blocks: int = 3, max_len: int = 16384, seed: int = 0,
                 global_at: str = "start"):
        refuse_causal(type(self).__name__, causal)
        super().__init__(dim, heads=heads, dim_head=dim_head, causal=False)
        self.block = positive_int(block, "block")
        self.global_blocks = positive_int(global_blocks, "global_blocks")
        self.random_blocks = positive_int(random_blocks, "random_blocks")
        self.max_len = positive_int(max_len, "max_len")
        self.global_at = one_of(global_at, ("start", "ends"), "global_at")
        g = torch.Generator().manual_seed(seed)
        # integers, so that casting the layer to another dtype leaves the draw alone
        self.register_buffer("draw", torch.randint(2 ** 62, (heads, math.ceil(max_len / block),
                                                              random_blocks), generator=g))

    def random(self, n: int) -> torch.Tensor:
        """`(h, nb, r)`: the random key blocks of each query block at length `n`."""
        if n > self.max_len:
            raise ValueError(f"{type(self).__name__}: sequence length {n} exceeds max_len="
                             f"{self.max_len}; build the layer with a larger max_len")
        return draw_random_blocks(self.draw, math.ceil(n / self.block), self.global_blocks)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.global_at == "start":
            return bigbird_attention(q, k, v, mask, block=self.block,
                                     global_blocks=self.global_blocks, random=self.random(q.shape[2]))
        # "ends": the pattern is the same up to the order of the blocks, so roll the last g // 2
        # blocks (after padding to whole blocks) to the front, attend, and roll back
        b, _, n, _ = q.shape
        (q, pad), (k, _), (v, _) = (pad_to_multiple(t, self.block) for t in (q, k, v))
        real = pad_mask(mask, b, n, pad, q.device)
        shift = self.global_blocks // 2 * self.block
        q, k, v = (t.roll(shift, dims=2) for t in (q, k, v))
        real = None if real is None else real.roll(shift, dims=1)
        out = bigbird_attention(q, k, v, real, block=self.block, global_blocks=self.global_blocks,
                                random=self.random(q.shape[2]))
        return out.roll(-shift, dims=2)[:, :, :n]
