r"""Random-feature maps of the softmax kernel, shared by the random-feature entries (performer-favor,
performer, slim-performer, random-feature-attention): the projection sampler, the trigonometric
and the positive features, the key shifts that keep their exponents finite, and the shell that
owns a seeded projection buffer.

$$ \phi_{\sin,\cos}(x) = \tfrac{1}{\sqrt{m}} \big[\sin(W x),\ \cos(W x)\big], \qquad
   \phi_+(x) = \tfrac{1}{\sqrt{m}}\, e^{-\|x\|^2/2} \big[e^{w_1^\top x}, \dots, e^{w_m^\top x}\big] $$
"""

from __future__ import annotations

import torch
from einops import einsum, rearrange, reduce, repeat

from zoo.core.checks import positive_int
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


def trig_features_reference(x: torch.Tensor, w: torch.Tensor, *, normalise: bool = True) -> torch.Tensor:
    """`[sin(W x), cos(W x)] / sqrt(m)`, as written: x `(b, h, n, d)`, w `(h, m, d)` -> `(b, h, n, 2m)`."""
    proj = einsum(x, w, "b h n d, h m d -> b h n m")
    features = torch.cat([proj.sin(), proj.cos()], dim=-1)
    return features * w.shape[-2] ** -0.5 if normalise else features


def trig_features(x: torch.Tensor, w: torch.Tensor, *, normalise: bool = True) -> torch.Tensor:
    """`trig_features_reference`, with one matmul and one cosine for both halves.

    x `(b, h, n, d)`, w `(h, m, d)` -> `(b, h, n, 2m)`.

    Times `exp(|x|^2 / 2)` this is the paper's feature map of the softmax kernel. Attention leaves
    out the constant `1 / sqrt(m)` (`normalise=False`): it cancels in every row's ratio.
    """
    b, m = x.shape[0], w.shape[-2]
    # one matmul and one cosine for both halves: sin(a) = cos(a - pi/2), the matmul adding the phase
    phase = torch.cat([w.new_full((m,), -torch.pi / 2), w.new_zeros(m)])  # (2m)
    proj = torch.baddbmm(phase, rearrange(x, "b h n d -> (b h) n d"),
                         repeat(torch.cat([w, w], dim=-2), "h m d -> (b h) d m", b=b))
    features = rearrange(proj, "(b h) n m -> b h n m", b=b, h=x.shape[1]).cos_()  # h: b may be 0
    return features.mul_(m ** -0.5) if normalise else features


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


def key_shift(exponent: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The largest of `exponent` `(b, h, n, f)` over the real keys, detached: `(b, h, 1, 1)`."""
    if mask is not None:
        exponent = exponent.masked_fill(~rearrange(mask, "b n -> b 1 n 1"), neg_fill(exponent.dtype))
    return reduce(exponent.detach(), "b h n f -> b h 1 1", "max")


def exp_over_keys(exponent: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """`exp(exponent - c)` with `c` the largest exponent over the real keys (per batch and head,
    detached: it cancels in the ratio), and 0 at padded keys. exponent `(b, h, n, f)`."""
    if mask is not None:
        exponent = exponent.masked_fill(~rearrange(mask, "b n -> b 1 n 1"), neg_fill(exponent.dtype))
    return zero_padded((exponent - key_shift(exponent)).exp(), mask)


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

    projection: torch.Tensor  # the buffer registered in __init__

    def current_projection(self) -> torch.Tensor:
        """The buffer, or (redraw=True, training mode) a fresh draw for this call."""
        if self.redraw and self.training:
            return self.draw().to(self.projection)
        return self.projection


def favor_plus_key_shift(k: torch.Tensor, w: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The keys' shift `favor_plus_features` drops, `(b, h)`: its largest exponent over the real keys."""
    k = k * k.shape[-1] ** -0.25
    proj_k = einsum(k, w, "b h n d, h m d -> b h n m")
    exponent = proj_k.amax(dim=-1, keepdim=True) - k.square().sum(-1, keepdim=True) / 2
    return key_shift(exponent, mask)[..., 0, 0]
