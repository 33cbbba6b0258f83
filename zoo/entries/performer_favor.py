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

This file also holds what the later random-feature entries (performer, slim-performer,
random-feature-attention) reuse: the projection sampler and the shell that owns the projection
buffer. The sums themselves (full and causal, chunked) are the core's `zoo.core.linear`.

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
from einops import rearrange, reduce, repeat

from zoo.core.checks import check_qkv, positive_int
from zoo.core.linear import kernel_attention
from zoo.core.masks import neg_fill, zero_padded
from zoo.core.shell import MultiHead


def gaussian_projection(m: int, d: int, *, orthogonal: bool = True,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """`(m, d)` rows with the marginal law N(0, I_d), so every feature stays unbiased.

    With `orthogonal`, rows are exactly orthogonal within each block of `d` (a Haar-random
    rotation), and each row gets the length of an independent Gaussian vector.
    """
    if not orthogonal:
        return torch.randn(m, d, generator=generator, dtype=torch.float64)
    blocks = []
    for _ in range(-(-m // d)):
        rot, r = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64))
        blocks.append(rot * torch.sign(torch.diagonal(r)))  # columns of a Haar-random rotation
    rows = rearrange(torch.cat(blocks, dim=1), "d m -> m d")[:m]
    lengths = torch.randn(m, d, generator=generator, dtype=torch.float64).norm(dim=-1, keepdim=True)
    return rows * lengths


def trig_features(x: torch.Tensor, w: torch.Tensor, *, normalise: bool = True) -> torch.Tensor:
    """`[sin(W x), cos(W x)] / sqrt(m)`: x `(b, h, n, d)`, w `(h, m, d)` -> `(b, h, n, 2m)`.

    Times `exp(|x|^2 / 2)` this is the paper's feature map of the softmax kernel. Attention leaves
    out the constant `1 / sqrt(m)` (`normalise=False`): it cancels in every row's ratio.
    """
    b, m = x.shape[0], w.shape[-2]
    # one matmul and one cosine for both halves: sin(a) = cos(a - pi/2), the matmul adding the phase
    phase = torch.cat([w.new_full((m,), -torch.pi / 2), w.new_zeros(m)])  # (2m)
    proj = torch.baddbmm(phase, rearrange(x, "b h n d -> (b h) n d"),
                         repeat(torch.cat([w, w], dim=-2), "h m d -> (b h) d m", b=b))
    features = rearrange(proj, "(b h) n m -> b h n m", b=b, h=x.shape[1]).cos_()
    return features.mul_(m ** -0.5) if normalise else features


def exp_over_keys(exponent: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """`exp(exponent - c)` with `c` the largest exponent over the real keys (per batch and head,
    detached: it cancels in the ratio), and 0 at padded keys. exponent `(b, h, n, f)`."""
    if mask is not None:
        exponent = exponent.masked_fill(~rearrange(mask, "b n -> b 1 n 1"), neg_fill(exponent.dtype))
    return zero_padded((exponent - key_shift(exponent)).exp(), mask)


def key_shift(exponent: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The largest of `exponent` `(b, h, n, f)` over the real keys, detached: `(b, h, 1, 1)`."""
    if mask is not None:
        exponent = exponent.masked_fill(~rearrange(mask, "b n -> b 1 n 1"), neg_fill(exponent.dtype))
    return reduce(exponent.detach(), "b h n f -> b h 1 1", "max")


def favor_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor,
                    mask: torch.Tensor | None = None, *, causal: bool = False,
                    chunk: int = 64) -> torch.Tensor:
    """FAVOR with trigonometric features. q, k `(b, h, n, d)`, v `(b, h, n, e)`, w `(h, m, d)`."""
    check_qkv(q, k, v, mask, name="favor_attention")
    d = q.shape[-1]
    w = w * d ** -0.25  # W q' = W q d^{-1/4}, so that q'.k' = q.k / sqrt(d)
    # 1/sqrt(m) and e^{|q'|^2/2} cancel row by row; e^{|k'|^2/2} is a scalar per key, applied to the
    # narrower values by kernel_attention
    phi_q, phi_k = trig_features(q, w, normalise=False), trig_features(k, w, normalise=False)
    weight = exp_over_keys(k.square().sum(-1, keepdim=True) / (2 * d ** 0.5), mask)  # (b h n 1)
    return kernel_attention(phi_q, phi_k, v, mask, causal=causal, chunk=chunk, key_weight=weight)


class RandomFeatureHeads(MultiHead):
    """The multi-head shell plus a seeded `(heads, m, dim_head)` Gaussian projection buffer."""

    def __init__(self, dim: int, *, heads: int, dim_head: int | None, causal: bool,
                 features: int, orthogonal: bool, redraw: bool, seed: int, chunk: int):
        super().__init__(dim, heads=heads, dim_head=dim_head, causal=causal)
        self.features, self.chunk = positive_int(features, "features"), positive_int(chunk, "chunk")
        self.orthogonal, self.redraw = bool(orthogonal), bool(redraw)
        self.register_buffer("projection", self.draw(torch.Generator().manual_seed(seed)))

    def draw(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.stack([gaussian_projection(self.features, self.dim_head, generator=generator,
                                                orthogonal=self.orthogonal)
                            for _ in range(self.heads)]).float()

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, features={self.features}, orthogonal={self.orthogonal}, "
                f"redraw={self.redraw}, chunk={self.chunk}")

    def current_projection(self) -> torch.Tensor:
        """The buffer, or (redraw=True, training mode) a fresh draw for this call."""
        if self.redraw and self.training:
            return self.draw().to(self.projection)
        return self.projection


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
