r"""Decayed linear attention: the sums that retention, gated linear attention, SSD and RWKV share.

A decayed linear attention keeps a state $S_t = g_t \odot S_{t-1} + k_t v_t^\top$ (the gate `g_t`
a scalar per head, or a vector over the key features that scales the state's rows) and reads
$o_t = q_t^\top S_t$. Unrolled, $o_i = \sum_{j \le i} (q_i \odot D_{ij})^\top k_j\, v_j$ with
$D_{ij} = \prod_{j < t \le i} g_t = \exp(A_i - A_j)$, $A$ the cumulative log-gates. Three forms:

- `decay_matrix`: the dense `D` (the parallel form, for the references);
- `gated_causal_sum` (vector gates) and `zoo.core.linear.causal_sum` (scalar gates): chunkwise;
- `decay_recurrence`: one token at a time, with a state to carry over (the decoding step).

The non-causal form is ours (the papers are causal): the mirrored mask `D_ij = exp(-|A_i - A_j|)`,
the gates between the two positions, computed as a forward and a backward causal sum.
"""

from __future__ import annotations

import torch
from einops import einsum, rearrange

from zoo.core.linear import causal_sum
from zoo.core.masks import causal_mask, pad_to_multiple


def fill_padded(t: torch.Tensor, mask: torch.Tensor | None, value: float = 0.0) -> torch.Tensor:
    """`t` `(b, h, n, ...)` with `value` at the padded positions of `mask` `(b, n)`.

    A selection, not a product with a 0/1 mask: a NaN behind the mask does not survive.
    """
    if mask is None:
        return t
    keep = mask.reshape(mask.shape[0], 1, mask.shape[1], *([1] * (t.ndim - 3)))
    return torch.where(keep, t, torch.full((), value, dtype=t.dtype, device=t.device))


def decay_matrix(log_decay: torch.Tensor, *, causal: bool) -> torch.Tensor:
    """`D_ij = exp(-|A_i - A_j|)`, `A` the cumulative sum of `log_decay` over positions; zero for
    `j > i` when causal. `(b, h, n)` -> `(b, h, i, j)`, or `(b, h, n, f)` -> `(b, h, i, j, f)`."""
    a = log_decay.cumsum(dim=2)
    gaps = a.unsqueeze(3) - a.unsqueeze(2)  # A_i - A_j
    decay = (-gaps.abs()).exp()
    if causal:
        keep = causal_mask(a.shape[2], a.shape[2], a.device)
        decay = decay * keep.reshape(*keep.shape, *([1] * (a.ndim - 3)))
    return decay


def gated_causal_sum(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor, *,
                     chunk: int = 64) -> torch.Tensor:
    r"""`o_i = sum_{j <= i} (q_i * exp(A_i - A_j)) . k_j v_j` with a gate per key feature, chunkwise.

    Within a chunk of `c` tokens the scores carry the `(c, c, f)` decays explicitly; across chunks
    a `(f, e)` state is carried, decayed row by row (gated linear attention's chunkwise form).
    Memory is `n c f`: keep `c` small (the paper's second level of chunking is left out).

    Args:
        q, k: `(b, h, n, f)`. v: `(b, h, n, e)`. log_decay: `(b, h, n, f)`, `<= 0`.

    Returns:
        `(b, h, n, e)`.
    """
    n, c = v.shape[2], min(chunk, v.shape[2])
    q, k, v, a = (rearrange(pad_to_multiple(t, c)[0], "b h (nc c) x -> b h nc c x", c=c)
                  for t in (q, k, v, log_decay))
    a = a.cumsum(dim=3)  # log decay from the chunk's start, per feature
    keep = causal_mask(c, c, a.device).reshape(c, c, 1)
    # the (c, c, f) decays are the largest tensor (n c f elements), built in place where it can be; the
    # masked entries are set to 0 after the exponential, not to exp(-huge) (exp's slow path)
    decay = (a.unsqueeze(4) - a.unsqueeze(3)).masked_fill_(~keep, 0).exp_().masked_fill(~keep, 0)
    scores = einsum(q, k, decay, "b h nc i f, b h nc j f, b h nc i j f -> b h nc i j")
    to_end = k * (a[..., -1:, :] - a).exp()  # each key decayed to its chunk's end
    writes = to_end.transpose(-1, -2) @ v  # (b h nc f e)
    gains = a[..., -1, :].exp().unsqueeze(-1)  # (b h nc f 1)
    state, carried = writes.new_zeros(writes[:, :, 0].shape), []
    for i in range(writes.shape[2]):  # over chunks, not tokens
        carried.append(state)
        state = gains[:, :, i] * state + writes[:, :, i]
    out = scores @ v + (q * a.exp()) @ torch.stack(carried, dim=2)  # (b h nc c e)
    return rearrange(out, "b h nc c e -> b h (nc c) e")[:, :, :n]


def decayed_sum(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor | None,
                *, causal: bool, chunk: int = 64) -> torch.Tensor:
    """`o_i = sum_j (q_i * D_ij) . k_j v_j` with `D` of `decay_matrix`, chunkwise.

    `log_decay` `(b, h, n)` (scalar gates), `(b, h, n, f)` (per-feature gates) or None (no decay).
    Non-causal: a forward sum, plus a backward sum over the flipped sequence (its gates shifted by
    one, so that `D_ij` holds the gates of `i+1 .. j`), minus the diagonal counted twice.
    """

    def forward(q, k, v, a):
        if a is not None and a.ndim == 4:
            return gated_causal_sum(q, k, v, a, chunk=chunk)
        return causal_sum(q, k, v, chunk=chunk, log_decay=a)

    out = forward(q, k, v, log_decay)
    if causal:
        return out
    back = None
    if log_decay is not None:
        back = torch.cat([log_decay[:, :, 1:], torch.zeros_like(log_decay[:, :, :1])], dim=2).flip(2)
    out = out + forward(q.flip(2), k.flip(2), v.flip(2), back).flip(2)
    return out - einsum(q, k, "b h n f, b h n f -> b h n").unsqueeze(-1) * v


def decay_recurrence(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     log_decay: torch.Tensor | None, state: torch.Tensor | None = None):
    """The recurrent form, token by token: `S_t = g_t S_{t-1} + k_t v_t^T`, `o_t = q_t^T S_t`.

    Args:
        q, k: `(b, h, t, f)`. v: `(b, h, t, e)`. log_decay: `(b, h, t)`, `(b, h, t, f)` or None.
        state: `(b, h, f, e)` from the previous call, or None (zeros).

    Returns:
        `(out (b, h, t, e), state (b, h, f, e))`.
    """
    if state is None:
        state = v.new_zeros(*k.shape[:2], k.shape[-1], v.shape[-1])
    outs = []
    for t in range(v.shape[2]):
        if log_decay is not None:
            g = log_decay[:, :, t].exp()
            state = state * (g[..., None, None] if g.ndim == 2 else g[..., None])
        state = state + einsum(k[:, :, t], v[:, :, t], "b h f, b h e -> b h f e")
        outs.append(einsum(q[:, :, t], state, "b h f, b h f e -> b h e"))
    out = torch.stack(outs, dim=2) if outs else v.new_zeros(v.shape)
    return out, state
