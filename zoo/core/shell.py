"""The multi-head shell every sequence entry reuses.

It owns what is common to all of them: the input checks, the q/k/v projections, the head split
and merge, and the output projection. An entry subclasses it and writes only `attend`, its own
mechanism on `(b, h, n, d)` tensors. Padded tokens are set to zero before the projections, so
whatever a caller leaves there (NaN, inf) cannot reach a real output.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from zoo.core import decoding
from zoo.core.checks import check_sequence, positive_int
from zoo.core.masks import zero_padded_tokens


class MultiHead(nn.Module):
    """`(b, n, dim) -> (b, n, dim)` around `attend(q, k, v, mask)`.

    Args:
        dim: model width.
        heads: number of heads.
        dim_head: width of one head; None means `dim // heads` (then `heads` must divide `dim`).
        causal: whether `attend` must keep each output from seeing later tokens.
    """

    def __init__(self, dim: int, *, heads: int = 8, dim_head: int | None = None,
                 causal: bool = False):
        super().__init__()
        positive_int(dim, "dim")
        positive_int(heads, "heads")
        if dim_head is None:
            if dim % heads:
                raise ValueError(
                    f"{type(self).__name__}: heads={heads} must divide dim={dim}, or pass dim_head"
                )
            dim_head = dim // heads
        positive_int(dim_head, "dim_head")
        self.dim, self.heads, self.dim_head, self.causal = dim, heads, dim_head, bool(causal)
        inner = heads * dim_head
        self.to_qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim)

    def split_heads(self, t: torch.Tensor) -> torch.Tensor:
        t = rearrange(t, "b n (h d) -> b h n d", h=self.heads)
        if torch.compiler.is_compiling():
            # AOT autograd (torch 2.13, backend aot_eager) replays this split's backward as a view
            # of the incoming gradient, which fails when an einsum's backward left that gradient
            # permuted ("view size is not compatible"); a contiguous copy makes the backward a
            # copy too. Eager code is left as it is (the copy would cost every entry time).
            t = t.contiguous()
        return t

    def merge_heads(self, t: torch.Tensor) -> torch.Tensor:
        return rearrange(t, "b h n e -> b n (h e)")

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        check_sequence(x, self.dim, mask, name=type(self).__name__, layer=self)
        x = zero_padded_tokens(x, mask)
        q, k, v = map(self.split_heads, self.to_qkv(x).chunk(3, dim=-1))
        return self.to_out(self.merge_heads(self.attend(q, k, v, mask)))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        """q, k `(b, h, n, d)`, v `(b, h, n, e)`, mask `(b, n)` -> `(b, h, n, e)`."""
        raise NotImplementedError(f"{type(self).__name__} must define attend()")

    def step(self, x: torch.Tensor, state: decoding.DecodeState | None = None, *,
             mask: torch.Tensor | None = None) -> tuple[torch.Tensor, decoding.DecodeState]:
        """Decode a chunk `x` `(b, t, dim)` of new tokens after the context in `state` (None: none).

        Returns `(y, state)`: `y` `(b, t, dim)` equals the last `t` rows of the causal forward over
        the whole sequence so far. Needs `causal=True`. See `zoo.core.decoding`.
        """
        return decoding.step(self, x, state, mask, self.decode)

    def decode(self, x: torch.Tensor, cache, mask: torch.Tensor | None, start: int):
        """One chunk of decoding, `(y, cache)`: `attend_step` on the chunk's q, k, v where the entry
        defines it, else the generic fallback that runs the whole prefix again."""
        if type(self).attend_step is MultiHead.attend_step:
            return decoding.recompute(self, x, cache, mask, start)
        q, k, v = map(self.split_heads, self.to_qkv(x).chunk(3, dim=-1))
        out, cache = self.attend_step(q, k, v, cache, mask, start)
        return self.to_out(self.merge_heads(out)), cache

    def attend_step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache,
                    mask: torch.Tensor | None = None, start: int = 0):
        """`attend` on a chunk of `t` new positions after `start` earlier ones: q, k `(b, h, t, d)`,
        v `(b, h, t, e)`, mask `(b, t)`, the cache from the previous chunk (None at first) ->
        `(out (b, h, t, e), cache)`. Entries with a recurrent form or a KV cache define it."""
        raise NotImplementedError(f"{type(self).__name__} has no attend_step")

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, dim_head={self.dim_head}, causal={self.causal}"
