r"""An Attention Free Transformer.

No query-key dot products: each channel of the values is averaged over positions with weights
$\exp(K_{t'} + w_{t,t'})$, a per-channel key score plus a learned bias for the pair of positions,
and the query only gates the result through a sigmoid. Because the weight factorises into
$e^{K_{t'}} e^{w_{t,t'}}$, the keys and values can be folded first. Three variants: AFT-full learns
a bias for every pair of positions (quadratic, so it needs `max_len`); AFT-local keeps the biases
within a window of `window` positions and sets the rest to zero, which splits into a global
average plus a windowed correction, linear in the length; AFT-simple has no biases at all.

$$ Y_t = \sigma(Q_t) \odot
   \frac{\sum_{t'} \exp(K_{t'} + w_{t,t'}) \odot V_{t'}}{\sum_{t'} \exp(K_{t'} + w_{t,t'})},
   \qquad w^{\text{local}}_{t,t'} = \begin{cases} w_{t,t'} & |t - t'| < s \\ 0 & \text{else}
   \end{cases}, \qquad w^{\text{simple}} = 0 $$

With `causal=True` the sums run over $t' \le t$ (prefix sums), as the paper does for its
autoregressive models.

Deviations from the paper: the biases are free parameters (the paper also reports a factorised
$w = U V^\top$), stored for AFT-local as the band they are non-zero on, and start at zero (so every
variant starts as AFT-simple); `heads` > 1 gives each group of channels its own biases (the paper
has one set; `heads=1` is the default). AFT-conv is not included.
"""

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from torch import nn

from zoo.core.checks import check_qkv, one_of, positive_int
from zoo.core.masks import causal_mask, neg_fill, pad_to_multiple, safe_denominator, zero_padded
from zoo.core.shell import MultiHead

VARIANTS = ("local", "full", "simple")


def prefix_or_total(t: torch.Tensor, causal: bool) -> torch.Tensor:
    """Sum of `t` `(b, h, n, d)` over positions `<= t` (causal) or over all of them."""
    if not causal:
        return t.sum(dim=2, keepdim=True)
    # positions last: torch's cumsum is fastest along the innermost axis
    return rearrange(rearrange(t, "b h n d -> b h d n").cumsum(-1), "b h d n -> b h n d")


def band_matmul(band: torch.Tensor, x: torch.Tensor, left: int) -> torch.Tensor:
    """`out[t] = sum_j band[t, j] x[t - left + j]` (zero outside `0 .. n-1`), as block matmuls.

    Args:
        band: `(h, n, c)`. x: `(b, h, n, d)`. left: how far the band reaches back.

    Returns:
        `(b, h, n, d)`.
    """
    n, c = band.shape[1:]
    band, pad = pad_to_multiple(band, c, dim=1)
    # skew each block of c rows: row r moves r columns right, so column r + j holds t' = t - left + j
    dense = F.pad(rearrange(band, "h (nb r) c -> h nb r c", r=c), (0, c)).flatten(-2)
    dense = rearrange(dense[..., : c * (2 * c - 1)], "h nb (r w) -> h nb r w", r=c)
    cols = F.pad(x, (0, 0, left, c - 1 - left + pad)).unfold(2, 2 * c - 1, c)  # (b h nb d w)
    out = einsum(dense, cols, "h nb r w, b h nb d w -> b h nb r d")
    return rearrange(out, "b h nb r d -> b h (nb r) d")[:, :, :n]


def aft_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  bias: torch.Tensor | None = None, mask: torch.Tensor | None = None, *,
                  variant: str = "local", causal: bool = False) -> torch.Tensor:
    """AFT on `(b, h, n, d)` tensors; heads split the channels, each head has its own biases.

    Args:
        q, k, v: `(b, h, n, d)`. mask: `(b, n)`, True = real token.
        bias: `"full"`: `(h, n, n)`, `w[t, t']`. `"local"`: `(h, n, c)`, the band: column `j` is
            `t' = t - left + j`, with `c = 2 s - 1`, `left = s - 1` (`c = s`, `left = s - 1` when
            causal). `"simple"`: None.
        variant: `"local"`, `"full"` or `"simple"`.
        causal: position t sums over `t' <= t`.

    Returns:
        `(b, h, n, d)`.
    """
    check_qkv(q, k, v, mask, name="aft_attention")
    one_of(variant, VARIANTS, "variant")
    if mask is not None:
        k = k.masked_fill(~rearrange(mask, "b n -> b 1 n 1"), neg_fill(k.dtype))
    # the shift by the largest key of each channel cancels between numerator and denominator
    ek = zero_padded((k - k.amax(dim=2, keepdim=True).detach()).exp(), mask)  # (b h n d)
    ekv = ek * v
    if variant == "full":  # exp(w) @ (exp(K) * V): an n x n product
        if causal:
            bias = bias.masked_fill(~causal_mask(*bias.shape[1:], bias.device), neg_fill(bias.dtype))
        ew = (bias - bias.amax(dim=-1, keepdim=True).detach()).exp()  # (h t t')
        num = einsum(ew, ekv, "h t s, b h s d -> b h t d")
        den = einsum(ew, ek, "h t s, b h s d -> b h t d")
    else:  # the zero-bias (AFT-simple) sums, plus exp(w) - 1 inside the window
        num, den = prefix_or_total(ekv, causal), prefix_or_total(ek, causal)
        if variant == "local":
            c = bias.shape[-1]
            left = c - 1 if causal else (c - 1) // 2
            both = band_matmul(torch.expm1(bias), torch.cat([ekv, ek], dim=-1), left)
            num, den = num + both[..., :ekv.shape[-1]], den + both[..., ekv.shape[-1]:]
    return q.sigmoid() * num / safe_denominator(den)


class AttentionFreeTransformer(MultiHead):
    """AFT layer. `(b, n, dim) -> (b, n, dim)`.

    Args:
        variant: `"local"` (default, linear in n), `"full"` (quadratic) or `"simple"`.
        window: s, the half-width of AFT-local's window (biases where `|t - t'| < s`).
        max_len: the longest sequence the position biases cover (AFT-full and AFT-local).
    """

    def __init__(self, dim: int, *, heads: int = 1, dim_head: int | None = None,
                 variant: str = "local", window: int = 32, max_len: int = 1024,
                 causal: bool = False):
        super().__init__(dim, heads=heads, dim_head=dim_head, causal=causal)
        self.variant = one_of(variant, VARIANTS, "variant")
        self.window, self.max_len = positive_int(window, "window"), positive_int(max_len, "max_len")
        width = {"full": max_len, "local": window if causal else 2 * window - 1}.get(variant)
        self.w = nn.Parameter(torch.zeros(heads, max_len, width)) if width else None

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        n = q.shape[2]
        if self.w is not None and n > self.max_len:
            raise ValueError(f"{type(self).__name__}: sequence length {n} exceeds max_len="
                             f"{self.max_len} (the position biases cover max_len positions)")
        bias = None if self.w is None else self.w[:, :n, :n] if self.variant == "full" else \
            self.w[:, :n]
        return aft_attention(q, k, v, bias, mask, variant=self.variant, causal=self.causal)
