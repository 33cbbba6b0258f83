"""Masks and padding shared by every entry.

Masks are bool with True = attend (as in `scaled_dot_product_attention`). A key-padding mask is
`(b, n)`; a score mask broadcasts against scores `(b, h, i, j)`. Masked scores are filled with the
dtype's most negative finite value, never `-inf`, so a fully padded row stays finite.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange


def neg_fill(dtype: torch.dtype) -> float:
    """The value masked scores get: the most negative finite number of `dtype`."""
    return torch.finfo(dtype).min


def causal_mask(n_q: int, n_k: int, device: torch.device | None = None) -> torch.Tensor:
    """`(i, j)` bool, True where key `j` is not after query `i` (top-left aligned, as SDPA)."""
    return torch.ones(n_q, n_k, dtype=torch.bool, device=device).tril()


def score_mask(
    mask: torch.Tensor | None, n_q: int, n_k: int, *, causal: bool, device: torch.device
) -> torch.Tensor | None:
    """Combine a key-padding mask `(b, j)` and causality into one mask broadcastable to `(b h i j)`."""
    out = None if mask is None else rearrange(mask, "b j -> b 1 1 j")
    if causal:
        tri = causal_mask(n_q, n_k, device)
        out = tri if out is None else out & tri
    return out


def masked_fill_scores(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Scores with masked positions set to the most negative finite value."""
    if mask is None:
        return scores
    return scores.masked_fill(~mask, neg_fill(scores.dtype))


def zero_padded(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Zero the padded positions of `t` `(b, h, n, d)` given a key-padding mask `(b, n)`.

    A fill, not a product with the mask: NaN or inf at a padded position becomes 0 too (and its
    gradient is 0, as the product's would be)."""
    if mask is None:
        return t
    return t.masked_fill(~rearrange(mask, "b n -> b 1 n 1"), 0.0)


def zero_padded_tokens(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Zero the padded tokens of a layer input `x` `(b, n, ...)` given a key-padding mask `(b, n)`:
    what a caller leaves behind the mask (NaN, inf, 1e30) then cannot reach a real output."""
    if mask is None:
        return x
    return x.masked_fill(~mask.reshape(*mask.shape, *(1,) * (x.ndim - 2)), 0.0)


def safe_denominator(den: torch.Tensor) -> torch.Tensor:
    """`den` with its exact zeros replaced by 1, for a normaliser that is 0 only where its
    numerator is 0 too (no real key): the ratio is then 0, and its gradient stays finite, which a
    clamp to the smallest normal number does not give (its gradient 1 / tiny overflows)."""
    return den.masked_fill(den == 0, 1)


def pad_to_multiple(t: torch.Tensor, multiple: int, *, dim: int = -2, value: float = 0.0):
    """Pad `t` along `dim` up to a multiple of `multiple`.

    Returns the padded tensor and the number of positions added.
    """
    n = t.shape[dim]
    pad = (-n) % multiple
    if pad == 0:
        return t, 0
    dim = dim % t.ndim
    widths = [0, 0] * (t.ndim - dim - 1) + [0, pad]
    return F.pad(t, widths, value=value), pad


def block_windows(t: torch.Tensor, block: int, *, dim: int = -2, after: int = 1,
                  value: float = 0.0) -> torch.Tensor:
    """Blocks of `block` positions along `dim` (its length a multiple of `block`), each with the
    block before it and the `after` blocks after it, `value` past the ends: overlapping views of
    one padded copy, the window of `(2 + after) * block` positions as the last axis."""
    dim = dim % t.ndim
    widths = [0, 0] * (t.ndim - dim - 1) + [block, after * block]
    return F.pad(t, widths, value=value).unfold(dim, (2 + after) * block, block)


def pad_mask(mask: torch.Tensor | None, b: int, n: int, pad: int, device) -> torch.Tensor | None:
    """Extend a key-padding mask `(b, n)` by `pad` padded (False) positions.

    With no mask and no padding, returns None; with padding, always returns a mask.
    """
    if pad == 0:
        return mask
    if mask is None:
        mask = torch.ones(b, n, dtype=torch.bool, device=device)
    return F.pad(mask, (0, pad), value=False)
