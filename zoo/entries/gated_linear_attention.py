r"""Gated Linear Attention Transformers with Hardware-Efficient Training.

Linear attention whose `(d, e)` state forgets: before each write, every row of the state (one
per key feature) is multiplied by a data-dependent gate $\alpha_t \in (0, 1)^d$, computed from the
token by a low-rank projection and a sigmoid. Unrolled, a query weighs a key by the product of
the gates between them, feature by feature. The paper trains it chunkwise: within a chunk the
scores carry those products explicitly, across chunks a state is passed on, which keeps the
work in matrix products and the time linear in the length.

$$ S_t = \operatorname{diag}(\alpha_t)\, S_{t-1} + k_t^\top v_t, \qquad o_t = q_t S_t, \qquad
   \alpha_t = \sigma(x_t W_{\alpha_1} W_{\alpha_2} + b_\alpha)^{1/\tau} $$
$$ y_t = \big(\operatorname{swish}(x_t W_r + b_r) \odot \operatorname{LN}(o_t)\big) W_O $$

with queries scaled by $d^{-1/2}$, $\tau = 16$, the layer norm per head.

Deviations from the paper:
- key heads as wide as value heads (the paper halves the keys) and the per-head norm without
  affine parameters;
- `causal=False` is ours: the mirrored mask, the gates between the two positions, from a forward
  and a backward chunkwise pass;
- padded tokens neither write nor decay (their gates are 1).
"""

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from torch import nn

from zoo.core.checks import check_qkv, check_sequence, positive_int
from zoo.core.decay import decay_matrix, decay_recurrence, decayed_sum, fill_padded
from zoo.core.masks import zero_padded_tokens
from zoo.core.shell import MultiHead


def gla_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_alpha: torch.Tensor,
                  mask: torch.Tensor | None = None, *, causal: bool = False,
                  chunk: int = 64) -> torch.Tensor:
    r"""The parallel form: `o_i = sum_{j <= i} sum_f q_if k_jf prod_{j < t <= i} alpha_tf v_j`.

    Args:
        q, k: `(b, h, n, d)`. v: `(b, h, n, e)`. log_alpha: `(b, h, n, d)`, `log alpha <= 0`.
        mask: `(b, n)`, True = real token. chunk: unused here (the chunkwise form's size).

    Returns:
        `(b, h, n, e)`.
    """
    check_qkv(q, k, v, mask, name="gla")
    k, v, log_alpha = fill_padded(k, mask), fill_padded(v, mask), fill_padded(log_alpha, mask)
    decay = decay_matrix(log_alpha, causal=causal)  # (b h i j d)
    return einsum(q, k, decay, v, "b h i d, b h j d, b h i j d, b h j e -> b h i e")


def gla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_alpha: torch.Tensor,
        mask: torch.Tensor | None = None, *, causal: bool = False, chunk: int = 64) -> torch.Tensor:
    """The chunkwise form (Sec. 4): the same numbers as `gla_reference` in linear time."""
    check_qkv(q, k, v, mask, name="gla")
    k, v, log_alpha = fill_padded(k, mask), fill_padded(v, mask), fill_padded(log_alpha, mask)
    return decayed_sum(q, k, v, log_alpha, causal=causal, chunk=chunk)


def gla_step(q, k, v, log_alpha, state=None, mask=None):
    """The recurrent form over `t` new tokens: q, k, log_alpha `(b, h, t, d)`, v `(b, h, t, e)`,
    state `(b, h, d, e)` or None. Returns `(out (b, h, t, e), state)`."""
    k, v, log_alpha = fill_padded(k, mask), fill_padded(v, mask), fill_padded(log_alpha, mask)
    return decay_recurrence(q, k, v, log_alpha, state)


class GatedLinearAttention(MultiHead):
    """Multi-head gated linear attention. `(b, n, dim) -> (b, n, dim)`.

    Args:
        gate_rank: inner width of the low-rank gate projection `W_alpha1 W_alpha2`.
        tau: the gates' temperature, `alpha = sigmoid(.) ** (1 / tau)`.
        chunk: tokens per chunk of the chunkwise form (no effect on the result; memory grows as
            `n chunk d`).
    """

    def __init__(self, dim: int, *, heads: int = 8, dim_head: int | None = None,
                 causal: bool = False, gate_rank: int = 16, tau: float = 16.0, chunk: int = 16):
        super().__init__(dim, heads=heads, dim_head=dim_head, causal=causal)
        if not tau > 0:
            raise ValueError(f"GatedLinearAttention: tau must be positive, got {tau!r}")
        self.gate_rank, self.tau = positive_int(gate_rank, "gate_rank"), float(tau)
        self.chunk = positive_int(chunk, "chunk")
        inner = heads * self.dim_head
        self.to_alpha = nn.Sequential(nn.Linear(dim, gate_rank, bias=False), nn.Linear(gate_rank, inner))
        self.to_r = nn.Linear(dim, inner)

    def project(self, x):
        q, k, v = map(self.split_heads, self.to_qkv(x).chunk(3, dim=-1))
        log_alpha = self.split_heads(F.logsigmoid(self.to_alpha(x)) / self.tau)
        return q * self.dim_head ** -0.5, k, v, log_alpha

    def finish(self, x, out):
        out = F.layer_norm(out, out.shape[-1:])  # per head
        return self.to_out(F.silu(self.to_r(x)) * rearrange(out, "b h n e -> b n (h e)"))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        check_sequence(x, self.dim, mask, name="GatedLinearAttention", layer=self)
        x = zero_padded_tokens(x, mask)
        q, k, v, log_alpha = self.project(x)
        return self.finish(x, gla(q, k, v, log_alpha, mask, causal=self.causal, chunk=self.chunk))

    def decode(self, x: torch.Tensor, cache, mask: torch.Tensor | None, start: int):
        """The recurrence (`step` of the shell): the `(d, e)` state per head carried over."""
        out, cache = gla_step(*self.project(x), cache, mask)
        return self.finish(x, out), cache

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, gate_rank={self.gate_rank}, tau={self.tau}, chunk={self.chunk}"
