r"""Masked Language Modeling for Proteins via Linearly Scalable Long-Context Transformers.

FAVOR (Fast Attention Via Orthogonal Random features) writes the softmax kernel as a Gaussian
kernel between the same vectors, times a scalar per query and per key, and estimates the Gaussian
kernel with random Fourier features: sines and cosines of random projections whose directions are
orthogonal. The attention matrix becomes a product of two thin feature matrices, so the keys and
values fold into an `(f, e)` state before any query reads it, and time and memory are linear in
the length; causal attention keeps that state as a prefix sum. The kernel estimate is unbiased,
but its normaliser is a sum of signed terms that can come close to zero (FAVOR+ fixes that).

$$ e^{q^\top k} = e^{\|q\|^2/2}\, e^{-\|q - k\|^2/2}\, e^{\|k\|^2/2}, \qquad
   \phi(x) = \frac{e^{\|x\|^2/2}}{\sqrt{m}} \big[\sin(W x),\ \cos(W x)\big] $$
$$ O = \operatorname{diag}\big(\phi(Q')\, \phi(K')^\top \mathbf{1}\big)^{-1}\,
   \phi(Q') \big(\phi(K')^\top V\big), \qquad Q' = d^{-1/4} Q,\ K' = d^{-1/4} K $$

with `W` `(m, d)` Gaussian rows, orthogonal within blocks of `d`; `features` is `m` (so `f = 2m`).

`favor_attention_reference` is these equations as written; `favor_attention`, what the layer
runs, computes the same with the features and the projection sampler of `zoo.core.features`
(shared with the later random-feature entries) and the chunked sums of `zoo.core.linear`.

Deviations from the paper:
- only the softmax kernel's trigonometric features; the paper's other generalised kernels are
  left out.
- the factor $e^{\|q\|^2/2}$ cancels in each row's ratio and is dropped; the keys' exponent is
  shifted by its largest value over the real keys (a constant per batch and head, detached, which
  cancels too), so large inputs do not overflow. Causally that constant also covers later keys:
  they can change earlier outputs by rounding only.
- the causal prefix sums are computed chunk by chunk (`chunk` tokens at a time): the same sums,
  without storing the `(n, f, e)` prefix tensor.
- random features are drawn once at construction from `seed`; `redraw=True` draws new ones at
  every call in training mode (from torch's global generator); eval mode never redraws.
"""

import torch
from einops import einsum, rearrange

from zoo.core.checks import check_qkv
from zoo.core.features import RandomFeatureHeads, exp_over_keys, key_shift, trig_features
from zoo.core.linear import kernel_attention, kernel_attention_step, ratio
from zoo.core.masks import causal_mask


def favor_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor,
                              mask: torch.Tensor | None = None, *, causal: bool = False,
                              chunk: int = 64) -> torch.Tensor:
    """FAVOR as the paper writes it: the `(n, n)` estimate of the softmax kernel, normalised by its
    row sums. q, k `(b, h, n, d)`, v `(b, h, n, e)`, w `(h, m, d)`; `chunk` is unused here."""
    check_qkv(q, k, v, mask, name="favor_attention_reference")
    d, m = q.shape[-1], w.shape[-2]
    q, k = q * d ** -0.25, k * d ** -0.25  # q'.k' = q.k / sqrt(d)

    def phi(x):  # e^{|x|^2/2} / sqrt(m) [sin(W x), cos(W x)]
        proj = einsum(x, w, "b h n d, h m d -> b h n m")
        return (x.square().sum(-1, keepdim=True) / 2).exp() / m ** 0.5 * torch.cat(
            [proj.sin(), proj.cos()], dim=-1)

    attn = einsum(phi(q), phi(k), "b h i f, b h j f -> b h i j")  # estimates e^{q'.k'}
    if mask is not None:
        attn = attn * rearrange(mask, "b j -> b 1 1 j")
    if causal:
        attn = attn * causal_mask(q.shape[2], k.shape[2], q.device)
    # D^{-1} A V, with the row sum D as one more column of the product (0 for a row with no key)
    ones = torch.ones_like(v[..., :1])
    return ratio(einsum(attn, torch.cat([v, ones], dim=-1), "b h i j, b h j e -> b h i e"))


def favor_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor,
                    mask: torch.Tensor | None = None, *, causal: bool = False,
                    chunk: int = 64) -> torch.Tensor:
    """What the layer runs: the same result as `favor_attention_reference` without the `(n, n)`
    map, the features factored out and summed in chunks (tested equal in float64)."""
    check_qkv(q, k, v, mask, name="favor_attention")
    d = q.shape[-1]
    w = w * d ** -0.25  # W q' = W q d^{-1/4}, so that q'.k' = q.k / sqrt(d)
    # 1/sqrt(m) and e^{|q'|^2/2} cancel row by row; e^{|k'|^2/2} is a scalar per key, applied to the
    # narrower values by kernel_attention, shifted by its largest value (which cancels too)
    phi_q, phi_k = trig_features(q, w, normalise=False), trig_features(k, w, normalise=False)
    weight = exp_over_keys(k.square().sum(-1, keepdim=True) / (2 * d ** 0.5), mask)  # (b h n 1)
    return kernel_attention(phi_q, phi_k, v, mask, causal=causal, chunk=chunk, key_weight=weight)


class PerformerFavor(RandomFeatureHeads):
    """Multi-head FAVOR attention. `(b, n, dim) -> (b, n, dim)`.

    Args:
        features: number of random projections `m`; the feature map has `2m` entries, so the
            default 128 matches the performer entry's 256 features.
        orthogonal: orthogonal projections (FAVOR) rather than i.i.d. Gaussian ones.
        redraw: draw new projections at every call in training mode.
        seed: seed of the projections drawn at construction.
        chunk: tokens per chunk of the causal sums (no effect on the result).
    """

    def __init__(self, dim: int, *, heads: int = 8, dim_head: int | None = None,
                 causal: bool = False, features: int = 128, orthogonal: bool = True,
                 redraw: bool = False, seed: int = 0, chunk: int = 64):
        super().__init__(dim, heads=heads, dim_head=dim_head, causal=causal, features=features,
                         orthogonal=orthogonal, redraw=redraw, seed=seed, chunk=chunk)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        return favor_attention(q, k, v, self.current_projection(), mask, causal=self.causal,
                               chunk=self.chunk)

    def attend_step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache,
                    mask: torch.Tensor | None = None, start: int = 0):
        """The recurrent form on a chunk: the `(2m, e)` sums carried from the chunk before; the
        keys' stabilising shift is the largest seen so far (`zoo.core.linear.causal_sum_step`)."""
        w = self.current_projection() * q.shape[-1] ** -0.25
        phi_q, phi_k = trig_features(q, w, normalise=False), trig_features(k, w, normalise=False)
        exponent = k.square().sum(-1, keepdim=True) / (2 * q.shape[-1] ** 0.5)  # (b h t 1)
        return kernel_attention_step(phi_q, phi_k, v, cache, mask, chunk=self.chunk,
                                     key_weight=exp_over_keys(exponent, mask),
                                     key_log_scale=key_shift(exponent, mask)[..., 0, 0])
