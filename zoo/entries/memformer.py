r"""Memformer: The Memory-Augmented Transformer.

A fixed number of memory slots carries information from one segment to the next. Tokens of a
segment read the slots (here in the same softmax as their own segment); then every slot writes:
it attends to itself and to the segment's outputs, but not to the other slots, so slots do not
blur into each other. A learned bias added before normalising each slot to unit length lets
unused slots drift back to a fixed state (the paper's forgetting mechanism). The state between
segments has constant size, so time is linear in the length.

$$ Y_t = \operatorname{softmax}\!\big(Q_t\,[K(M_t); K_t]^\top / \sqrt{d} + M\big)\,[V(M_t); V_t],
   \qquad m^i_{t+1} = \frac{\hat m^i + b^i}{\lVert \hat m^i + b^i \rVert},\quad
   \hat m^i = \operatorname{softmax}\!\big(q(m^i_t)\,[k(m^i_t); k(Y_t)]^\top / \sqrt{d}\big)\,
   [v(m^i_t); v(Y_t)] $$

`forward(x)` projects all tokens at once, then reads and writes the memory segment after segment
(`read_write`); `step` is the streaming form that takes and returns the memory
`(b, num_slots, dim)`, and runs the same `read_write` on one segment.

Deviations from the paper:
- one layer instead of the encoder-decoder: a segment's self-attention and its memory read share
  one softmax over [memory; segment] (the paper has separate self- and cross-attention
  sublayers), and the slots write from this layer's outputs (the paper: the last encoder layer's);
- no relative position encodings;
- plain back-propagation through the segments: memory replay back-propagation (MRBP) computes the
  same gradients with less memory and is a training procedure, not part of the layer;
- `causal=False` lets a token see its whole segment; `causal=True` masks later tokens of the
  segment (the memory only ever holds earlier segments).
"""

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from torch import nn

from zoo.core.checks import check_sequence, positive_int
from zoo.core.masks import masked_fill_scores, neg_fill, zero_padded_tokens
from zoo.core.shell import MultiHead


class Memformer(MultiHead):
    """Memory-slot attention over segments. `(b, n, dim) -> (b, n, dim)`.

    Args:
        segment_len: tokens per segment.
        num_slots: memory slots, `r`.
    """

    def __init__(self, dim: int, *, heads: int = 8, dim_head: int | None = None, causal: bool = False,
                 segment_len: int = 128, num_slots: int = 16):
        super().__init__(dim, heads=heads, dim_head=dim_head, causal=causal)
        self.segment_len = positive_int(segment_len, "segment_len")
        self.num_slots = positive_int(num_slots, "num_slots")
        inner, self.scale = self.heads * self.dim_head, self.dim_head ** -0.5
        self.initial_memory = nn.Parameter(F.normalize(torch.randn(num_slots, dim), dim=-1))
        self.write_q = nn.Linear(dim, inner, bias=False)
        self.write_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.write_out = nn.Linear(inner, dim)
        self.memory_bias = nn.Parameter(torch.zeros(num_slots, dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        check_sequence(x, self.dim, mask, name=type(self).__name__, layer=self)
        x = zero_padded_tokens(x, mask)
        # The tokens' queries, keys and values do not depend on the memory: one projection for
        # all segments; only the read and the write run segment after segment.
        tokens = list(zip(*(t.split(self.segment_len, dim=2) for t in self.token_qkv(x)), strict=True))
        keeps = [None] * len(tokens) if mask is None else mask.split(self.segment_len, dim=1)
        outs, memory = [], self.first_memory(x)
        for (q, k, v), segment_keep in zip(tokens, keeps, strict=True):
            out, memory = self.read_write(q, k, v, memory, segment_keep)
            outs.append(out)
        return torch.cat(outs, dim=1)

    def token_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(b, n, dim)` -> q (already scaled by $1/\\sqrt{d}$), k, v `(b, h, n, d)`."""
        q, k, v = map(self.split_heads, self.to_qkv(x).chunk(3, dim=-1))
        return q * self.scale, k, v

    def first_memory(self, x: torch.Tensor) -> torch.Tensor:
        """The learned initial memory `(b, r, dim)`, a copy per sample (not a view)."""
        return self.initial_memory.to(x.dtype).repeat(x.shape[0], 1, 1)

    def step(self, x: torch.Tensor, memory: torch.Tensor | None = None,
             mask: torch.Tensor | None = None):
        """One segment: read the memory, then write it.

        Args:
            x: `(b, n, dim)`, the next segment. memory: `(b, r, dim)`; None is the learned initial
                memory. mask: `(b, n)`, True = real token.

        Returns:
            `(out, memory)`: `(b, n, dim)` and the next memory `(b, r, dim)`.
        """
        check_sequence(x, self.dim, mask, name=type(self).__name__, layer=self)
        x = zero_padded_tokens(x, mask)
        memory = self.first_memory(x) if memory is None else memory
        return self.read_write(*self.token_qkv(x), memory, mask)

    def read_write(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, memory: torch.Tensor,
                   keep: torch.Tensor | None):
        """The segment's projected tokens q, k, v `(b, h, n, d)` read the memory `(b, r, dim)`;
        then the memory is written. keep `(b, n)`, True = real token (None: all real). Returns
        `(out, memory)`."""
        n, inner = q.shape[2], self.heads * self.dim_head
        # Memory reading: each token attends to every slot and to its own segment.
        k_m, v_m = map(self.split_heads, (memory @ self.to_qkv.weight[inner:].T).chunk(2, dim=-1))
        k, v = torch.cat([k_m, k], dim=2), torch.cat([v_m, v], dim=2)  # (b h r+n d)
        allowed = None if keep is None else rearrange(F.pad(keep, (self.num_slots, 0), value=True),
                                                      "b j -> b 1 1 j")
        if self.causal:
            earlier = torch.ones(n, n + self.num_slots, dtype=torch.bool,
                                 device=q.device).tril(self.num_slots)
            allowed = earlier if allowed is None else allowed & earlier
        scores = einsum(q, k, "b h i d, b h j d -> b h i j")
        attn = masked_fill_scores(scores, allowed).softmax(dim=-1)
        out = self.to_out(self.merge_heads(einsum(attn, v, "b h i j, b h j e -> b h i e")))
        return out, self.write(memory, out, keep)

    def write(self, memory: torch.Tensor, y: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """Memory writing: slot i attends to [slot i; the segment's real outputs], then the
        forgetting step: add the slot's bias and normalise to unit length."""
        q = self.split_heads(self.write_q(memory)) * self.scale  # (b h r d)
        k_m, v_m = map(self.split_heads, self.write_kv(memory).chunk(2, dim=-1))  # (b h r d)
        w_k, w_v = (rearrange(w, "(h d) x -> h d x", h=self.heads) for w in self.write_kv.weight.chunk(2))
        # r slots read n >> r tokens: fold the key weights into the slots' queries, and weight the
        # tokens before the value weights, instead of projecting every token (same sums, ~r/n the work).
        own = einsum(q, k_m, "b h r d, b h r d -> b h r")[..., None]
        tokens = einsum(einsum(q, w_k, "b h r d, h d x -> b h r x"), y, "b h r x, b n x -> b h r n")
        if keep is not None:
            tokens = tokens.masked_fill(~rearrange(keep, "b n -> b 1 1 n"), neg_fill(tokens.dtype))
        attn = torch.cat([own, tokens], dim=-1).softmax(dim=-1)  # (b h r 1+n)
        read = einsum(attn[..., 1:], y, "b h r n, b n x -> b h r x")
        new = attn[..., :1] * v_m + einsum(read, w_v, "b h r x, h e x -> b h r e")
        return F.normalize(self.write_out(self.merge_heads(new)) + self.memory_bias, dim=-1)
