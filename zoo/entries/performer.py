r"""Rethinking Attention with Performers.

FAVOR+ estimates the softmax kernel with positive random features: the exponential of a random
projection, damped by the vector's squared length. Every feature product is positive, so the
estimated attention weights and their normaliser are too, and the estimate is most accurate
exactly where softmax weights are small, which is where the sine/cosine features of FAVOR fail.
Projections orthogonal to each other lower the variance further. As in FAVOR, the attention
matrix factors into thin feature matrices: keys and values fold into an `(m, e)` state (a prefix
sum when causal), linear in the length.

$$ \phi(x) = \frac{1}{\sqrt{m}}\, e^{-\|x\|^2/2} \big[e^{w_1^\top x}, \dots, e^{w_m^\top x}\big],
   \qquad \mathbb{E}_{w \sim \mathcal{N}(0, I)}\big[\phi(x)^\top \phi(y)\big] = e^{x^\top y} $$
$$ O = \operatorname{diag}\big(\phi(Q')\, \phi(K')^\top \mathbf{1}\big)^{-1}\,
   \phi(Q') \big(\phi(K')^\top V\big), \qquad Q' = d^{-1/4} Q,\ K' = d^{-1/4} K $$

Deviations from the paper:
- the exponents are shifted for stability: each query's by its own largest exponent, the keys'
  by their largest exponent over the real keys (per batch and head, detached). Both constants
  cancel in the ratio; causally the keys' constant also covers later keys, which can change
  earlier outputs by rounding only (or, at extreme inputs, make an early row underflow to 0).
- the causal prefix sums are computed chunk by chunk (`chunk` tokens at a time): the same
  sums, without the `(n, m, e)` prefix tensor.
- the projections are drawn once at construction from `seed`; `redraw=True` draws new ones at
  every call in training mode (the paper's feature redrawing); eval mode never redraws.
- only the positive features of the softmax kernel (no hyperbolic variant, no generalised
  kernels).
"""

import torch
from einops import einsum, rearrange

from zoo.core.checks import check_qkv
from zoo.core.linear import kernel_attention, kernel_attention_step
from zoo.core.masks import neg_fill
from zoo.entries.performer_favor import PerformerFavor, key_shift


def softmax_kernel_exponent(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """`w_r^T x - |x|^2 / 2`: x `(b, h, n, d)`, w `(h, m, d)` -> `(b, h, n, m)`."""
    return einsum(x, w, "b h n d, h m d -> b h n m") - x.square().sum(-1, keepdim=True) / 2


def positive_features(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The positive random features, unshifted (Lemma 1): `exp(w_r^T x - |x|^2 / 2) / sqrt(m)`."""
    return softmax_kernel_exponent(x, w).exp() / w.shape[-2] ** 0.5


def favor_plus_features(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor,
                        mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The features of `q d^{-1/4}` and `k d^{-1/4}` up to factors that cancel in the ratio.

    Dropped: for each query, `exp(-|q|^2 / 2) / sqrt(m)` and its largest exponent; for the keys,
    `1 / sqrt(m)` and their largest exponent over the real keys (per batch and head). Padded keys
    get 0. Returns `(b, h, n, m)` twice.
    """
    q, k = q * q.shape[-1] ** -0.25, k * k.shape[-1] ** -0.25  # q'.k' = q.k / sqrt(d)
    # each shift is an (n, 1) column subtracted once, then exp in place: two passes per tensor
    proj_q = einsum(q, w, "b h n d, h m d -> b h n m")
    phi_q = proj_q.sub_(proj_q.detach().amax(dim=-1, keepdim=True)).exp_()
    proj_k = einsum(k, w, "b h n d, h m d -> b h n m")
    half_norm = k.square().sum(-1, keepdim=True) / 2  # (b h n 1)
    offset = half_norm + key_shift(proj_k.detach().amax(dim=-1, keepdim=True) - half_norm, mask)
    # padded keys: exp(w^T k - the largest finite number) = 0
    if mask is not None:
        offset = offset.masked_fill(~rearrange(mask, "b n -> b 1 n 1"), -neg_fill(offset.dtype))
    return phi_q, proj_k.sub_(offset).exp_()


def favor_plus_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor,
                         mask: torch.Tensor | None = None, *, causal: bool = False,
                         chunk: int = 64) -> torch.Tensor:
    """FAVOR+ attention. q, k `(b, h, n, d)`, v `(b, h, n, e)`, w `(h, m, d)` -> `(b, h, n, e)`."""
    check_qkv(q, k, v, mask, name="favor_plus_attention")
    phi_q, phi_k = favor_plus_features(q, k, w, mask)
    return kernel_attention(phi_q, phi_k, v, mask, causal=causal, chunk=chunk)


class Performer(PerformerFavor):
    """Multi-head FAVOR+ attention. `(b, n, dim) -> (b, n, dim)`.

    The hyper-parameters are FAVOR's (see performer-favor); only the feature map differs, and
    here `features` is the number of positive features `m`.
    """

    def __init__(self, dim: int, *, heads: int = 8, dim_head: int | None = None,
                 causal: bool = False, features: int = 256, orthogonal: bool = True,
                 redraw: bool = False, seed: int = 0, chunk: int = 64):
        super().__init__(dim, heads=heads, dim_head=dim_head, causal=causal, features=features,
                         orthogonal=orthogonal, redraw=redraw, seed=seed, chunk=chunk)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        return favor_plus_attention(q, k, v, self.current_projection(), mask, causal=self.causal,
                                    chunk=self.chunk)

    def attend_step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache,
                    mask: torch.Tensor | None = None, start: int = 0):
        """The recurrent form on a chunk: the `(m, e)` sums carried from the chunk before; the
        keys' stabilising shift is the largest seen so far (`zoo.core.linear.causal_sum_step`)."""
        w = self.current_projection()
        phi_q, phi_k = favor_plus_features(q, k, w, mask)
        return kernel_attention_step(phi_q, phi_k, v, cache, mask, chunk=self.chunk,
                                     key_log_scale=favor_plus_key_shift(k, w, mask))


def favor_plus_key_shift(k: torch.Tensor, w: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The keys' shift `favor_plus_features` drops, `(b, h)`: its largest exponent over the real keys."""
    k = k * k.shape[-1] ** -0.25
    proj_k = einsum(k, w, "b h n d, h m d -> b h n m")
    exponent = proj_k.amax(dim=-1, keepdim=True) - k.square().sum(-1, keepdim=True) / 2
    return key_shift(exponent, mask)[..., 0, 0]
