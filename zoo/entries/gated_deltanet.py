r"""Gated Delta Networks: Improving Mamba2 with Delta Rule.

Two ways for a linear-attention state to make room, combined. The gate (Mamba-2's) shrinks the
whole state by a data-dependent $\alpha_t \in (0, 1)$, forgetting quickly and wholesale; the delta
rule (DeltaNet's) first reads what the state returns for the new key and writes only the
correction towards the new value, at a rate $\beta_t$, replacing one association without
disturbing the others. Training is chunkwise: within a chunk the corrections solve one
triangular system (the WY representation, built by the UT transform), with the gates' products
folded in, and a state is carried across chunks.

$$ S_t = \alpha_t S_{t-1} + k_t u_t^\top, \qquad
   u_t = \beta_t \big(v_t - (\alpha_t S_{t-1})^\top k_t\big), \qquad o_t = S_t^\top q_t $$

that is $S_t = \alpha_t (I - \beta_t k_t k_t^\top) S_{t-1} + \beta_t k_t v_t^\top$, with the state
stored `(d, e)`; $q, k$ L2-normalised (and $q$ scaled by $d^{-1/2}$), $\beta_t = \sigma(W_\beta x_t)$,
$\log \alpha_t = -e^{A} \operatorname{softplus}(W_\alpha x_t + b)$, and the output
$\big(\operatorname{RMSNorm}(o_t) \odot \operatorname{swish}(W_g x_t)\big) W_O$.

Deviations from the paper:
- no short convolutions (nor the SiLU after them) on q, k, v; the per-head RMSNorm has no
  affine parameters;
- `causal=False` is ours (the paper's model is causal): every query reads the final state $S_n$;
- padded tokens neither write nor decay ($\beta = 0$, $\alpha = 1$).
"""

import math

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from torch import nn

from zoo.core.checks import check_qkv, check_sequence, positive_int
from zoo.core.decay import fill_padded
from zoo.core.masks import causal_mask, neg_fill, pad_to_multiple, zero_padded_tokens
from zoo.core.shell import MultiHead


def gated_delta_rule_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                               log_alpha: torch.Tensor, mask: torch.Tensor | None = None, *,
                               causal: bool = False, chunk: int = 64) -> torch.Tensor:
    """The gated delta rule step by step (eq. 10), the specification.

    Args:
        q, k: `(b, h, n, d)`. v: `(b, h, n, e)`. beta: `(b, h, n)` write rates in (0, 1).
        log_alpha: `(b, h, n)`, `log alpha <= 0`. mask: `(b, n)`, True = real token.
        causal: `o_t = S_t^T q_t`; otherwise every query reads the final state.
        chunk: unused here (the chunkwise form's size).

    Returns:
        `(b, h, n, e)`.
    """
    check_qkv(q, k, v, mask, name="gated_delta_rule")
    k, v, beta, log_alpha = (fill_padded(t, mask) for t in (k, v, beta, log_alpha))
    outs, state = gated_delta_steps(q, k, v, beta, log_alpha)
    return torch.stack(outs, dim=2) if causal else q @ state


def gated_delta_steps(q, k, v, beta, log_alpha, state=None):
    """The recurrence over `t` tokens (inputs `(b, h, t, .)`), from `state` `(b, h, d, e)` or zeros.
    Returns `(list of t outputs (b, h, e), state)`."""
    if state is None:
        state = v.new_zeros(*k.shape[:2], k.shape[-1], v.shape[-1])
    outs = []
    for t in range(v.shape[2]):
        state = state * log_alpha[:, :, t, None, None].exp()  # alpha_t S_{t-1}
        old = einsum(k[:, :, t], state, "b h d, b h d e -> b h e")  # what the state returns for k_t
        u = beta[:, :, t, None] * (v[:, :, t] - old)
        state = state + einsum(k[:, :, t], u, "b h d, b h e -> b h d e")
        outs.append(einsum(q[:, :, t], state, "b h d, b h d e -> b h e"))
    return outs, state


def solve_unit_lower(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`a^-1 b` for unit lower-triangular `a` (in float32 at least: no bfloat16 kernel on CPU)."""
    dtype = torch.promote_types(a.dtype, torch.float32)
    out = torch.linalg.solve_triangular(a.to(dtype), b.to(dtype), upper=False, unitriangular=True)
    return out.to(b.dtype)


def gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                     log_alpha: torch.Tensor, mask: torch.Tensor | None = None, *,
                     causal: bool = False, chunk: int = 64) -> torch.Tensor:
    r"""The chunkwise form (Sec. 3.3): the same numbers as `gated_delta_rule_reference`.

    With `S` the state entering a chunk, `g` the cumulative log-gates within it and
    `G_ts = exp(g_t - g_s)` (`s <= t`), the chunk's corrections `U` solve
    `(I + diag(beta) tril(K K^T * G, -1)) U = diag(beta) (V - diag(e^g) K S)`: with
    `T = (I + ...)^-1 diag(beta)` (the UT transform), `U = T V - T diag(e^g) K S`. Then
    `O = diag(e^g) Q S + tril(Q K^T * G) U` and the next state is `e^{g_c} S + (e^{g_c - g} K)^T U`.
    """
    check_qkv(q, k, v, mask, name="gated_delta_rule")
    k, v, beta, log_alpha = (fill_padded(t, mask) for t in (k, v, beta, log_alpha))
    n, c = v.shape[2], min(chunk, v.shape[2])
    q, k, v = (rearrange(pad_to_multiple(t, c)[0], "b h (nc c) x -> b h nc c x", c=c) for t in (q, k, v))
    beta, g = (rearrange(pad_to_multiple(t, c, dim=-1)[0], "b h (nc c) -> b h nc c", c=c)
               for t in (beta, log_alpha))
    g = g.cumsum(dim=-1)
    keep = causal_mask(c, c, g.device)
    gaps = (g.unsqueeze(-1) - g.unsqueeze(-2)).masked_fill(~keep, neg_fill(g.dtype)).exp()  # G
    system = (k @ k.transpose(-1, -2) * gaps).tril(-1) * beta.unsqueeze(-1)  # (b h nc c c)
    system = system + torch.eye(c, dtype=system.dtype, device=system.device)
    weights = solve_unit_lower(system, torch.diag_embed(beta))  # T
    from_v, from_k = weights @ v, weights @ (k * g.exp().unsqueeze(-1))
    inner = (q @ k.transpose(-1, -2)) * gaps  # (b h nc c c), zero above the diagonal
    to_end = k * (g[..., -1:] - g).exp().unsqueeze(-1)
    state, outs = v.new_zeros(*k.shape[:2], k.shape[-1], v.shape[-1]), []
    for i in range(k.shape[2]):  # over chunks, not tokens
        u = from_v[:, :, i] - from_k[:, :, i] @ state
        outs.append(q[:, :, i] * g[:, :, i, :, None].exp() @ state + inner[:, :, i] @ u)
        state = g[:, :, i, -1, None, None].exp() * state + to_end[:, :, i].transpose(-1, -2) @ u
    if not causal:
        return rearrange(q, "b h nc c d -> b h (nc c) d")[:, :, :n] @ state
    return rearrange(torch.stack(outs, dim=2), "b h nc c e -> b h (nc c) e")[:, :, :n]


class GatedDeltanet(MultiHead):
    """Multi-head gated delta rule. `(b, n, dim) -> (b, n, dim)`.

    Args:
        chunk: tokens per chunk of the chunkwise form (no effect on the result).
    """

    def __init__(self, dim: int, *, heads: int = 8, dim_head: int | None = None,
                 causal: bool = False, chunk: int = 64):
        super().__init__(dim, heads=heads, dim_head=dim_head, causal=causal)
        self.chunk = positive_int(chunk, "chunk")
        self.to_beta, self.to_alpha = nn.Linear(dim, heads), nn.Linear(dim, heads, bias=False)
        self.to_gate = nn.Linear(dim, heads * self.dim_head, bias=False)
        g = torch.Generator().manual_seed(0)
        dt = torch.exp(torch.rand(heads, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt), as Mamba-2
        self.a_log = nn.Parameter(torch.log(1 + 15 * torch.rand(heads, generator=g)))

    def project(self, x):
        q, k, v = map(self.split_heads, self.to_qkv(x).chunk(3, dim=-1))
        q, k = F.normalize(q, dim=-1) * self.dim_head ** -0.5, F.normalize(k, dim=-1)
        beta = rearrange(self.to_beta(x).sigmoid(), "b n h -> b h n")
        # softplus on a contiguous (b h n) copy: on the permuted view, torch.compile's meta
        # strides for softplus' backward disagree with eager's and AOT autograd's backward
        # fails on a view (torch 2.13; found by zoo compat).
        dt = F.softplus(rearrange(self.to_alpha(x) + self.dt_bias, "b n h -> b h n").contiguous())
        return q, k, v, beta, dt * -self.a_log.exp()[:, None]

    def finish(self, x, out):
        out = F.rms_norm(out, out.shape[-1:])  # per head
        return self.to_out(self.merge_heads(out) * F.silu(self.to_gate(x)))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        check_sequence(x, self.dim, mask, name="GatedDeltanet", layer=self)
        x = zero_padded_tokens(x, mask)
        out = gated_delta_rule(*self.project(x), mask, causal=self.causal, chunk=self.chunk)
        return self.finish(x, out)

    def decode(self, x: torch.Tensor, cache, mask: torch.Tensor | None, start: int):
        """The step-by-step rule (`step` of the shell): the state `S` `(d, e)` per head carried over."""
        q, *rest = self.project(x)
        outs, cache = gated_delta_steps(q, *(fill_padded(t, mask) for t in rest), cache)
        return self.finish(x, torch.stack(outs, dim=2)), cache

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, chunk={self.chunk}"
