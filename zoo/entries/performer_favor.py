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
random-feature-attention) reuse: the projection sampler, the shell that owns the projection
buffer, and the causal sums.

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
import torch.nn.functional as F
from einops import einsum, rearrange, reduce

from zoo.checks import check_qkv, positive_int
from zoo.masks import causal_mask, neg_fill, pad_to_multiple, zero_padded
from zoo.shell import MultiHead


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


def trig_features(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """`[sin(W x), cos(W x)] / sqrt(m)`: x `(b, h, n, d)`, w `(h, m, d)` -> `(b, h, n, 2m)`.

    Times `exp(|x|^2 / 2)` this is the paper's feature map of the softmax kernel.
    """
    proj = einsum(x, w, "b h n d, h m d -> b h n m")
    return torch.cat([proj.sin(), proj.cos()], dim=-1) / w.shape[-2] ** 0.5


def exp_over_keys(exponent: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """`exp(exponent - c)` with `c` the largest exponent over the real keys (per batch and head,
    detached: it cancels in the ratio), and 0 at padded keys. exponent `(b, h, n, f)`."""
    if mask is not None:
        exponent = exponent.masked_fill(~rearrange(mask, "b n -> b 1 n 1"), neg_fill(exponent.dtype))
    shift = reduce(exponent.detach(), "b h n f -> b h 1 1", "max")
    return zero_padded((exponent - shift).exp(), mask)


def causal_sum(phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor, *, chunk: int = 64,
               log_decay: torch.Tensor | None = None) -> torch.Tensor:
    r"""`out_i = sum_{j <= i} g_{j+1} ... g_i (phi_q_i . phi_k_j) v_j`, computed chunk by chunk.

    Within a chunk the `(c, c)` scores are explicit; across chunks each chunk's `(f, e)` state
    is summed over the chunks before it (a cumulative sum, or with decays a log-depth scan).
    The contractions are plain matmuls, which batched gradients (`torch.autograd.functional.
    jacobian(vectorize=True)`) support inside a custom backward, as slim-performer's.

    Args:
        phi_q, phi_k: `(b, h, n, f)`. v: `(b, h, n, e)`.
        log_decay: `(b, h, n)`, `log g_t <= 0`; None means no decay (all `g = 1`).

    Returns:
        `(b, h, n, e)`.
    """
    n, c = v.shape[2], min(chunk, v.shape[2])
    q, k, v = (rearrange(pad_to_multiple(t, c)[0], "b h (nc c) x -> b h nc c x", c=c)
               for t in (phi_q, phi_k, v))
    scores = q @ k.transpose(-1, -2)  # (b h nc i j)
    if log_decay is None:
        scores = scores.tril()
        states = (k.transpose(-1, -2) @ v).cumsum(dim=2)  # (b h nc f e)
    else:
        a = rearrange(pad_to_multiple(log_decay, c, dim=-1)[0], "b h (nc c) -> b h nc c", c=c)
        a = a.cumsum(dim=-1)  # log of the decay from the chunk's start to each position
        gaps = rearrange(a, "... i -> ... i 1") - rearrange(a, "... j -> ... 1 j")
        scores = scores * gaps.masked_fill(~causal_mask(c, c, a.device), neg_fill(a.dtype)).exp()
        k = k * rearrange((a[..., -1:] - a).exp(), "... j -> ... j 1")  # decay to the chunk's end
        states = decayed_cumsum(k.transpose(-1, -2) @ v, a[..., -1].exp())
        q = q * rearrange(a.exp(), "... i -> ... i 1")
    carried = F.pad(states[:, :, :-1], (0, 0, 0, 0, 1, 0))  # the state entering each chunk
    out = scores @ v + q @ carried  # (b h nc c e)
    return rearrange(out, "b h nc c e -> b h (nc c) e")[:, :, :n]


def decayed_cumsum(u: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """`s_c = gamma_c s_{c-1} + u_c` over axis 2, by a log-depth (Hillis-Steele) scan.

    u `(b, h, nc, f, e)`, gamma `(b, h, nc)` in [0, 1] -> `(b, h, nc, f, e)`.
    """
    step = 1
    while step < u.shape[2]:
        gain = rearrange(gamma[:, :, step:], "b h c -> b h c 1 1")
        u = torch.cat([u[:, :, :step], u[:, :, step:] + gain * u[:, :, :-step]], dim=2)
        gamma = torch.cat([gamma[:, :, :step], gamma[:, :, step:] * gamma[:, :, :-step]], dim=2)
        step *= 2
    return u


def kernel_attention(phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor,
                     mask: torch.Tensor | None = None, *, causal: bool = False, chunk: int = 64,
                     log_decay: torch.Tensor | None = None) -> torch.Tensor:
    """`O_i = phi_q_i^T S / phi_q_i^T z` with `S = sum_j phi_k_j v_j^T`, `z = sum_j phi_k_j`
    (over `j <= i` when causal). phi `(b, h, n, f)`, v `(b, h, n, e)` -> `(b, h, n, e)`."""
    phi_k = zero_padded(phi_k, mask)
    v = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)  # the last column sums the normaliser
    if causal:
        num = causal_sum(phi_q, phi_k, v, chunk=chunk, log_decay=log_decay)
    else:
        num = einsum(phi_q, einsum(phi_k, v, "b h n f, b h n e -> b h f e"), "b h n f, b h f e -> b h n e")
    return ratio(num)


def ratio(num: torch.Tensor) -> torch.Tensor:
    """Split `(..., e + 1)` sums into values over normaliser (the last column).

    No epsilon: it would not scale with the features (whose constant factors cancel here), so
    a normaliser of exactly 0 (a row with no real key) gives 0 instead.
    """
    den = num[..., -1:]
    return num[..., :-1] / den.masked_fill(den == 0, 1)


def prefix_sum(phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The paper's causal form: prefix sums of `phi_k v^T` over a `(b, h, n, f, e)` tensor, read by
    every query. The reference the chunked `causal_sum` is tested against."""
    states = einsum(phi_k, v, "b h n f, b h n e -> b h n f e").cumsum(dim=2)
    return einsum(phi_q, states, "b h n f, b h n f e -> b h n e")


def kernel_attention_step(phi_q, phi_k, v, state=None, *, gate=None):
    """One token of the recurrent form: `S = g S + phi_k v^T`, `z = g z + phi_k`, read by phi_q.

    Args:
        phi_q, phi_k: `(b, h, f)`. v: `(b, h, e)`. gate: `(b, h)` decay of the old state, or None.
        state: `(S, z)`, `(b, h, f, e)` and `(b, h, f)`; None starts from zeros.

    Returns:
        `(out (b, h, e), state)`.
    """
    s, z = state if state is not None else (phi_k.new_zeros(*phi_k.shape, v.shape[-1]),
                                            phi_k.new_zeros(phi_k.shape))
    if gate is not None:
        s, z = s * gate[..., None, None], z * gate[..., None]
    s, z = s + einsum(phi_k, v, "b h f, b h e -> b h f e"), z + phi_k
    num = einsum(phi_q, s, "b h f, b h f e -> b h e")
    return num / einsum(phi_q, z, "b h f, b h f -> b h")[..., None], (s, z)


def kernel_attention_recurrent(phi_q, phi_k, v, *, gates=None) -> torch.Tensor:
    """The recurrent form over a whole sequence, one token at a time (for tests; `(b, h, n, .)`
    inputs, gates `(b, h, n)` or None). Equals `kernel_attention(..., causal=True)`."""
    state, outs = None, []
    for t in range(v.shape[2]):
        gate = None if gates is None else gates[:, :, t]
        out, state = kernel_attention_step(phi_q[:, :, t], phi_k[:, :, t], v[:, :, t], state, gate=gate)
        outs.append(out)
    return torch.stack(outs, dim=2)


def favor_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor,
                    mask: torch.Tensor | None = None, *, causal: bool = False,
                    chunk: int = 64) -> torch.Tensor:
    """FAVOR with trigonometric features. q, k `(b, h, n, d)`, v `(b, h, n, e)`, w `(h, m, d)`."""
    check_qkv(q, k, v, mask, name="favor_attention")
    q, k = q * q.shape[-1] ** -0.25, k * k.shape[-1] ** -0.25  # q'.k' = q.k / sqrt(d)
    phi_q = trig_features(q, w)  # e^{|q|^2/2} cancels row by row
    phi_k = trig_features(k, w) * exp_over_keys(k.square().sum(-1, keepdim=True) / 2, mask)
    return kernel_attention(phi_q, phi_k, v, mask, causal=causal, chunk=chunk)


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
