r"""RWKV: Reinventing RNNs for the Transformer Era.

RWKV-4's time mixing replaces attention by the WKV operator, a softmax-like weighted average of
the past values per channel: token `i` weighs $e^{k_i}$, decayed by $e^{-w}$ per step back (a
learned decay per channel), and the current token gets a separate bonus $u$ instead of the decay.
Being a weighted average with exponentially decaying weights, it runs as an RNN with a state of
two numbers per channel (numerator and denominator), or in parallel over the sequence. Each of
receptance, key and value reads a learned mix of the token and the one before it (token shift),
and a sigmoid of the receptance gates the output.

$$ wkv_t = \frac{\sum_{i<t} e^{-(t-1-i) w + k_i} \odot v_i + e^{u + k_t} \odot v_t}
                {\sum_{i<t} e^{-(t-1-i) w + k_i} + e^{u + k_t}}, \qquad
   o_t = W_o \big(\sigma(r_t) \odot wkv_t\big) $$

with $r_t = W_r (\mu_r \odot x_t + (1 - \mu_r) \odot x_{t-1})$, and $k_t$, $v_t$ alike.

Deviations from the paper:
- the exponents are shifted by running maxima that cancel in the ratio (no overflow): per token in
  the decoding step (as RWKV-4's kernel), per row and per chunk in the chunked parallel form;
- simplified initialisation (decays spread log-uniformly over channels, `u = log 0.3`, mixes 1/2);
- `causal=False` is ours: the decay mirrored, `e^{-(|t-i|-1) w}` for `i != t` (Vision-RWKV's
  Bi-WKV, without its division by the length);
- RWKV-4 has no heads: `heads * dim_head` only sets the number of WKV channels; padded tokens do
  not write (the state still decays), and the token shift after a padded token reads zeros.
"""

import math

import torch
from einops import rearrange
from torch import nn

from zoo.core import decoding
from zoo.core.checks import check_sequence, positive_int
from zoo.core.linear import ratio
from zoo.core.masks import neg_fill, pad_to_multiple


def wkv_reference(k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, u: torch.Tensor,
                  mask: torch.Tensor | None = None, *, causal: bool = False,
                  chunk: int = 64) -> torch.Tensor:
    """The WKV operator (eq. 14) in parallel: for every `t`, the weights of all `i` at once.

    Args:
        k, v: `(b, n, c)`. w: `(c,)` decays, `> 0`. u: `(c,)` bonuses. mask: `(b, n)`.
        causal: only `i <= t`; otherwise also `i > t`, decayed by `e^{-(i-t-1) w}`.
        chunk: unused here (the chunked form's size).

    Returns:
        `(b, n, c)`.
    """
    n = k.shape[1]
    t = torch.arange(n, device=k.device)
    gap = (t[:, None] - t[None, :]).abs().to(k.dtype)  # |t - i|, (t i)
    logits = k[:, None, :, :] - ((gap - 1)[..., None] * w)  # (b t i c)
    logits = torch.where((gap == 0)[..., None], u + k[:, None, :, :], logits)
    allowed = torch.ones(n, n, dtype=torch.bool, device=k.device)
    if causal:
        allowed = allowed.tril()
    allowed = allowed[None, :, :, None]  # (b t i c)
    if mask is not None:
        allowed = allowed & mask[:, None, :, None]
    weights = logits.masked_fill(~allowed, neg_fill(k.dtype)).softmax(dim=2)
    weights = torch.where(allowed.any(dim=2, keepdim=True), weights, torch.zeros((), dtype=k.dtype))
    return (weights * torch.where(allowed, v[:, None], torch.zeros((), dtype=v.dtype))).sum(dim=2)


def wkv(k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, u: torch.Tensor,
        mask: torch.Tensor | None = None, *, causal: bool = False, chunk: int = 64) -> torch.Tensor:
    """The same numbers as `wkv_reference` in linear time: the sums over `i < t` (and, mirrored,
    `i > t`) chunk by chunk, each kept with its own log-scale, merged with the bonus term."""
    real = torch.ones_like(k, dtype=torch.bool) if mask is None else mask[..., None].expand_as(k)
    zero = torch.zeros((), dtype=k.dtype, device=k.device)
    own_logit = torch.where(real, u + k, neg_fill(k.dtype))
    parts = [strict_past(k, v, w, real, chunk),
             (torch.where(real[..., None], torch.stack([v, torch.ones_like(v)], dim=-1), zero), own_logit)]
    if not causal:
        sums, logit = strict_past(k.flip(1), v.flip(1), w, real.flip(1), chunk)
        parts.append((sums.flip(1), logit.flip(1)))
    top = torch.stack([logit for _, logit in parts]).amax(dim=0).detach()
    total = sum(sums * (logit - top).exp()[..., None] for sums, logit in parts)
    return ratio(total).squeeze(-1)


def strict_past(k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, real: torch.Tensor, chunk: int):
    """`sum_{i < t} e^{-(t-1-i) w + k_i} [v_i, 1]` as `(sums (b, n, c, 2), logit (b, n, c))`, the
    true sums being `e^logit sums`. Within a chunk the weights are explicit, each row shifted by
    its largest exponent; across chunks a state `(sums, logit)` is carried (RWKV-4's running
    maximum, one step per chunk). The shifts cancel in WKV's ratio and carry no gradient."""
    n, size = k.shape[1], min(chunk, k.shape[1])
    fill, zero = neg_fill(k.dtype), torch.zeros((), dtype=k.dtype, device=k.device)
    k = torch.where(real, k, fill)  # masked keys: no weight
    # channels as a batch axis: (b ch nc c)
    k, v, real = (rearrange(pad_to_multiple(t, size, dim=1, value=value)[0], "b (nc c) ch -> b ch nc c",
                            c=size) for t, value in ((k, fill), (v, 0.0), (real, False)))
    values = torch.stack([torch.where(real, v, zero), real.to(v.dtype)], dim=-1)  # (b ch nc c 2)
    w = rearrange(w, "ch -> ch 1 1")
    pos = torch.arange(size, device=k.device)
    dist = (pos[:, None] - 1 - pos[None, :]).to(k.dtype)  # t - 1 - i, (t i)
    before = pos[:, None] > pos[None, :]  # i < t
    # what each chunk leaves for the next: its keys decayed to the chunk's end
    to_end = k - (size - 1 - pos).to(k.dtype) * w  # (b ch nc c)
    leave_logit = to_end.amax(dim=-1).detach()
    leave = ((to_end - leave_logit[..., None]).masked_fill(~real, fill).exp().unsqueeze(-2)
             @ values).squeeze(-2)  # (b ch nc 2)
    state_logit, state = torch.full_like(leave_logit[..., 0], fill), torch.zeros_like(leave[:, :, 0])
    starts, step = [], size * w[:, 0, 0]
    for i in range(k.shape[2]):  # over chunks, not tokens
        starts.append((state, state_logit))
        logit = torch.maximum(state_logit - step, leave_logit[..., i])
        state = (state * (state_logit - step - logit).exp()[..., None]
                 + leave[:, :, i] * (leave_logit[..., i] - logit).exp()[..., None])
        state_logit = logit
    carried = torch.stack([s for s, _ in starts], dim=2)  # (b ch nc 2)
    carried_logit = torch.stack([s for _, s in starts], dim=2)[..., None] - pos.to(k.dtype) * w
    with torch.no_grad():
        # each row's largest exponent over i < t: a running maximum of k_i + i w, then decayed
        kappa = (k + pos.to(k.dtype) * w).cummax(dim=-1).values
        kappa = torch.cat([torch.full_like(kappa[..., :1], fill), kappa[..., :-1]], dim=-1)
        row = torch.maximum(kappa - (pos - 1).to(k.dtype) * w, carried_logit)  # (b ch nc t)
    # the largest tensor (n c ch elements), made in place; the exponents of i < t are <= 0, the
    # others are set to 0 and zeroed after; a weight below e^-60 of its row's largest becomes
    # e^-60 (a relative change under 1e-24, below float64's epsilon), which keeps exp off its slow
    # underflow path; padded keys carry zero values
    logits = (k.unsqueeze(-2) - row.unsqueeze(-1)).sub_(dist * w.unsqueeze(-1))  # (b ch nc t i)
    weights = logits.masked_fill_(~before, 0).clamp_(min=-60).exp_().masked_fill(~before, 0)
    sums = weights @ values + carried.unsqueeze(-2) * (carried_logit - row).exp()[..., None]
    return (rearrange(sums, "b ch nc c two -> b (nc c) ch two")[:, :n],
            rearrange(row, "b ch nc c -> b (nc c) ch")[:, :n])


def wkv_step(k, v, w, u, state=None, mask=None):
    """The RNN form over `t` new tokens, with a running maximum `p` of the exponents (RWKV-4's
    kernel): state `(a, b, p)`, each `(batch, c)`, the decayed sums scaled by `e^{-p}`.
    k, v `(batch, t, c)`. Returns `(wkv (batch, t, c), state)`."""
    fill, zero = neg_fill(k.dtype), torch.zeros((), dtype=k.dtype, device=k.device)
    if state is None:
        state = (k.new_zeros(k.shape[0], k.shape[2]),) * 2 + (k.new_full((k.shape[0], k.shape[2]), fill),)
    a, b, p = state
    outs = []
    for t in range(k.shape[1]):
        real = torch.ones_like(a, dtype=torch.bool) if mask is None else mask[:, t, None].expand_as(a)
        kt, vt = torch.where(real, k[:, t], fill), torch.where(real, v[:, t], zero)
        top = torch.maximum(p, torch.where(real, u + kt, fill))
        e_old, e_new = (p - top).exp(), torch.where(real, (torch.where(real, u + kt, top) - top).exp(), zero)
        outs.append(ratio(torch.stack([e_old * a + e_new * vt, e_old * b + e_new], dim=-1)).squeeze(-1))
        top = torch.maximum(p - w, kt)
        e_old, e_new = (p - w - top).exp(), torch.where(real, (kt - top).exp(), zero)
        a, b, p = e_old * a + e_new * vt, e_old * b + e_new, top
    return torch.stack(outs, dim=1), (a, b, p)


class RWKV(nn.Module):
    """RWKV-4 time mixing. `(b, n, dim) -> (b, n, dim)`.

    Args:
        heads, dim_head: the WKV channels are `heads * dim_head` (default `dim`). RWKV-4 has no
            heads: WKV acts on each channel alone, so the split into heads changes nothing but
            the width (taken for the interface every sequence entry shares).
        chunk: tokens per chunk of the chunked form (no effect on the result; memory grows as
            `n chunk channels`).
    """

    def __init__(self, dim: int, *, heads: int = 1, dim_head: int | None = None,
                 causal: bool = False, chunk: int = 16):
        super().__init__()
        positive_int(dim, "dim")
        positive_int(heads, "heads")
        if dim_head is None:
            if dim % heads:
                raise ValueError(f"RWKV: heads={heads} must divide dim={dim}, or pass dim_head")
            dim_head = dim // heads
        self.dim, self.heads, self.dim_head = dim, heads, positive_int(dim_head, "dim_head")
        self.causal, self.chunk = bool(causal), positive_int(chunk, "chunk")
        inner = heads * dim_head
        self.to_r, self.to_k, self.to_v = (nn.Linear(dim, inner, bias=False) for _ in range(3))
        self.to_out = nn.Linear(inner, dim, bias=False)
        self.mix = nn.Parameter(torch.full((3, dim), 0.5))  # mu_r, mu_k, mu_v
        spread = torch.linspace(0, 1, inner)
        self.time_decay = nn.Parameter(-5 + 8 * spread)  # w = exp(time_decay): e^-5 .. e^3
        self.time_first = nn.Parameter(torch.full((inner,), math.log(0.3)))  # u

    def project(self, x, previous):
        """r, k, v of `x` `(b, t, dim)` mixed with the tokens before them (`previous` `(b, dim)`)."""
        before = torch.cat([previous[:, None], x[:, :-1]], dim=1)
        r, k, v = (f(self.mix[i] * x + (1 - self.mix[i]) * before)
                   for i, f in enumerate((self.to_r, self.to_k, self.to_v)))
        return r, k, v

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        check_sequence(x, self.dim, mask, name="RWKV", layer=self)
        x = x if mask is None else torch.where(mask[..., None], x, torch.zeros((), dtype=x.dtype))
        r, k, v = self.project(x, x.new_zeros(x.shape[0], self.dim))
        out = wkv(k, v, self.time_decay.exp(), self.time_first, mask, causal=self.causal,
                  chunk=self.chunk)
        return self.to_out(r.sigmoid() * out)

    def step(self, x: torch.Tensor, state: decoding.DecodeState | None = None, *,
             mask: torch.Tensor | None = None) -> tuple[torch.Tensor, decoding.DecodeState]:
        """Decode a chunk `x` `(b, t, dim)` of new tokens after the context in `state` (None: none).
        Returns `(y, state)`; needs `causal=True`. See `zoo.core.decoding`."""
        return decoding.step(self, x, state, mask, self.decode)

    def decode(self, x: torch.Tensor, cache, mask: torch.Tensor | None, start: int):
        """The RNN form: the cache `((a, b, p), last token)`, three `(b, channels)` and one
        `(b, dim)`."""
        sums, previous = (None, x.new_zeros(x.shape[0], self.dim)) if cache is None else cache
        x = x if mask is None else torch.where(mask[..., None], x, torch.zeros((), dtype=x.dtype))
        r, k, v = self.project(x, previous)
        out, sums = wkv_step(k, v, self.time_decay.exp(), self.time_first, sums, mask)
        return self.to_out(r.sigmoid() * out), (sums, x[:, -1])

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.heads}, dim_head={self.dim_head}, causal={self.causal}, "
                f"chunk={self.chunk}")
