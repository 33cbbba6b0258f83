r"""Generating Wikipedia by Summarizing Long Sequences.

The paper's decoder-only Transformer (T-DMCA) interleaves two cheaper kinds of self-attention.
Memory-compressed attention (`kind="compressed"`, the default) shortens keys and values with a
strided convolution (kernel and stride c, 3 in the paper) after the projections, so every query
scores n / c slots; the queries keep their full length and information still flows across the
whole sequence. Local attention (`kind="local"`) splits the sequence into blocks (256 tokens in
the paper) and attends within each block only, which is linear in n.

$$ O = \operatorname{softmax}\!\big(Q\, \operatorname{conv}_c(K)^\top / \sqrt{d}\big)\,
   \operatorname{conv}_c(V), \qquad
   \operatorname{conv}_c(K)_s = b + \textstyle\sum_{t<c} W_t\, K_{sc+t} $$

Causal form (the model is a language model): local attention is causal within its block. A
compressed slot mixes c consecutive tokens, so query i may read slot s only once the slot's whole
window has passed, $sc + c - 1 \le i$; the first $c - 1$ queries have no complete slot yet and
attend to nothing (output zero before the output projection).

Deviations from the paper:

- The paper states the decoder but not how the compressed layer is masked; the rule above is
  ours (it is the one that keeps every output from seeing a later token).
- A length that is not a multiple of c or of the block is zero-padded internally; padded tokens
  and slots with no real token are masked. The paper's layer pattern (L M L M L) is left to the
  caller: one layer is one kind.
"""

import torch
from einops import einsum, rearrange, reduce
from torch import nn

from zoo.core.checks import check_qkv, one_of, positive_int
from zoo.core.decoding import concat_mask, pattern_step
from zoo.core.masks import neg_fill, pad_mask, pad_qkv, pad_to_multiple, zero_padded
from zoo.core.shell import MultiHead

KINDS = ("compressed", "local")


def _real(mask: torch.Tensor | None, b: int, n: int, pad: int, device) -> torch.Tensor:
    """Key-padding mask `(b, n + pad)` with the internal padding marked False."""
    real = pad_mask(mask, b, n, pad, device)
    return torch.ones(b, n, dtype=torch.bool, device=device) if real is None else real


def compress(t: torch.Tensor, conv: nn.Conv1d, mask: torch.Tensor | None):
    """Strided convolution over positions, kernel = stride = c, across all heads' channels.

    Returns:
        slots `(b, h, r, d)` with r = ceil(n / c), and which slots hold a real token, `(b, r)`.
    """
    b, h, n, _ = t.shape
    c = conv.stride[0]
    t, pad = pad_to_multiple(zero_padded(t, mask), c)
    slots = conv(rearrange(t, "b h n d -> b (h d) n"))  # (b (h d) r)
    live = reduce(_real(mask, b, n, pad, t.device), "b (r c) -> b r", "max", c=c)
    return rearrange(slots, "b (h d) r -> b h r d", h=h), live


def compressed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         mask: torch.Tensor | None = None, *, compression: int,
                         causal: bool = False, offset: int = 0) -> torch.Tensor:
    """Attention of every query over the compressed slots.

    Args:
        q: `(b, h, i, d)`. k: `(b, h, r, d)`, v: `(b, h, r, e)`: compressed slots of c tokens.
        mask: `(b, r)`, True = slot holds a real token.
        compression: c, the tokens per slot (sets which slots are complete under causality).
        causal: query i reads slot s only if `s * c + c - 1 <= i`.
        offset: the position of the first query (decoding a chunk after `offset` tokens).

    Returns:
        `(b, h, i, e)`; zero for a query that may read no slot.
    """
    n, r = q.shape[2], k.shape[2]
    allowed = torch.ones(1, 1, n, r, dtype=torch.bool, device=q.device)
    if causal:
        last = torch.arange(r, device=q.device) * compression + compression - 1
        allowed = allowed & (last <= torch.arange(offset, offset + n, device=q.device)[:, None])
    if mask is not None:
        allowed = allowed & rearrange(mask, "b r -> b 1 1 r")
    scores = einsum(q * q.shape[-1] ** -0.5, k, "b h i d, b h r d -> b h i r")
    attn = scores.masked_fill(~allowed, neg_fill(scores.dtype)).softmax(dim=-1)  # (b h i r)
    attn = attn * allowed.any(-1, keepdim=True).to(attn.dtype)
    return einsum(attn, v, "b h i r, b h r e -> b h i e")


def local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    mask: torch.Tensor | None = None, *, block: int,
                    causal: bool = False) -> torch.Tensor:
    """Softmax attention within non-overlapping blocks of `block` tokens.

    Args:
        q, k: `(b, h, n, d)`. v: `(b, h, n, e)`. mask: `(b, n)`, True = real token.

    Returns:
        `(b, h, n, e)`.
    """
    check_qkv(q, k, v, mask, name="local_attention")
    b, _, n, d = q.shape
    q, k, v, real = pad_qkv(q * d ** -0.5, k, v, mask, block)
    pad = q.shape[2] - n
    q, k, v = (rearrange(t, "b h (nc c) d -> b h nc c d", c=block) for t in (q, k, v))
    scores = einsum(q, k, "b h nc i d, b h nc j d -> b h nc i j")
    if mask is not None or pad or causal:
        allowed = rearrange(real, "b (nc j) -> b 1 nc 1 j", j=block)
        if causal:
            allowed = allowed & torch.ones(block, block, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~allowed, neg_fill(scores.dtype))
    attn = scores.softmax(dim=-1)  # (b h nc i j)
    out = einsum(attn, v, "b h nc i j, b h nc j e -> b h nc i e")
    return rearrange(out, "b h nc c e -> b h (nc c) e")[:, :, :n]


class MemoryCompressedAttention(MultiHead):
    """One T-DMCA attention layer, `(b, n, dim) -> (b, n, dim)`.

    Args:
        kind: `"compressed"` (memory-compressed attention, the default) or `"local"`.
        compression: c, kernel and stride of the key and value convolutions (compressed kind).
        block: block length of local attention (local kind).
    """

    def __init__(self, dim: int, *, heads: int = 8, dim_head: int | None = None,
                 causal: bool = False, kind: str = "compressed", compression: int = 3,
                 block: int = 256):
        super().__init__(dim, heads=heads, dim_head=dim_head, causal=causal)
        self.kind = one_of(kind, KINDS, "kind")
        self.compression = positive_int(compression, "compression")
        self.block = positive_int(block, "block")
        if kind == "compressed":
            inner = self.heads * self.dim_head
            self.compress_k = nn.Conv1d(inner, inner, compression, stride=compression)
            self.compress_v = nn.Conv1d(inner, inner, compression, stride=compression)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.kind == "local":
            return local_attention(q, k, v, mask, block=self.block, causal=self.causal)
        check_qkv(q, k, v, mask, name="memory_compressed_attention")
        k, live = compress(k, self.compress_k, mask)
        v, _ = compress(v, self.compress_v, mask)
        return compressed_attention(q, k, v, live, compression=self.compression,
                                    causal=self.causal)

    def attend_step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache,
                    mask: torch.Tensor | None = None, start: int = 0):
        """Decoding. Compressed: a cache of the completed slots (one per c tokens) and of the up to
        c - 1 tokens of the slot in progress. Local: the keys of the current block only."""
        if self.kind == "local":
            blk = self.block
            return pattern_step(q, k, v, cache, mask, start, allowed=lambda i, j: i // blk == j // blk,
                                keep=lambda j, later: j >= later // blk * blk)
        c = self.compression
        if cache is None:
            cache = (k[:, :, :0], v[:, :, :0], None, k[:, :, :0], v[:, :, :0], None)
        slots_k, slots_v, live, wait_k, wait_v, wait_mask = cache
        wait_mask = concat_mask(wait_mask, mask, wait_k.shape[2], k.shape[2], k.shape[0], k.device)
        wait_k = torch.cat([wait_k, zero_padded(k, mask)], dim=2)
        wait_v = torch.cat([wait_v, zero_padded(v, mask)], dim=2)
        done = wait_k.shape[2] // c * c  # tokens that complete a slot
        if done:
            new_k, new_live = compress(wait_k[:, :, :done], self.compress_k,
                                       None if wait_mask is None else wait_mask[:, :done])
            new_v, _ = compress(wait_v[:, :, :done], self.compress_v, None)
            live = concat_mask(live, new_live if wait_mask is not None else None, slots_k.shape[2],
                               new_k.shape[2], k.shape[0], k.device)
            slots_k, slots_v = torch.cat([slots_k, new_k], dim=2), torch.cat([slots_v, new_v], dim=2)
            wait_k, wait_v = wait_k[:, :, done:], wait_v[:, :, done:]
            wait_mask = None if wait_mask is None else wait_mask[:, done:]
        out = compressed_attention(q, slots_k, slots_v, live, compression=c, causal=True, offset=start)
        return out, (slots_k, slots_v, live, wait_k, wait_v, wait_mask)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, kind={self.kind!r}, compression={self.compression}, "
                f"block={self.block}")
