r"""cosFormer: Rethinking Softmax in Attention.

Two properties of softmax attention are kept and the softmax dropped: the weights are
non-negative (a ReLU feature map) and nearby tokens weigh more (the weight is re-scaled by
$\cos(\frac{\pi}{2} \frac{i - j}{M})$, which falls from 1 to 0 as the distance grows to $M$). The
cosine of a difference splits into products, $\cos(a - b) = \cos a \cos b + \sin a \sin b$, so
the re-weighted map is still a dot product of features, $[\phi \cos, \phi \sin]$, and the
products reassociate into linear time, causally as prefix sums.

$$ O_i = \frac{\sum_j \operatorname{ReLU}(Q_i)^\top \operatorname{ReLU}(K_j)
   \cos\!\big(\tfrac{\pi}{2} \tfrac{i - j}{M}\big) V_j}
   {\sum_j \operatorname{ReLU}(Q_i)^\top \operatorname{ReLU}(K_j)
   \cos\!\big(\tfrac{\pi}{2} \tfrac{i - j}{M}\big)} $$

(the sums over $j \le i$ when causal), positions counted from 1.

Deviations from the paper:
- $M$ is a fixed `max_len` (default 4096), not the length of the sequence at hand (the paper's
  code takes $M = n$): a prefix's outputs must not change as the sequence grows, or causal
  decoding would be impossible; longer inputs are refused;
- no epsilon in the normaliser: a row whose weights are all zero (every ReLU feature zero) gives 0.
"""

import math

import torch
import torch.nn.functional as F
from einops import einsum, rearrange

from zoo.core.checks import check_qkv, check_sequence, positive_int
from zoo.core.decay import decay_recurrence, fill_padded
from zoo.core.linear import kernel_attention, ratio
from zoo.core.shell import MultiHead


def cosformer_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                  mask: torch.Tensor | None = None, *, causal: bool = False,
                                  max_len: int = 4096, start: int = 0,
                                  chunk: int = 64) -> torch.Tensor:
    """The paper's eq. (9) as an explicit `(n, n)` map: ReLU scores re-weighted by the cosine.

    Args:
        q, k: `(b, h, n, d)`. v: `(b, h, n, e)`. mask: `(b, n)`, True = real token.
        max_len: `M`. start: tokens before this chunk (its first position is `start + 1`).
        chunk: unused here (the linear form's chunk size).

    Returns:
        `(b, h, n, e)`.
    """
    check_qkv(q, k, v, mask, name="cosformer_attention")
    i = torch.arange(start + 1, start + q.shape[2] + 1, dtype=q.dtype, device=q.device)
    cos = torch.cos(math.pi / 2 * (i[:, None] - i[None, :]) / max_len)  # (i j)
    scores = einsum(F.relu(q), fill_padded(F.relu(k), mask), "b h i d, b h j d -> b h i j") * cos
    if causal:
        scores = scores.tril()
    return ratio(scores @ torch.cat([fill_padded(v, mask), torch.ones_like(v[..., :1])], dim=-1))


def cos_sin_features(x: torch.Tensor, max_len: int, start: int = 0) -> torch.Tensor:
    r"""`(b, h, n, d) -> (b, h, n, 2d)`: $[\operatorname{ReLU}(x) \cos \theta_i,
    \operatorname{ReLU}(x) \sin \theta_i]$ with $\theta_i = \frac{\pi}{2} \frac{i}{M}$."""
    i = torch.arange(start + 1, start + x.shape[2] + 1, dtype=x.dtype, device=x.device)
    theta = rearrange(math.pi / 2 * i / max_len, "n -> n 1")
    return torch.cat([F.relu(x) * theta.cos(), F.relu(x) * theta.sin()], dim=-1)


def cosformer_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        mask: torch.Tensor | None = None, *, causal: bool = False,
                        max_len: int = 4096, start: int = 0, chunk: int = 64) -> torch.Tensor:
    """The same numbers as `cosformer_attention_reference` in linear time (eq. 10-11): the cosine
    split into cos and sin features, the sums reassociated (chunkwise prefix sums when causal)."""
    check_qkv(q, k, v, mask, name="cosformer_attention")
    phi_q, phi_k = cos_sin_features(q, max_len, start), cos_sin_features(k, max_len, start)
    return kernel_attention(phi_q, fill_padded(phi_k, mask), fill_padded(v, mask), mask,
                            causal=causal, chunk=chunk)


class Cosformer(MultiHead):
    """Multi-head cosFormer attention. `(b, n, dim) -> (b, n, dim)`.

    Args:
        max_len: `M` of the re-weighting; longer sequences are refused.
        chunk: tokens per chunk of the causal prefix sums (no effect on the result).
    """

    def __init__(self, dim: int, *, heads: int = 8, dim_head: int | None = None,
                 causal: bool = False, max_len: int = 4096, chunk: int = 64):
        super().__init__(dim, heads=heads, dim_head=dim_head, causal=causal)
        self.max_len, self.chunk = positive_int(max_len, "max_len"), positive_int(chunk, "chunk")

    def check_length(self, n: int, name: str) -> None:
        if n > self.max_len:
            raise ValueError(f"{name}: {n} tokens, but the cos re-weighting is defined up to "
                             f"max_len={self.max_len}; build the layer with a larger max_len")

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        check_sequence(x, self.dim, mask, name="Cosformer")
        self.check_length(x.shape[1], "Cosformer")
        return super().forward(x, mask)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        return cosformer_attention(q, k, v, mask, causal=self.causal, max_len=self.max_len,
                                   chunk=self.chunk)

    def decode(self, x: torch.Tensor, cache, mask: torch.Tensor | None, start: int):
        """The recurrent form (`step` of the shell): the key-value sums `(2d, e + 1)` per head, the
        normaliser as the last column, the positions counted from `start`."""
        self.check_length(start + x.shape[1], "Cosformer.step")
        q, k, v = map(self.split_heads, self.to_qkv(x).chunk(3, dim=-1))
        phi_q, phi_k = cos_sin_features(q, self.max_len, start), cos_sin_features(k, self.max_len, start)
        v = torch.cat([fill_padded(v, mask), torch.ones_like(v[..., :1])], dim=-1)
        out, cache = decay_recurrence(phi_q, fill_padded(phi_k, mask), v, None, cache)
        return self.to_out(self.merge_heads(ratio(out))), cache

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, max_len={self.max_len}, chunk={self.chunk}"
