"""What the token-by-token `step(x, state=None, *, mask=None)` of a cached entry shares.

A cached entry keeps, per layer, whatever its paper says the cache holds (keys and values, a
latent, compressed blocks) plus `real`, the `(b, n)` padding mask of every token seen so far. A
chunk of `t` new tokens is the query positions `n .. n + t - 1`; it reads every cached key that is
real and not after it, which is what `keep` builds.
"""

from __future__ import annotations

import torch
from einops import einsum, rearrange

from zoo.core.checks import check_dtype, check_sequence
from zoo.core.masks import neg_fill


def check_step(layer: torch.nn.Module, x, mask=None) -> None:
    """`step` is defined only for a causal layer; `x` and `mask` are checked as `forward` checks them."""
    name = type(layer).__name__
    if not getattr(layer, "causal", False):
        raise ValueError(f"{name}.step decodes token by token, which needs a layer built with "
                         "causal=True; this one has causal=False")
    dim: int = getattr(layer, "dim")  # noqa: B009 - every sequence layer has it; mypy cannot know
    check_sequence(x, dim, mask, name=f"{name}.step")
    check_dtype(x, layer, name=f"{name}.step")


def real_tokens(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The `(b, n)` padding mask of `x` `(b, n, dim)`, all True where `mask` is None."""
    if mask is None:
        return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    return mask


def zero_padding(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """`x` `(b, n, dim)` with padded positions set to 0 by selection (never `x * mask`), so that
    whatever a padded position holds, NaN included, reaches neither outputs nor gradients."""
    if mask is None:
        return x
    return torch.where(rearrange(mask, "b n -> b n 1"), x, torch.zeros((), dtype=x.dtype,
                                                                        device=x.device))


def append(cache: torch.Tensor | None, new: torch.Tensor, dim: int) -> torch.Tensor:
    """`new` appended to `cache` along `dim` (the cache of an empty context is None)."""
    return new if cache is None else torch.cat([cache, new], dim=dim)


def keep(real: torch.Tensor, t: int, *, causal: bool = True) -> torch.Tensor:
    """`(b, 1, t, j)` bool: query `i` of the last `t` positions may read key `j` (real, and not after it
    when causal). `real` `(b, j)` is the padding mask of all `j` positions, the `t` queries last."""
    j = real.shape[1]
    out = rearrange(real, "b j -> b 1 1 j")
    if causal:
        pos_q = torch.arange(j - t, j, device=real.device)
        out = out & (torch.arange(j, device=real.device) <= rearrange(pos_q, "i -> i 1"))
    return out


def attention_weights(q: torch.Tensor, k: torch.Tensor, real: torch.Tensor, *, causal: bool = True,
                      scale: float | None = None, bias: torch.Tensor | None = None,
                      allowed: torch.Tensor | None = None) -> torch.Tensor:
    """The softmax weights `(b, h, i, j)` of `cached_attention` (same arguments, no values): rows
    with no key to read are all 0."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    ok = keep(real, q.shape[2], causal=causal)
    if allowed is not None:
        ok = ok & allowed
    zero = q.new_zeros(())
    shared = k.ndim == 3  # one key for all query heads (a latent, multi-query)
    k = torch.where(rearrange(real, "b j -> b j 1" if shared else "b j -> b 1 j 1"), k, zero)
    scores = einsum(q, k, f"b h i d, {'b j' if shared else 'b h j'} d -> b h i j") * scale
    if bias is not None:
        scores = scores + bias
    return torch.where(ok, scores.masked_fill(~ok, neg_fill(q.dtype)).softmax(dim=-1), zero)


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, real: torch.Tensor, *,
                     causal: bool = True, scale: float | None = None,
                     bias: torch.Tensor | None = None,
                     allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention of the last `i` positions over all `j` (`i == j` in a forward pass).

    Padded keys and values are replaced by 0 (selection, so NaN behind the mask stays there), and a
    query with no key to read gets 0, the same in a forward pass as in any split into steps.

    Args:
        q: `(b, h, i, d)`. k: `(b, h, j, d)`. v: `(b, h, j, e)`; or k `(b, j, d)` and v `(b, j, e)`,
            one key-value head read by every query head. real: `(b, j)`, True = real token.
        causal: query `i` reads only keys up to its own position.
        scale: score scale; None means `d ** -0.5`.
        bias: added to the scores, broadcastable to `(b, h, i, j)` (a decay, a gate).
        allowed: bool, broadcastable to `(b, h, i, j)`: a pattern restricting the keys further.

    Returns:
        `(b, h, i, e)`.
    """
    attn = attention_weights(q, k, real, causal=causal, scale=scale, bias=bias, allowed=allowed)
    shared = v.ndim == 3
    v = torch.where(rearrange(real, "b j -> b j 1" if shared else "b j -> b 1 j 1"), v, v.new_zeros(()))
    return einsum(attn, v, f"b h i j, {'b j' if shared else 'b h j'} e -> b h i e")
