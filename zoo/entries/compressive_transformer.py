r"""Compressive Transformers for Long-Range Sequence Modelling.

Transformer-XL with a second, coarser memory. A long input is read segment by segment; each segment
attends to itself, to a FIFO memory of the last `mem_len` inputs, and to a compressed memory. Inputs
that fall out of the FIFO memory are not dropped but compressed, `compression_rate` of them into one
slot, by a learned strided convolution, and the compressed memory keeps the last `cmem_len` slots.
Per segment the cost is fixed, so a sequence of length n costs time linear in n, and the layer
reaches `mem_len + compression_rate * cmem_len` tokens back.

$$ O_t = \operatorname{softmax}\!\big(Q_t\,[K_{cm}; K_m; K_t]^\top / \sqrt{d} + M\big)\,[V_{cm}; V_m; V_t],
   \qquad cm \leftarrow \big[cm;\ f_c(m_{\text{old}})\big]_{-n_{cm}:},\ \ m \leftarrow [m; X_t]_{-n_m:} $$

with $f_c$ a 1D convolution of kernel and stride $c$, and $M$ the causal mask inside the segment.

Two forms that must agree (tested): `forward(x)` computes all segments at once (each segment's
memories are windows of the input and of its compression), `step(segment, memory)` is the
streaming form of the paper's Algorithm 1 that carries `(memory, compressed memory)`.

Deviations from the paper:
- no relative position encodings: attention is on content only, positions come from outside;
- memories are not stop-gradient, so the compression network learns from the task loss; the
  paper stops gradients at the memories and trains $f_c$ only with its auxiliary
  attention-reconstruction loss (a training choice; forward values are the same);
- memories start empty instead of as zero vectors, so the first segment is plain attention;
- memory is evicted `compression_rate` tokens at a time, so `step` takes segments of any length
  (with `segment_len` and `mem_len` multiples of `compression_rate`, as required here, it is the
  paper's rule);
- `causal=False` lets a token see its whole segment (the paper's language model is causal).
"""

import torch
from einops import einsum, rearrange
from torch import nn

from zoo.core.checks import check_sequence, positive_int, refuse_mask
from zoo.core.masks import neg_fill, pad_to_multiple
from zoo.core.shell import MultiHead


def _attend(q, k, v, allowed, scale):
    """q `(..., i, d)`, k `(..., j, d)`, v `(..., j, e)`, allowed bool broadcast to `(..., i, j)`."""
    scores = einsum(q, k, "... i d, ... j d -> ... i j") * scale
    attn = scores.masked_fill(~allowed, neg_fill(scores.dtype)).softmax(dim=-1)  # (... i j)
    return einsum(attn, v, "... i j, ... j e -> ... i e")


class CompressiveTransformer(MultiHead):
    """Compressive-memory attention. `(b, n, dim) -> (b, n, dim)`.

    Args:
        segment_len: tokens per segment, $n_s$.
        mem_len: FIFO memory of past inputs, $n_m$.
        cmem_len: compressed memory slots, $n_{cm}$.
        compression_rate: inputs per compressed slot, $c$; must divide `segment_len` and `mem_len`.
    """

    def __init__(self, dim: int, *, heads: int = 8, dim_head: int | None = None, causal: bool = False,
                 segment_len: int = 64, mem_len: int = 64, cmem_len: int = 64,
                 compression_rate: int = 4):
        super().__init__(dim, heads=heads, dim_head=dim_head, causal=causal)
        for value, label in ((segment_len, "segment_len"), (mem_len, "mem_len"),
                             (cmem_len, "cmem_len"), (compression_rate, "compression_rate")):
            positive_int(value, label)
        if segment_len % compression_rate or mem_len % compression_rate:
            raise ValueError(f"compression_rate={compression_rate} must divide segment_len="
                             f"{segment_len} and mem_len={mem_len}")
        self.segment_len, self.mem_len, self.cmem_len = segment_len, mem_len, cmem_len
        self.compression_rate = compression_rate
        self.scale = self.dim_head ** -0.5
        # f_c: a 1D convolution with kernel = stride = c, written as a linear map of c inputs.
        self.to_compressed = nn.Linear(compression_rate * dim, dim)

    def compress(self, h: torch.Tensor) -> torch.Tensor:
        """f_c: `(b, L, dim) -> (b, L // c, dim)`, one slot per `c` consecutive inputs."""
        return self.to_compressed(rearrange(h, "b (r c) x -> b r (c x)", c=self.compression_rate))

    def to_kv(self, h: torch.Tensor):
        inner = self.heads * self.dim_head
        k, v = (h @ self.to_qkv.weight[inner:].T).chunk(2, dim=-1)
        return self.split_heads(k), self.split_heads(v)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        check_sequence(x, self.dim, mask, name=type(self).__name__, layer=self)
        refuse_mask(type(self).__name__, mask)
        n, s, m, r, c = x.shape[1], self.segment_len, self.mem_len, self.cmem_len, self.compression_rate
        x, _ = pad_to_multiple(x, s, dim=1)
        nc = x.shape[1] // s
        q, k, v = map(self.split_heads, self.to_qkv(x).chunk(3, dim=-1))  # (b h n d)
        kc, vc = self.to_kv(self.compress(x))  # (b h n/c d)

        # Segment t attends to raw inputs t*s - m .. t*s + s - 1 and to the r compressed slots
        # before input t*s - m: windows of the front-padded sequences, one per segment.
        def windows(t, front, size, step):
            t = nn.functional.pad(t, (0, 0, front, 0))
            return rearrange(t.unfold(2, size, step)[:, :, :nc], "b h nc d w -> b h nc w d")

        keys = torch.cat([windows(kc, r + m // c, r, s // c), windows(k, m, m + s, s)], dim=3)
        values = torch.cat([windows(vc, r + m // c, r, s // c), windows(v, m, m + s, s)], dim=3)
        seg = torch.arange(nc, device=x.device)[:, None, None]  # (nc 1 1)
        i = torch.arange(s, device=x.device)[:, None]  # query offset in its segment (i 1)
        u = torch.arange(r, device=x.device)
        w = torch.arange(m + s, device=x.device)
        slot_ok = (seg * (s // c) - m // c - r + u) >= 0  # (nc 1 r)
        pos = seg * s - m + w  # (nc 1 w): input position of each raw key
        raw_ok = (pos >= 0) & (pos < n) & ((w <= m + i) if self.causal else True)  # (nc i w)
        allowed = torch.cat([slot_ok.expand(nc, s, r), raw_ok.expand(nc, s, m + s)], dim=-1)
        out = _attend(rearrange(q, "b h (nc i) d -> b h nc i d", i=s), keys, values, allowed,
                      self.scale)
        out = rearrange(out, "b h nc i e -> b (nc i) (h e)")[:, :n]
        return self.to_out(out)

    def step(self, x: torch.Tensor, memory=None):
        """One segment of the streaming form (the paper's Algorithm 1 for one layer).

        Args:
            x: `(b, n, dim)`, the next segment (any n >= 1).
            memory: `(mem, cmem)` from the previous call, `(b, <= mem_len + c - 1, dim)` and
                `(b, <= cmem_len, dim)`; None starts with empty memories.

        Returns:
            `(out, memory)` with `out` `(b, n, dim)`.
        """
        check_sequence(x, self.dim, name=type(self).__name__, layer=self)
        mem, cmem = memory if memory is not None else (x[:, :0], x[:, :0])
        context = torch.cat([cmem, mem, x], dim=1)  # oldest first
        k, v = self.to_kv(context)
        q = self.split_heads(x @ self.to_qkv.weight[: self.heads * self.dim_head].T)
        past = context.shape[1] - x.shape[1]
        i = torch.arange(x.shape[1], device=x.device)[:, None]
        j = torch.arange(context.shape[1], device=x.device)
        allowed = j <= past + i if self.causal else torch.ones_like(j, dtype=torch.bool)
        out = self.to_out(self.merge_heads(_attend(q, k, v, allowed, self.scale)))
        mem = torch.cat([mem, x], dim=1)
        evict = max(mem.shape[1] - self.mem_len, 0) // self.compression_rate * self.compression_rate
        cmem = torch.cat([cmem, self.compress(mem[:, :evict])], dim=1)[:, -self.cmem_len:]
        return out, (mem[:, evict:], cmem)
