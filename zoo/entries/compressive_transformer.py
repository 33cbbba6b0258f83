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
memories are windows of the input and of its compression), `segment_step(segment, memory)` is the
streaming form of the paper's Algorithm 1 that carries `(memory, compressed memory)`.

Deviations from the paper:
- no relative position encodings: attention is on content only, positions come from outside;
- memories are not stop-gradient, so the compression network learns from the task loss; the
  paper stops gradients at the memories and trains $f_c$ only with its auxiliary
  attention-reconstruction loss (a training choice; forward values are the same);
- memories start empty instead of as zero vectors, so the first segment is plain attention;
- memory is evicted `compression_rate` tokens at a time, so `segment_step` takes segments of any length
  (with `segment_len` and `mem_len` multiples of `compression_rate`, as required here, it is the
  paper's rule);
- `causal=False` lets a token see its whole segment (the paper's language model is causal).
"""

import torch
from einops import einsum, rearrange
from torch import nn

from zoo.core.checks import check_sequence, positive_int, refuse_mask
from zoo.core.decoding import offset_causal
from zoo.core.masks import neg_fill, pad_to_multiple
from zoo.core.shell import MultiHead
from zoo.core.softmax import softmax_attention


def compressive_attention_reference(q: torch.Tensor, k: torch.Tensor, kc: torch.Tensor,
                                    v: torch.Tensor, vc: torch.Tensor, *, n: int, segment_len: int,
                                    mem_len: int, cmem_len: int, compression_rate: int,
                                    causal: bool, scale: float) -> torch.Tensor:
    """Algorithm 1's attention as an allowed pattern over `[compressed; inputs]`: a query of the
    segment starting at `T` reads the raw inputs `T - n_m .. T + n_s - 1` (up to itself when
    causal, none past the sequence) and the `n_cm` compressed slots before input `T - n_m`.

    Args:
        q, k: `(b, h, L, d)`, v `(b, h, L, e)` for the sequence padded to `L`, a multiple of
            `segment_len`; kc, vc: `(b, h, L / c, .)`, one slot per `c` inputs. n: the real length.

    Returns:
        `(b, h, L, e)`.
    """
    s, m, r, c = segment_len, mem_len, cmem_len, compression_rate
    pos = torch.arange(q.shape[2], device=q.device)
    start = rearrange(pos // s * s, "i -> i 1")  # T of each query's segment
    j, u = rearrange(pos, "j -> 1 j"), rearrange(torch.arange(kc.shape[2], device=q.device), "u -> 1 u")
    raw = (j >= start - m) & (j < start + s) & (j < n)
    if causal:
        raw = raw & (j <= rearrange(pos, "i -> i 1"))
    slots = (u < (start - m) // c) & (u >= (start - m) // c - r)
    allowed = torch.cat([slots, raw], dim=-1)  # (i, slots + j)
    return softmax_attention(q, torch.cat([kc, k], dim=2), torch.cat([vc, v], dim=2), scale=scale,
                             allowed=allowed)


def compressive_attention(q: torch.Tensor, k: torch.Tensor, kc: torch.Tensor, v: torch.Tensor,
                          vc: torch.Tensor, *, n: int, segment_len: int, mem_len: int,
                          cmem_len: int, compression_rate: int, causal: bool,
                          scale: float) -> torch.Tensor:
    """What the layer runs: `compressive_attention_reference` with each segment's keys as one
    window of the front-padded sequences (`unfold`), never the `L x L` pattern (tested equal).
    Same arguments."""
    s, m, r, c = segment_len, mem_len, cmem_len, compression_rate
    nc = q.shape[2] // s

    # Segment t attends to raw inputs t*s - m .. t*s + s - 1 and to the r compressed slots
    # before input t*s - m: windows of the front-padded sequences, one per segment.
    def windows(t, front, size, step):
        t = nn.functional.pad(t, (0, 0, front, 0))
        if torch.compiler.is_compiling():
            # The same windows as a gather: inductor's backward of this unfold corrupts memory
            # (torch 2.13: "free(): invalid next size", measured by `zoo compat`); eager keeps
            # the unfold, 15% faster at n = 16384.
            index = torch.arange(nc, device=t.device)[:, None] * step + torch.arange(size, device=t.device)
            return t[:, :, index]  # (b h nc w d)
        return rearrange(t.unfold(2, size, step)[:, :, :nc], "b h nc d w -> b h nc w d")

    keys = torch.cat([windows(kc, r + m // c, r, s // c), windows(k, m, m + s, s)], dim=3)
    values = torch.cat([windows(vc, r + m // c, r, s // c), windows(v, m, m + s, s)], dim=3)
    seg = torch.arange(nc, device=q.device)[:, None, None]  # (nc 1 1)
    i = torch.arange(s, device=q.device)[:, None]  # query offset in its segment (i 1)
    u = torch.arange(r, device=q.device)
    w = torch.arange(m + s, device=q.device)
    slot_ok = (seg * (s // c) - m // c - r + u) >= 0  # (nc 1 r)
    pos = seg * s - m + w  # (nc 1 w): input position of each raw key
    raw_ok = (pos >= 0) & (pos < n)  # (nc i w)
    if causal:  # a branch on the setting, not `tensor & True` (which jit.trace refuses)
        raw_ok = raw_ok & (w <= m + i)
    allowed = torch.cat([slot_ok.expand(nc, s, r), raw_ok.expand(nc, s, m + s)], dim=-1)
    out = _attend(rearrange(q, "b h (nc i) d -> b h nc i d", i=s), keys, values, allowed, scale)
    return rearrange(out, "b h nc i e -> b h (nc i) e")


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
        q, k, v = map(self.split_heads, self.to_qkv(x).chunk(3, dim=-1))  # (b h n d)
        kc, vc = self.to_kv(self.compress(x))  # (b h n/c d)
        out = compressive_attention(q, k, kc, v, vc, n=n, segment_len=s, mem_len=m, cmem_len=r,
                                    compression_rate=c, causal=self.causal, scale=self.scale)
        return self.to_out(rearrange(out, "b h n e -> b n (h e)")[:, :n])

    def segment_step(self, x: torch.Tensor, memory=None):
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

    def decode(self, x: torch.Tensor, cache, mask: torch.Tensor | None, start: int):
        """Decoding, segment-aligned as `forward`: the raw inputs from `mem_len` before the current
        segment's start (at most `mem_len + segment_len`) and the compressed memory (at most
        `cmem_len` slots); when a segment starts, the inputs that leave the window are compressed."""
        refuse_mask(type(self).__name__, mask)
        s, m = self.segment_len, self.mem_len
        raw, cmem = (x[:, :0], x[:, :0]) if cache is None else cache
        outs, pos, inner = [], 0, self.heads * self.dim_head
        while pos < x.shape[1]:
            into = (start + pos) % s
            size = min(s - into, x.shape[1] - pos)
            # a segment starts: inputs before its start - mem_len go (a multiple of c, as s and m are)
            evict = raw.shape[1] - m if into == 0 else 0
            if evict > 0:
                cmem = torch.cat([cmem, self.compress(raw[:, :evict])], dim=1)[:, -self.cmem_len:]
                raw = raw[:, evict:]
            part = x[:, pos:pos + size]
            raw = torch.cat([raw, part], dim=1)
            k, v = self.to_kv(torch.cat([cmem, raw], dim=1))  # oldest first
            q = self.split_heads(part @ self.to_qkv.weight[:inner].T)
            allowed = offset_causal(size, k.shape[2] - size, x.device)
            outs.append(self.to_out(self.merge_heads(_attend(q, k, v, allowed, self.scale))))
            pos += size
        return torch.cat(outs, dim=1), (raw, cmem)
