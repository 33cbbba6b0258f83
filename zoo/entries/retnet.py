r"""Retentive Network: A Successor to Transformer for Large Language Models.

Retention is linear attention without a softmax or a normaliser whose state decays by a fixed
factor per head, $\gamma_h = 1 - 2^{-5-h}$: a query weighs a key `i - j` tokens back by
$\gamma^{i-j}$. Queries and keys are rotated by their positions (the paper's $e^{in\theta}$,
rotary embeddings). The same numbers come from three forms: parallel ($(QK^\top \odot D)V$, for
training), recurrent ($S_n = \gamma S_{n-1} + K_n^\top V_n$, for decoding: a constant-size state)
and chunkwise (parallel inside chunks, recurrent across them: linear time). Each head's output is
normalised (GroupNorm) and gated by $\operatorname{swish}(X W_G)$.

$$ \operatorname{Retention}(X) = (Q K^\top \odot D)\, V, \qquad
   D_{nm} = \gamma^{n-m} \text{ for } n \ge m, \text{ else } 0, $$
$$ \operatorname{MSR}(X) = \big(\operatorname{swish}(X W_G) \odot
   \operatorname{GroupNorm}_h(\operatorname{Retention}_h(X))\big) W_O $$

with $Q = (X W_Q) \odot \Theta$, $K = (X W_K) \odot \bar\Theta$ and keys scaled by $d^{-1/2}$.

Deviations from the paper:
- the value heads are as wide as the key heads (the paper doubles them) and the GroupNorm has no
  affine parameters; the retention-score normalisations of Sec. 3.2 are left out (the GroupNorm
  is invariant to them);
- `causal=False` is ours: the mirrored decay $\gamma^{|n-m|}$ (as bidirectional retention in
  vision models), computed as a forward and a backward chunkwise pass;
- padded tokens do not write to the state (it still decays: positions are positions).
"""

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from torch import nn

from zoo.core.checks import check_qkv, check_sequence, positive_int
from zoo.core.decay import decay_matrix, decay_recurrence, decayed_sum, fill_padded
from zoo.core.masks import zero_padded_tokens
from zoo.core.shell import MultiHead


def retention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gamma: torch.Tensor,
                        mask: torch.Tensor | None = None, *, causal: bool = False,
                        chunk: int = 64) -> torch.Tensor:
    r"""The parallel form (eq. 5): `(Q K^T * D) V`, `D_nm = gamma^(n - m)` below the diagonal.

    Args:
        q, k: `(b, h, n, d)`, rotated and scaled. v: `(b, h, n, e)`. log_gamma: `(h,)`, `log gamma`.
        mask: `(b, n)`, True = real token. chunk: unused here (the chunkwise form's size).

    Returns:
        `(b, h, n, e)`.
    """
    check_qkv(q, k, v, mask, name="retention")
    k, v = fill_padded(k, mask), fill_padded(v, mask)
    log_decay = log_gamma[:, None].expand(*q.shape[:3])  # (b h n)
    scores = einsum(q, k, "b h i d, b h j d -> b h i j") * decay_matrix(log_decay, causal=causal)
    return scores @ v


def retention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gamma: torch.Tensor,
              mask: torch.Tensor | None = None, *, causal: bool = False,
              chunk: int = 64) -> torch.Tensor:
    """The chunkwise form (eq. 7): the same numbers as `retention_reference` in linear time."""
    check_qkv(q, k, v, mask, name="retention")
    k, v = fill_padded(k, mask), fill_padded(v, mask)
    log_decay = log_gamma[:, None].expand(*q.shape[:3])  # (b h n)
    return decayed_sum(q, k, v, log_decay, causal=causal, chunk=chunk)


def retention_step(q, k, v, log_gamma, state=None, mask=None):
    """The recurrent form (eq. 6) over `t` new tokens: q, k `(b, h, t, d)`, v `(b, h, t, e)`,
    state `(b, h, d, e)` or None. Returns `(out (b, h, t, e), state)`."""
    k, v = fill_padded(k, mask), fill_padded(v, mask)
    return decay_recurrence(q, k, v, log_gamma[:, None].expand(*q.shape[:3]), state)


def rotate(x: torch.Tensor, start: int = 0, base: float = 10000.0) -> torch.Tensor:
    r"""`x` `(b, h, n, d)` times $e^{i n \theta}$, the pairs `(x_{2i}, x_{2i+1})` as complex numbers,
    `n` counted from `start`, $\theta_i = \text{base}^{-2i/d}$."""
    d = x.shape[-1]
    theta = base ** (-torch.arange(0, d, 2, dtype=x.dtype, device=x.device) / d)  # (d/2)
    angle = torch.arange(start, start + x.shape[2], dtype=x.dtype, device=x.device)[:, None] * theta
    pairs = rearrange(x, "... (f two) -> ... f two", two=2)
    even, odd = pairs.unbind(-1)
    cos, sin = angle.cos(), angle.sin()
    return rearrange(torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1),
                     "... f two -> ... (f two)")


class RetNet(MultiHead):
    """Multi-scale retention. `(b, n, dim) -> (b, n, dim)`.

    Args:
        chunk: tokens per chunk of the chunkwise form (no effect on the result).
    """

    def __init__(self, dim: int, *, heads: int = 8, dim_head: int | None = None,
                 causal: bool = False, chunk: int = 64):
        super().__init__(dim, heads=heads, dim_head=dim_head, causal=causal)
        if self.dim_head % 2:
            raise ValueError(f"RetNet: dim_head must be even (rotations act on pairs), got "
                             f"{self.dim_head}")
        self.chunk = positive_int(chunk, "chunk")
        self.to_gate = nn.Linear(dim, heads * self.dim_head, bias=False)
        gammas = 1 - 2.0 ** (-5 - torch.arange(heads, dtype=torch.float64))
        self.register_buffer("log_gamma", gammas.log().float())

    def project(self, x, start=0):
        q, k, v = map(self.split_heads, self.to_qkv(x).chunk(3, dim=-1))
        return rotate(q, start), rotate(k, start) * self.dim_head ** -0.5, v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        """Retention of rotated, scaled q, k: `A(q, k) v`, linear in v."""
        return retention(q, k, v, self.log_gamma.to(q.dtype), mask, causal=self.causal,
                         chunk=self.chunk)

    def finish(self, x, out):
        out = F.layer_norm(out, out.shape[-1:])  # GroupNorm, one group per head
        return self.to_out(self.merge_heads(out) * F.silu(self.to_gate(x)))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        check_sequence(x, self.dim, mask, name="RetNet", layer=self)
        x = zero_padded_tokens(x, mask)
        return self.finish(x, self.attend(*self.project(x), mask))

    def decode(self, x: torch.Tensor, cache, mask: torch.Tensor | None, start: int):
        """The recurrent form (`step` of the shell): the `(d, e)` state per head carried over, the
        rotations counted from `start`."""
        q, k, v = self.project(x, start)
        out, cache = retention_step(q, k, v, self.log_gamma.to(x.dtype), cache, mask)
        return self.finish(x, out), cache

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, chunk={self.chunk}"
