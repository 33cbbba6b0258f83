"""Key-value caches: what the token-by-token `step(x, state=None, *, mask=None)` of a cached entry
shares, and the masked softmax its forward pass and its steps both run.

An entry writes `decode(x, cache, mask, start) -> (y, cache)`: `cache` is None on the first call,
else what it returned last time, and `start` is the number of tokens seen before the chunk `x`.
`run_step` checks the inputs and wraps the cache in a `StepState` (batch size, length), the same
interface as the shell's `step` of issue 16. A cache holds whatever the entry's paper says it holds
(keys and values, a latent, compressed blocks) and `real`, the padding mask of the tokens seen; a
chunk of `t` tokens is the query positions `start .. start + t - 1` and reads every cached key that
is real and not after it, which is what `keep` builds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from einops import einsum, rearrange

from zoo.core.checks import check_dtype, check_sequence
from zoo.core.masks import neg_fill


@dataclass(frozen=True)
class StepState:
    """What `step` returns and takes back. batch: the batch size; length: tokens seen (padded ones
    included); cache: the entry's tensors (a dict)."""

    batch: int
    length: int
    cache: Any

    def numel(self) -> int:
        """Elements held in the cache: the size of the decoding state."""
        return sum(t.numel() for t in self.cache.values())


def run_step(layer: torch.nn.Module, x, state: StepState | None, mask,
             decode: Callable) -> tuple[torch.Tensor, StepState]:
    """Check a step's inputs (a causal layer, `x` `(b, t, dim)`, `mask` `(b, t)`, a state of the same
    batch), run `decode(x, cache, mask, start)` and wrap the cache it returns."""
    name = type(layer).__name__
    if not getattr(layer, "causal", False):
        raise ValueError(f"{name}.step decodes token by token, which needs a layer built with "
                         "causal=True; this one has causal=False")
    dim: int = getattr(layer, "dim")  # noqa: B009 - every sequence layer has it; mypy cannot know
    check_sequence(x, dim, mask, name=f"{name}.step")
    check_dtype(x, layer, name=f"{name}.step")
    if state is not None and not isinstance(state, StepState):
        raise TypeError(f"{name}.step: state must be None or what the previous step returned, got "
                        f"{type(state).__name__}")
    if state is not None and state.batch != x.shape[0]:
        raise ValueError(f"{name}.step: the state holds a context for batch size {state.batch}, but "
                         f"x has batch size {x.shape[0]}")
    cache, start = (None, 0) if state is None else (state.cache, state.length)
    y, cache = decode(x, cache, mask, start)
    return y, StepState(x.shape[0], start + x.shape[1], cache)


class Cached:
    """Mixin of a layer with `decode(x, cache, mask, start) -> (y, cache)`: gives it `step`."""

    def step(self, x: torch.Tensor, state: StepState | None = None, *,
             mask: torch.Tensor | None = None) -> tuple[torch.Tensor, StepState]:
        """Decode a chunk `(b, t, dim)` of new tokens; `state` is None (no context) or what the last
        call returned. Successive calls equal the causal forward over the concatenated chunks."""
        decode: Callable = getattr(self, "decode")  # noqa: B009 - the layer's own, see the class
        layer: Any = self
        return run_step(layer, x, state, mask, decode)


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
