r"""Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention.

Replace the softmax kernel by a dot product of feature maps, $\phi(x) = \operatorname{elu}(x) + 1$.
Matrix products then reassociate: the keys and values are summed once into a `(d, e)` state that
every query reads, so time and memory are linear in the length. Under causality the state is a
prefix sum, which makes the layer an RNN: one token at a time with a running state.

$$ O_i = \frac{\phi(Q_i)^\top \sum_{j} \phi(K_j)\, V_j^\top}{\phi(Q_i)^\top \sum_{j} \phi(K_j)} $$

(the sums run over $j \le i$ when causal).

Deviations from the paper: none. The causal prefix sums are computed chunk by chunk
(`zoo.core.linear.causal_sum`), the same sums without storing the `(n, d, e)` prefix tensor, as the
paper's CUDA kernel avoids it too.
"""

import torch
import torch.nn.functional as F
from einops import einsum, reduce

from zoo.core.checks import check_qkv, nonnegative_float
from zoo.core.linear import causal_sum
from zoo.core.masks import zero_padded
from zoo.core.shell import MultiHead


def elu_feature_map(x: torch.Tensor) -> torch.Tensor:
    """phi(x) = elu(x) + 1, positive everywhere (the paper's eq. 7)."""
    return F.elu(x) + 1


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     mask: torch.Tensor | None = None, *, causal: bool = False,
                     eps: float = 1e-6) -> torch.Tensor:
    """Linear attention with the elu+1 feature map.

    Args:
        q, k: `(b, h, n, d)`. v: `(b, h, n, e)`. mask: `(b, n)`, True = real token.
        causal: position `i` reads only keys `j <= i` (prefix sums, eq. 10-12).
        eps: added to the normaliser, so a row with no key gives 0, not NaN.

    Returns:
        `(b, h, n, e)`.
    """
    check_qkv(q, k, v, mask, name="linear_attention")
    q, k = elu_feature_map(q), zero_padded(elu_feature_map(k), mask)
    if causal:
        # the prefix sums of eq. (10-12), chunk by chunk; a column of ones carries the normaliser
        sums = causal_sum(q, k, torch.cat([v, torch.ones_like(v[..., :1])], dim=-1))
        num, den = sums[..., :-1], sums[..., -1]
    else:
        state = einsum(k, v, "b h j d, b h j e -> b h d e")
        norm = reduce(k, "b h j d -> b h d", "sum")
        num = einsum(q, state, "b h i d, b h d e -> b h i e")
        den = einsum(q, norm, "b h i d, b h d -> b h i")
    return num / (den.unsqueeze(-1) + eps)


def linear_attention_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          state: tuple[torch.Tensor, torch.Tensor] | None = None, *,
                          eps: float = 1e-6):
    """One step of the RNN form (eq. 16-20): read token `t`, update the running state.

    Args:
        q, k: `(b, h, d)`, v: `(b, h, e)`: the current token.
        state: `(s, z)` with `s` `(b, h, d, e)` and `z` `(b, h, d)`; None starts from zeros.

    Returns:
        `(out, state)` with `out` `(b, h, e)`.
    """
    q, k = elu_feature_map(q), elu_feature_map(k)
    if state is None:
        state = (q.new_zeros(*q.shape, v.shape[-1]), q.new_zeros(q.shape))
    s, z = state
    s = s + einsum(k, v, "b h d, b h e -> b h d e")
    z = z + k
    out = einsum(q, s, "b h d, b h d e -> b h e") / (einsum(q, z, "b h d, b h d -> b h") + eps
                                                     ).unsqueeze(-1)
    return out, (s, z)


class LinearTransformer(MultiHead):
    """Multi-head linear attention. `(b, n, dim) -> (b, n, dim)`."""

    def __init__(self, dim: int, *, heads: int = 8, dim_head: int | None = None,
                 causal: bool = False, eps: float = 1e-6):
        super().__init__(dim, heads=heads, dim_head=dim_head, causal=causal)
        self.eps = nonnegative_float(eps, "eps")

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        return linear_attention(q, k, v, mask, causal=self.causal, eps=self.eps)
