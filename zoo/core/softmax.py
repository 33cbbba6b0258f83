r"""Softmax attention: the exact reference every approximation is measured against.

$$ O = \operatorname{softmax}\!\big(Q K^\top s + M\big)\, V, \qquad s = d^{-1/2} $$

It equals `torch.nn.functional.scaled_dot_product_attention` (tested), written out so that
probes can see every intermediate.
"""

from __future__ import annotations

import torch
from einops import einsum

from zoo.core.checks import check_qkv
from zoo.core.masks import masked_fill_scores, score_mask


def softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    causal: bool = False,
    scale: float | None = None,
    allowed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact scaled dot-product attention.

    Args:
        q: `(b, h, i, d)`.
        k: `(b, h, j, d)`.
        v: `(b, h, j, e)`.
        mask: key-padding mask `(b, j)`, True = real token.
        causal: query `i` sees keys `j <= i` (top-left aligned, as SDPA's `is_causal`).
        scale: score scale; None means `d ** -0.5`.
        allowed: a bool pattern broadcastable to `(b, h, i, j)`, True where query `i` may read key
            `j` (a sparse or structured entry's pattern); combined with `mask` and `causal`.

    Returns:
        `(b, h, i, e)`.
    """
    check_qkv(q, k, v, mask, name="softmax_attention")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = einsum(q, k, "b h i d, b h j d -> b h i j") * scale
    keep = score_mask(mask, q.shape[2], k.shape[2], causal=causal, device=q.device)
    if allowed is not None:
        if allowed.dtype != torch.bool or allowed.shape[-2:] != scores.shape[-2:]:
            raise ValueError(f"softmax_attention: allowed must be a bool (..., i, j) pattern with "
                             f"(i, j) = {tuple(scores.shape[-2:])}, got {allowed.dtype} "
                             f"{tuple(allowed.shape)}")
        keep = allowed if keep is None else keep & allowed
    scores = masked_fill_scores(scores, keep)
    attn = scores.softmax(dim=-1)  # (b h i j)
    return einsum(attn, v, "b h i j, b h j e -> b h i e")
