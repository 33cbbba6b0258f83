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

As in the paper, no constant is added to the features; performer-pytorch adds 1e-4 to each,
which changes outputs where key features are small, and with it at 0 the two are equal
(`tests/peers/`).
"""

import torch
from einops import einsum, rearrange

from zoo.core.checks import check_qkv
from zoo.core.features import (
    RandomFeatureHeads,
    favor_plus_features,
    favor_plus_key_shift,
    positive_features,
)
from zoo.core.linear import kernel_attention, kernel_attention_step, ratio
from zoo.core.masks import causal_mask


def favor_plus_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                   w: torch.Tensor, mask: torch.Tensor | None = None, *,
                                   causal: bool = False, chunk: int = 64) -> torch.Tensor:
    """FAVOR+ as the paper writes it: positive features of `q d^{-1/4}` and `k d^{-1/4}` (Lemma 1),
    their `(n, n)` product normalised by its row sums. q, k `(b, h, n, d)`, v `(b, h, n, e)`,
    w `(h, m, d)`; `chunk` is unused here."""
    check_qkv(q, k, v, mask, name="favor_plus_attention_reference")
    d = q.shape[-1]
    phi_q, phi_k = positive_features(q * d ** -0.25, w), positive_features(k * d ** -0.25, w)
    attn = einsum(phi_q, phi_k, "b h i m, b h j m -> b h i j")  # estimates e^{q.k / sqrt(d)}
    if mask is not None:
        attn = attn * rearrange(mask, "b j -> b 1 1 j")
    if causal:
        attn = attn * causal_mask(q.shape[2], k.shape[2], q.device)
    # D^{-1} A V, with the row sum D as one more column of the product (0 for a row with no key)
    ones = torch.ones_like(v[..., :1])
    return ratio(einsum(attn, torch.cat([v, ones], dim=-1), "b h i j, b h j e -> b h i e"))


def favor_plus_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor,
                         mask: torch.Tensor | None = None, *, causal: bool = False,
                         chunk: int = 64) -> torch.Tensor:
    """What the layer runs: `favor_plus_attention_reference` without the `(n, n)` map, with shifted
    exponents and chunked sums (tested equal). q, k `(b, h, n, d)`, v `(b, h, n, e)`, w `(h, m, d)`."""
    check_qkv(q, k, v, mask, name="favor_plus_attention")
    phi_q, phi_k = favor_plus_features(q, k, w, mask)
    return kernel_attention(phi_q, phi_k, v, mask, causal=causal, chunk=chunk)


class Performer(RandomFeatureHeads):
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
