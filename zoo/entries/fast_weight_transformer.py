r"""Linear Transformers Are Secretly Fast Weight Programmers.

Linear attention is a fast weight programmer: every key-value pair is written into a weight
matrix by an outer product and every query reads that matrix. Purely additive writes pile up
and interfere once more pairs are stored than the key features have dimensions. The delta rule
fixes this: each step first reads what the fast weights currently return for the key, then
writes only the correction towards the new value, at a learned, input-dependent rate
$\beta_t \in (0, 1)$. Queries and keys go through DPFP, a deterministic, parameter-free feature
map (rectified $\pm x$ entries times cyclically shifted copies of themselves), normalised to sum
to one, which keeps the writes bounded.

$$ \bar v_t = W_{t-1}\, \phi(k_t), \qquad W_t = W_{t-1} + \beta_t\, (v_t - \bar v_t)\, \phi(k_t)^\top,
   \qquad y_t = W_t\, \phi(q_t), \qquad \beta_t = \sigma(w_\beta^\top x_t) $$
$$ \phi(x) = \frac{\varphi(x)}{\sum_l \varphi(x)_l}, \qquad
   \varphi(x)_{i + 2d(j - 1)} = r_i\, r_{i + j}, \quad r = \operatorname{ReLU}([x, -x]),
   \quad j = 1, \dots, \nu $$

with the indices of `r` (length `2d`) taken cyclically; `W` `(e, f)` is stored transposed as the
state `(f, e)`, with `f = 2 d nu`.

Deviations from the paper:
- the delta rule runs chunk by chunk: within a chunk of `c` tokens the corrections
  $\beta_t (v_t - \bar v_t)$ solve one unit lower-triangular system (for all chunks at once), and
  a loop over the `n / c` chunks carries the fast weights; the paper's kernel goes token by token.
- `causal=False` is ours (the paper's model is causal): every query reads the final weights `W_n`.
- padded tokens do not write ($\beta = 0$).
"""

import torch
from einops import einsum, rearrange
from torch import nn

from zoo.core.checks import check_qkv, check_sequence, positive_int
from zoo.core.masks import pad_to_multiple, safe_denominator, zero_padded_tokens
from zoo.core.shell import MultiHead


def dpfp(x: torch.Tensor, nu: int = 1) -> torch.Tensor:
    """The DPFP feature map: `(..., d) -> (..., 2 d nu)`, entry `i + 2d(j-1)` is `r_i r_{i+j}`."""
    r = torch.cat([x, -x], dim=-1).relu_()
    return torch.cat([r * r.roll(-j, dims=-1) for j in range(1, nu + 1)], dim=-1)


def sum_normalised(phi: torch.Tensor) -> torch.Tensor:
    """`phi / sum(phi)` over the last axis; an all-zero vector stays zero."""
    return phi / safe_denominator(phi.sum(-1, keepdim=True))


def delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, *,
               causal: bool = True, chunk: int = 64) -> torch.Tensor:
    """The delta rule on features, chunk by chunk.

    Args:
        q, k: `(b, h, n, f)` features. v: `(b, h, n, e)`. beta: `(b, h, n)` write rates.
        causal: `y_t = W_t q_t`; otherwise every query reads the final `W_n`.

    Returns:
        `(b, h, n, e)`.
    """
    n, c, e = v.shape[2], min(chunk, v.shape[2]), v.shape[-1]
    k, v = (rearrange(pad_to_multiple(t, c)[0], "b h (nc c) x -> b h nc c x", c=c) for t in (k, v))
    beta = rearrange(pad_to_multiple(beta, c, dim=-1)[0], "b h (nc c) -> b h nc c", c=c)
    # With S the state at the chunk's start, the corrections U (c, e) of its tokens satisfy
    # (I + diag(beta) tril(K K^T, -1)) U = diag(beta) (V - K S). One triangular solve per chunk,
    # against the (c, c) diag(beta), gives T = (I + ...)^-1 diag(beta); then U = T V - (T K) S.
    # the system built in place: three (c, c) passes fewer
    system = (k @ k.transpose(-1, -2)).tril_(-1).mul_(rearrange(beta, "... c -> ... c 1"))  # (b h nc c c)
    system.diagonal(dim1=-2, dim2=-1).fill_(1)
    weights = solve_unit_lower(system, torch.diag_embed(beta))  # (b h nc c c)
    from_v, from_k = weights @ v, weights @ k  # (b h nc c e), (b h nc c f)
    # (b h) as one batch axis, so each step below is one fused multiply-add
    k_t, from_v, from_k = (t.flatten(0, 1) for t in (k.transpose(-1, -2), from_v, from_k))
    state = k.new_zeros(k.shape[0] * k.shape[1], k.shape[-1], e)  # ((b h) f e)
    starts, corrections = [], []
    for i in range(k.shape[2]):  # over chunks, not tokens
        starts.append(state)
        u = torch.baddbmm(from_v[:, i], from_k[:, i], state, alpha=-1)  # U = T V - (T K) S
        state = torch.baddbmm(state, k_t[:, i], u)  # S + K^T U
        corrections.append(u)
    starts, corrections = (rearrange(torch.stack(t, dim=1), "(b h) nc x y -> b h nc x y",
                                     b=k.shape[0], h=k.shape[1]) for t in (starts, corrections))
    state = state.view(*k.shape[:2], *state.shape[1:])
    if not causal:
        return q @ state  # (b h n e)
    q = rearrange(pad_to_multiple(q, c)[0], "b h (nc c) f -> b h nc c f", c=c)
    out = q @ starts + (q @ k.transpose(-1, -2)).tril() @ corrections  # (b h nc c e)
    return rearrange(out, "b h nc c e -> b h (nc c) e")[:, :, :n]


def solve_unit_lower(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`a^-1 b` for unit lower-triangular `a` (in float32 at least: no bfloat16 kernel on CPU)."""
    dtype = torch.promote_types(a.dtype, torch.float32)
    out = torch.linalg.solve_triangular(a.to(dtype), b.to(dtype), upper=False, unitriangular=True)
    return out.to(b.dtype)


def delta_rule_step(q, k, v, beta, state=None):
    """One token of the recurrent form: q, k `(b, h, f)` features, v `(b, h, e)`, beta `(b, h)`,
    state `(b, h, f, e)` or None. Returns `(y (b, h, e), state)`."""
    if state is None:
        state = k.new_zeros(*k.shape, v.shape[-1])
    old = einsum(k, state, "b h f, b h f e -> b h e")  # \bar v_t
    state = state + einsum(k, beta[..., None] * (v - old), "b h f, b h e -> b h f e")
    return einsum(q, state, "b h f, b h f e -> b h e"), state


def fast_weight_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                          mask: torch.Tensor | None = None, *, causal: bool = False, nu: int = 1,
                          chunk: int = 64) -> torch.Tensor:
    """DPFP features, sum-normalised, written and read by the delta rule.

    q, k `(b, h, n, d)`, v `(b, h, n, e)`, beta `(b, h, n)`, mask `(b, n)` -> `(b, h, n, e)`.
    """
    check_qkv(q, k, v, mask, name="fast_weight_attention")
    if mask is not None:
        beta = beta * rearrange(mask, "b n -> b 1 n").to(beta.dtype)  # padded tokens do not write
    q, k = sum_normalised(dpfp(q, nu)), sum_normalised(dpfp(k, nu))
    return delta_rule(q, k, v, beta, causal=causal, chunk=chunk)


class FastWeightTransformer(MultiHead):
    """Multi-head delta-rule fast weights with DPFP features. `(b, n, dim) -> (b, n, dim)`.

    Args:
        nu: DPFP's number of cyclic shifts (features per head: `2 dim_head nu`).
        chunk: tokens per chunk of the delta rule (no effect on the result).
    """

    def __init__(self, dim: int, *, heads: int = 8, dim_head: int | None = None,
                 causal: bool = False, nu: int = 1, chunk: int = 64):
        super().__init__(dim, heads=heads, dim_head=dim_head, causal=causal)
        self.nu, self.chunk = positive_int(nu, "nu"), positive_int(chunk, "chunk")
        self.to_beta = nn.Linear(dim, heads, bias=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        check_sequence(x, self.dim, mask, name=type(self).__name__, layer=self)
        x = zero_padded_tokens(x, mask)
        q, k, v = map(self.split_heads, self.to_qkv(x).chunk(3, dim=-1))
        beta = rearrange(self.to_beta(x), "b n h -> b h n").sigmoid()
        out = fast_weight_attention(q, k, v, beta, mask, causal=self.causal, nu=self.nu,
                                    chunk=self.chunk)
        return self.to_out(self.merge_heads(out))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, nu={self.nu}, chunk={self.chunk}"
