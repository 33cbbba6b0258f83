"""Softmax attention of each query over its own few keys: the edges of a drawn or predicted graph
(smart-bird, sac), gathered row by row instead of masked out of an `n x n` score matrix."""

from __future__ import annotations

import torch
from einops import einsum

from zoo.core.masks import neg_fill


def gather_keys(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows of `t` `(b, h, n, d)` at `idx` `(b, h or 1, i, k)` -> `(b, h, i, k, d)`."""
    b, h = t.shape[:2]
    return t[torch.arange(b, device=t.device)[:, None, None, None],
             torch.arange(h, device=t.device)[None, :, None, None], idx]


def drawn_edge_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor,
                         drawn: torch.Tensor, real: torch.Tensor | None, *,
                         scale: float) -> torch.Tensor:
    """Softmax attention of some queries over their drawn keys only.

    Args:
        q: `(b, h, i, d)`, the queries. k: `(b, h, n, d)`. v: `(b, h, n, e)`.
        idx: `(b, h or 1, i, m)` the drawn keys. drawn: the scores they were drawn with, same shape.
        real: same shape, False for an edge to leave out (padding); None keeps all.

    Returns:
        `(b, h, i, e)`.
    """
    scores = einsum(q, gather_keys(k, idx), "b h i d, b h i m d -> b h i m") * scale
    if real is not None:
        scores = scores.masked_fill(~real, neg_fill(scores.dtype))
    # Equal to 1 in value; carries the gradient of every drawn weight to the score it was drawn with.
    attn = scores.softmax(dim=-1) * (drawn - drawn.detach()).exp()
    return einsum(attn, gather_keys(v, idx), "b h i m, b h i m e -> b h i e")
