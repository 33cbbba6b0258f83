"""Kernelised (linear) attention sums, shared by every feature-map entry.

With a feature map $\\phi$, attention becomes $O_i = \\phi(q_i)^\top S / \\phi(q_i)^\top z$ with
$S = \\sum_j \\phi(k_j) v_j^\top$ and $z = \\sum_j \\phi(k_j)$, the sums running over $j \\le i$ when
causal. The causal sums are computed chunk by chunk (explicit scores inside a chunk, a running
`(f, e)` state across chunks), optionally with a per-token decay of the state. The same sums carried
from one call to the next (`kernel_attention_step`) are the recurrent form that decoding uses;
`kernel_attention_reference`, the explicit `(n, n)` map, is the form the two-forms check holds
`kernel_attention` equal to in every entry that calls it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import einsum, rearrange

from zoo.core.masks import causal_mask, neg_fill, pad_to_multiple, zero_padded


def kernel_attention_reference(phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor,
                               mask: torch.Tensor | None = None, *, causal: bool = False,
                               chunk: int = 64, log_decay: torch.Tensor | None = None,
                               key_weight: torch.Tensor | None = None) -> torch.Tensor:
    r"""`kernel_attention` as an explicit `(n, n)` map: $A_{ij} = \phi(q_i)^\top \phi(k_j)\, a_j\,
    g_{j+1} \cdots g_i$ over the real keys (and $j \le i$ when causal), $O = D^{-1} A V$ with $D$
    its row sums. The decays apply only when causal; `chunk` is unused here."""
    attn = einsum(phi_q, phi_k, "b h i f, b h j f -> b h i j")
    if key_weight is not None:
        attn = attn * rearrange(key_weight, "b h j 1 -> b h 1 j")
    if mask is not None:
        attn = attn * rearrange(mask, "b j -> b 1 1 j")
    if causal:
        tri = causal_mask(phi_q.shape[2], phi_k.shape[2], phi_q.device)
        if log_decay is not None:  # log(g_{j+1} ... g_i) = a_i - a_j, with a the running sum
            a = log_decay.cumsum(dim=-1)
            gap = rearrange(a, "b h i -> b h i 1") - rearrange(a, "b h j -> b h 1 j")
            attn = attn * gap.masked_fill(~tri, neg_fill(gap.dtype)).exp()
        attn = attn * tri
    ones = torch.ones_like(v[..., :1])
    return ratio(einsum(attn, torch.cat([v, ones], dim=-1), "b h i j, b h j e -> b h i e"))


def causal_sum_reference(phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor, *,
                         chunk: int = 64, log_decay: torch.Tensor | None = None) -> torch.Tensor:
    """`causal_sum` as an explicit `(n, n)` map: `out_i = sum_{j <= i} g_{j+1} ... g_i
    (phi_q_i . phi_k_j) v_j`; `chunk` is unused here."""
    scores = einsum(phi_q, phi_k, "b h i f, b h j f -> b h i j")
    tri = causal_mask(phi_q.shape[2], phi_k.shape[2], phi_q.device)
    if log_decay is not None:  # log(g_{j+1} ... g_i) = a_i - a_j, with a the running sum
        a = log_decay.cumsum(dim=-1)
        gap = rearrange(a, "b h i -> b h i 1") - rearrange(a, "b h j -> b h 1 j")
        scores = scores * gap.masked_fill(~tri, neg_fill(gap.dtype)).exp()
    return einsum(scores * tri, v, "b h i j, b h j e -> b h i e")


def causal_sum(phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor, *, chunk: int = 64,
               log_decay: torch.Tensor | None = None) -> torch.Tensor:
    r"""`out_i = sum_{j <= i} g_{j+1} ... g_i (phi_q_i . phi_k_j) v_j`, computed chunk by chunk.

    Within a chunk the `(c, c)` scores are explicit; across chunks each chunk's `(f, e)` state
    is summed over the chunks before it (a cumulative sum, or with decays a log-depth scan).
    The contractions are plain matmuls, which batched gradients (`torch.autograd.functional.
    jacobian(vectorize=True)`) support inside a custom backward, as slim-performer's.

    Args:
        phi_q: `(b, h, n, f)`, the queries' features.
        phi_k: `(b, h, n, f)`, the keys' features.
        v: `(b, h, n, e)`.
        log_decay: `(b, h, n)`, `log g_t <= 0`; None means no decay (all `g = 1`).

    Returns:
        `(b, h, n, e)`.
    """
    n, c = v.shape[2], min(chunk, v.shape[2])
    q, k, v = (rearrange(pad_to_multiple(t, c)[0], "b h (nc c) x -> b h nc c x", c=c)
               for t in (phi_q, phi_k, v))
    scores = q @ k.transpose(-1, -2)  # (b h nc i j)
    if log_decay is None:
        scores = scores.tril()
        states = (k.transpose(-1, -2) @ v).cumsum(dim=2)  # (b h nc f e)
    else:
        a = rearrange(pad_to_multiple(log_decay, c, dim=-1)[0], "b h (nc c) -> b h nc c", c=c)
        a = a.cumsum(dim=-1)  # log of the decay from the chunk's start to each position
        gaps = rearrange(a, "... i -> ... i 1") - rearrange(a, "... j -> ... 1 j")
        scores = scores * gaps.masked_fill(~causal_mask(c, c, a.device), neg_fill(a.dtype)).exp()
        k = k * rearrange((a[..., -1:] - a).exp(), "... j -> ... j 1")  # decay to the chunk's end
        states = decayed_cumsum(k.transpose(-1, -2) @ v, a[..., -1].exp())
        q = q * rearrange(a.exp(), "... i -> ... i 1")
    carried = F.pad(states[:, :, :-1], (0, 0, 0, 0, 1, 0))  # the state entering each chunk
    out = scores @ v + q @ carried  # (b h nc c e)
    return rearrange(out, "b h nc c e -> b h (nc c) e")[:, :, :n]


def decayed_cumsum(u: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """`s_c = gamma_c s_{c-1} + u_c` over axis 2, by a log-depth (Hillis-Steele) scan.

    u `(b, h, nc, f, e)`, gamma `(b, h, nc)` in [0, 1] -> `(b, h, nc, f, e)`.
    """
    step = 1
    while step < u.shape[2]:
        gain = rearrange(gamma[:, :, step:], "b h c -> b h c 1 1")
        u = torch.cat([u[:, :, :step], u[:, :, step:] + gain * u[:, :, :-step]], dim=2)
        gamma = torch.cat([gamma[:, :, :step], gamma[:, :, step:] * gamma[:, :, :-step]], dim=2)
        step *= 2
    return u


def kernel_attention(phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor,
                     mask: torch.Tensor | None = None, *, causal: bool = False, chunk: int = 64,
                     log_decay: torch.Tensor | None = None,
                     key_weight: torch.Tensor | None = None) -> torch.Tensor:
    """`O_i = phi_q_i^T S / phi_q_i^T z` with `S = sum_j phi_k_j v_j^T`, `z = sum_j phi_k_j`
    (over `j <= i` when causal). phi `(b, h, n, f)`, v `(b, h, n, e)` -> `(b, h, n, e)`.

    `key_weight` `(b, h, n, 1)`, a scalar factor of each key's features (`phi_k_j a_j`), is applied
    to the `(e + 1)`-wide values instead of the wider features: the same sums, fewer elements.
    """
    phi_k = zero_padded(phi_k, mask)
    v = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)  # the last column sums the normaliser
    if key_weight is not None:
        v = v * key_weight
    if causal:
        num = causal_sum(phi_q, phi_k, v, chunk=chunk, log_decay=log_decay)
    else:
        num = einsum(phi_q, einsum(phi_k, v, "b h n f, b h n e -> b h f e"), "b h n f, b h f e -> b h n e")
    return ratio(num)


def ratio(num: torch.Tensor) -> torch.Tensor:
    """Split `(..., e + 1)` sums into values over normaliser (the last column).

    No epsilon: it would not scale with the features (whose constant factors cancel here), so
    a normaliser of exactly 0 (a row with no real key) gives 0 instead.
    """
    den = num[..., -1:]
    return num[..., :-1] / den.masked_fill(den == 0, 1)


def prefix_sum(phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The paper's causal form: prefix sums of `phi_k v^T` over a `(b, h, n, f, e)` tensor, read by
    every query. The reference the chunked `causal_sum` is tested against."""
    states = einsum(phi_k, v, "b h n f, b h n e -> b h n f e").cumsum(dim=2)
    return einsum(phi_q, states, "b h n f, b h n f e -> b h n e")


KernelState = tuple[torch.Tensor, torch.Tensor]  # the running sums and their shift


def causal_sum_step(phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor,
                    state: KernelState | None = None, *, chunk: int = 64,
                    log_decay: torch.Tensor | None = None,
                    key_log_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, KernelState]:
    r"""`causal_sum` over a chunk of `t` new positions after the context summed in `state`.

    The state is the running sum `S = sum_j g_{j+1} ... g_now phi_k_j v_j^T` `(b, h, f, e)`, kept
    times `exp(-c)` with `c` `(b, h)` the largest key log-scale seen so far: a chunk's keys may
    arrive scaled down by `exp(-key_log_scale)` (a stabilising shift), and the old sums and the new
    are brought to the larger of the two shifts. The outputs carry the same factor, which cancels
    in every ratio of two sums (values over normaliser). Its size does not grow with the context.

    Args:
        phi_q: `(b, h, t, f)`, the new queries' features.
        phi_k: `(b, h, t, f)`, the new keys' features.
        v: `(b, h, t, e)`.
        state: `(S, c)` from the previous chunk, or None (empty context).
        log_decay: `(b, h, t)`, `log g <= 0`, or None.
        key_log_scale: `(b, h)`: the chunk's true key features are `phi_k exp(key_log_scale)`.

    Returns:
        `(out (b, h, t, e), state)`.
    """
    b, h = v.shape[:2]
    shift = v.new_zeros(b, h) if key_log_scale is None else key_log_scale.to(v.dtype)
    if state is None:
        old_s, old_c = v.new_zeros(b, h, phi_k.shape[-1], v.shape[-1]), shift
    else:
        old_s, old_c = state
    c = torch.maximum(old_c, shift)
    old_gain, new_gain = (rearrange((t - c).exp(), "b h -> b h 1 1") for t in (old_c, shift))
    out = causal_sum(phi_q, phi_k, v, chunk=chunk, log_decay=log_decay) * new_gain
    if log_decay is None:
        decay_in, decay_out = None, phi_k.new_ones(b, h)
    else:
        a = log_decay.cumsum(dim=-1)  # log of the decay from the chunk's start to each position
        decay_in, decay_out = rearrange(a.exp(), "b h t -> b h t 1"), a[..., -1].exp()
        phi_k = phi_k * rearrange((a[..., -1:] - a).exp(), "b h t -> b h t 1")  # to the chunk's end
    read = phi_q if decay_in is None else phi_q * decay_in
    out = out + (read @ old_s) * old_gain
    s = old_s * (old_gain * rearrange(decay_out, "b h -> b h 1 1")) + (phi_k.transpose(-1, -2) @ v) * new_gain
    return out, (s, c)


def kernel_attention_step(phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor,
                          state: KernelState | None = None, mask: torch.Tensor | None = None, *,
                          chunk: int = 64, log_decay: torch.Tensor | None = None,
                          key_weight: torch.Tensor | None = None,
                          key_log_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, KernelState]:
    """The recurrent form of `kernel_attention(..., causal=True)` on a chunk of `t` new positions:
    the same arguments for the chunk, plus the state of the context before it (None: empty).

    Returns `(out (b, h, t, e), state)`; the state, `(b, h, f, e + 1)` sums and a `(b, h)` shift
    (see `causal_sum_step`), has a size that does not depend on the context's length.
    """
    phi_k = zero_padded(phi_k, mask)
    v = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)  # the last column sums the normaliser
    if key_weight is not None:
        v = v * key_weight
    num, state = causal_sum_step(phi_q, phi_k, v, state, chunk=chunk, log_decay=log_decay,
                                 key_log_scale=key_log_scale)
    return ratio(num), state


def kernel_attention_recurrent(phi_q, phi_k, v, *, gates=None) -> torch.Tensor:
    """The recurrent form over a whole sequence, one token at a time, written out on its own (for
    tests; `(b, h, n, .)` inputs, gates `(b, h, n)` or None): `S = g S + phi_k v^T`, `z = g z +
    phi_k`, read by phi_q. Equals `kernel_attention(..., causal=True)`."""
    s = phi_k.new_zeros(*phi_k.shape[:2], phi_k.shape[-1], v.shape[-1])
    z = phi_k.new_zeros(*phi_k.shape[:2], phi_k.shape[-1])
    outs = []
    for t in range(v.shape[2]):
        if gates is not None:
            s, z = s * gates[:, :, t, None, None], z * gates[:, :, t, None]
        s = s + einsum(phi_k[:, :, t], v[:, :, t], "b h f, b h e -> b h f e")
        z = z + phi_k[:, :, t]
        num = einsum(phi_q[:, :, t], s, "b h f, b h f e -> b h e")
        outs.append(num / einsum(phi_q[:, :, t], z, "b h f, b h f -> b h")[..., None])
    return torch.stack(outs, dim=2)
