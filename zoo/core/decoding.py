"""What the token-by-token `step(x, state=None, *, mask=None)` of a cached entry shares.

A cached entry keeps, per layer, whatever its paper says the cache holds (keys and values, a
latent, compressed blocks) plus `real`, the `(b, n)` padding mask of every token seen so far. A
chunk of `t` new tokens is the query positions `n .. n + t - 1`; it reads every cached key that is
real and not after it, which is what `keep` builds.
"""

from __future__ import annotations

import torch
from einops import rearrange

from zoo.core.checks import check_dtype, check_sequence


def check_step(layer: torch.nn.Module, x, mask=None) -> None:
    """`step` is defined only for a causal layer; `x` and `mask` are checked as `forward` checks them."""
    name = type(layer).__name__
    if not getattr(layer, "causal", False):
        raise ValueError(f"{name}.step decodes token by token, which needs a layer built with "
                         "causal=True; this one has causal=False")
    check_sequence(x, layer.dim, mask, name=f"{name}.step")
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
