"""Token-by-token decoding: the state a layer carries between `step` calls, and the generic parts.

Every autoregressive layer has `y, state = layer.step(x, state=None, *, mask=None)`: `x` `(b, t, dim)`
is a chunk of `t >= 1` new tokens (a prompt and one decoded token are the same call), `mask` `(b, t)`
marks the real ones, `state` is None (an empty context) or what the previous call returned. The
chunks' outputs, concatenated, equal `layer(x, mask=mask)` on the whole sequence.

An entry supplies only its `decode(x, cache, mask, start) -> (y, cache)`: `cache` is None on the first
call, else what it returned last time; `start` is the number of tokens seen before `x`. This module
checks the inputs, wraps the cache with the batch size and the length, and holds the generic
fallback `recompute` (keep the inputs; run the whole prefix again; return the new rows), which is
right for any layer whose output at a position does not depend on the sequence's total length.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from einops import einsum, rearrange

from zoo.core.checks import check_sequence
from zoo.core.masks import neg_fill, zero_padded_tokens
from zoo.core.softmax import softmax_attention

Decode = Callable[[torch.Tensor, Any, "torch.Tensor | None", int], "tuple[torch.Tensor, Any]"]


@dataclass(frozen=True)
class DecodeState:
    """What `step` returns and takes back; callers treat it as opaque.

    Attributes:
        batch: the batch size it holds a context for.
        length: the tokens seen so far (padded ones included).
        cache: the entry's own tensors (any nesting of tuples, lists and dicts of tensors).
    """

    batch: int
    length: int
    cache: Any

    def numel(self) -> int:
        """Elements held in the cache: the size of the decoding state."""
        return numel(self.cache)


def numel(obj: Any) -> int:
    """Elements of every tensor in a nest of tuples, lists and dicts (other leaves count 0)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel()
    if isinstance(obj, dict):
        return sum(numel(v) for v in obj.values())
    if isinstance(obj, (tuple, list)):
        return sum(numel(v) for v in obj)
    return 0


def check_step(layer: Any, x: torch.Tensor, state: Any, mask: torch.Tensor | None) -> None:
    """`step`'s inputs: a causal layer, `x` `(b, t, dim)`, `mask` `(b, t)`, a state of the same batch."""
    name = type(layer).__name__
    if not getattr(layer, "causal", False):
        raise ValueError(f"{name}.step decodes causally, but the layer was built with causal=False; "
                         "build it with causal=True (outputs then match step's)")
    check_sequence(x, layer.dim, mask, name=f"{name}.step", layer=layer)
    if state is None:
        return
    if not isinstance(state, DecodeState):
        raise TypeError(f"{name}.step: state must be None or the DecodeState a previous step "
                        f"returned, got {type(state).__name__}")
    if state.batch != x.shape[0]:
        raise ValueError(f"{name}.step: the state holds a context for batch size {state.batch}, "
                         f"but x has batch size {x.shape[0]}")


def step(layer: torch.nn.Module, x: torch.Tensor, state: DecodeState | None,
         mask: torch.Tensor | None, decode: Decode) -> tuple[torch.Tensor, DecodeState]:
    """Check the inputs, zero the padded tokens (as `forward` does: nothing behind the mask reaches
    a real output), run `decode(x, cache, mask, start)`, wrap its cache. Returns `(y, state)`."""
    check_step(layer, x, state, mask)
    cache, start = (None, 0) if state is None else (state.cache, state.length)
    y, cache = decode(zero_padded_tokens(x, mask), cache, mask, start)
    return y, DecodeState(x.shape[0], start + x.shape[1], cache)


def concat_mask(old: torch.Tensor | None, new: torch.Tensor | None, old_len: int,
                new_len: int, b: int, device) -> torch.Tensor | None:
    """The key-padding mask of a cache grown by `new_len` tokens: None while every token is real."""
    if old is None and new is None:
        return None
    if old is None:
        old = torch.ones(b, old_len, dtype=torch.bool, device=device)
    if new is None:
        new = torch.ones(b, new_len, dtype=torch.bool, device=device)
    return torch.cat([old, new], dim=1)


def recompute(layer: torch.nn.Module, x: torch.Tensor, cache: Any, mask: torch.Tensor | None,
              start: int, *, reach: int | None = None) -> tuple[torch.Tensor, Any]:
    """The generic fallback: keep every input so far, run `layer` on the whole prefix, return the
    last `t` rows. The state grows with the context and a step costs a forward over it.

    With `reach`, only the last `reach` inputs are kept and the layer runs on those and the chunk:
    right for a layer whose output at `i` reads inputs `i - reach .. i` only and the same way
    wherever the window sits (no absolute positions, no blocks aligned to position 0).
    """
    old_x, old_mask = (x[:, :0], None) if cache is None else cache
    full_x = torch.cat([old_x, x], dim=1)
    full_mask = concat_mask(old_mask, mask, old_x.shape[1], x.shape[1], x.shape[0], x.device)
    y = layer(full_x) if full_mask is None else layer(full_x, mask=full_mask)
    if reach is not None:
        full_x = full_x[:, full_x.shape[1] - min(reach, full_x.shape[1]):]
        full_mask = None if full_mask is None else full_mask[:, full_mask.shape[1] - full_x.shape[1]:]
    return y[:, old_x.shape[1]:], (full_x, full_mask)


def pointwise(layer: torch.nn.Module) -> Decode:
    """`decode` for a layer that reads each position alone: the chunk's forward, nothing kept."""
    def decode(x, cache, mask, start):
        return (layer(x) if mask is None else layer(x, mask=mask)), None
    return decode


def extend_kv(cache: Any, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              start: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A KV cache grown by a chunk: `(k, v, mask)` over all `start + t` positions (k `(b, h, n, d)`,
    v `(b, h, n, e)`, the key mask `(b, n)` or None while every key is real). It is the new cache."""
    if cache is None:
        return k, v, mask
    old_k, old_v, old_mask = cache
    return (torch.cat([old_k, k], dim=2), torch.cat([old_v, v], dim=2),
            concat_mask(old_mask, mask, start, k.shape[2], k.shape[0], k.device))


def offset_causal(t: int, start: int, device=None) -> torch.Tensor:
    """`(t, start + t)` bool: new query `i` (position `start + i`) may read key `j <= start + i`."""
    return torch.ones(t, start + t, dtype=torch.bool, device=device).tril(start)


def pattern_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: Any,
                 mask: torch.Tensor | None, start: int, *, allowed: Callable, keep: Callable,
                 scale: float | None = None) -> tuple[torch.Tensor, Any]:
    """Softmax attention of a chunk's queries over a bounded cache of earlier keys and the chunk's
    own, for a pattern given by key positions; the cache then keeps only the keys later queries can
    still read.

    Args:
        q: `(b, h, t, d)`, the chunk's queries (positions `start ..`).
        k: `(b, h, t, d)`, its keys.
        v: `(b, h, t, e)`, its values.
        cache: `(k, v, mask, positions)` of the kept keys, or None.
        mask: `(b, t)`, True = real token, or None.
        start: the tokens seen before the chunk.
        allowed: `allowed(i, j) -> bool` on broadcast position tensors: may query `i` read key `j`
            (`j <= i` is added here).
        keep: `keep(j, next) -> bool`: whether a query at `next` or later may still read key `j`.
        scale: the score scale; None means `d ** -0.5`.

    Returns:
        `(out (b, h, t, e), cache)`.
    """
    t = q.shape[2]
    new_pos = torch.arange(start, start + t, device=q.device)
    if cache is None:
        keys, values, key_mask, pos = k, v, mask, new_pos
    else:
        old_k, old_v, old_mask, old_pos = cache
        keys, values = torch.cat([old_k, k], dim=2), torch.cat([old_v, v], dim=2)
        key_mask = concat_mask(old_mask, mask, old_pos.numel(), t, q.shape[0], q.device)
        pos = torch.cat([old_pos, new_pos])
    i, j = new_pos[:, None], pos[None, :]
    out = softmax_attention(q, keys, values, key_mask, allowed=allowed(i, j) & (j <= i), scale=scale)
    kept = keep(pos, start + t)
    return out, (keys[:, :, kept], values[:, :, kept], None if key_mask is None else key_mask[:, kept],
                 pos[kept])


# --- key-value caches -------------------------------------------------------------------------
# A cached entry (flash attention, grouped-query and latent attention, ...) keeps what its paper
# says a decoder keeps (keys and values, a latent, compressed blocks) and `real`, the padding mask
# of the tokens seen. A chunk of `t` tokens is the query positions `start .. start + t - 1` and reads
# every cached key that is real and not after it, which is what `keep` builds; the masked softmax
# below is the one its forward pass and its steps both run.


class Cached:
    """Mixin of a layer with `decode(x, cache, mask, start) -> (y, cache)`: gives it `step`, which
    checks the inputs and zeros the padded tokens before `decode` sees them."""

    def step(self, x: torch.Tensor, state: DecodeState | None = None, *,
             mask: torch.Tensor | None = None) -> tuple[torch.Tensor, DecodeState]:
        """Decode a chunk `(b, t, dim)` of new tokens; `state` is None (no context) or what the last
        call returned. Successive calls equal the causal forward over the concatenated chunks."""
        decode: Decode = getattr(self, "decode")  # noqa: B009 - the layer's own, see the class
        layer: Any = self
        return step(layer, x, state, mask, decode)


def real_tokens(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The `(b, n)` padding mask of `x` `(b, n, dim)`, all True where `mask` is None."""
    if mask is None:
        return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    return mask


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
