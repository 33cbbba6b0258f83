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

`aft_attention_reference` is the equation as written, one weight per pair of positions;
`aft_attention`, what the layer runs, folds the keys into the values first (tested equal).
"""

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from torch import nn

from zoo.core.checks import check_qkv, one_of, positive_int
from zoo.core.decoding import concat_mask, recompute
from zoo.core.masks import causal_mask, neg_fill, pad_to_multiple, safe_denominator, zero_padded
from zoo.core.shell import MultiHead

VARIANTS = ("local", "full", "simple")


def aft_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            bias: torch.Tensor | None = None, mask: torch.Tensor | None = None, *,
                            variant: str = "local", causal: bool = False) -> torch.Tensor:
    """The paper's equation as written: the weight of every pair `(t, t')` is
    `exp(K_t' + w_tt')`, over the real `t'` (and `t' <= t` when causal). Same arguments as
    `aft_attention`; `w` is `bias` as a dense `(h, t, t')` matrix (zero outside AFT-local's band)."""
    check_qkv(q, k, v, mask, name="aft_attention_reference")
    one_of(variant, VARIANTS, "variant")
    h, n = q.shape[1], q.shape[2]
    t, t_ = torch.arange(n, device=q.device)[:, None], torch.arange(n, device=q.device)[None, :]
    if variant == "full":
        w = bias
    elif variant == "local":  # band column j holds t' = t - left + j
        c = bias.shape[-1]
        left = c - 1 if causal else (c - 1) // 2
        col = t_ - t + left  # (t t')
        inside = (col >= 0) & (col < c)
        w = torch.gather(bias, -1, col.clamp(0, c - 1).expand(h, n, n)) * inside
    else:
        w = q.new_zeros(h, n, n)
    weight = (rearrange(k, "b h s d -> b h 1 s d") + rearrange(w, "h t s -> 1 h t s 1")).exp()
    keep = torch.ones(n, n, dtype=torch.bool, device=q.device) if not causal else t_ <= t
    keep = rearrange(keep, "t s -> 1 1 t s 1")
    if mask is not None:
        keep = keep & rearrange(mask, "b s -> b 1 1 s 1")
    weight = weight * keep  # (b h t t' d)
    num = einsum(weight, v, "b h t s d, b h s d -> b h t d")
    den = weight.sum(dim=3)
    return q.sigmoid() * num / den.clamp(min=torch.finfo(den.dtype).tiny)


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
    """What the layer runs: `aft_attention_reference` with the keys and values folded first
    (`exp(w) @ (exp(K) V)`), AFT-local as the zero-bias prefix sums plus `expm1(w)` on the band
    in skewed block matmuls (tested equal). Heads split the channels, each with its own biases.

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

    def decode(self, x: torch.Tensor, cache, mask: torch.Tensor | None, start: int):
        """AFT-full needs every earlier key: it runs the prefix again (`zoo.core.decoding.recompute`)."""
        if self.variant == "full":
            return recompute(self, x, cache, mask, start)
        return super().decode(x, cache, mask, start)

    def attend_step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache,
                    mask: torch.Tensor | None = None, start: int = 0):
        """AFT-simple and AFT-local as a recurrence: the running sums of `exp(K) V` and `exp(K)`
        (kept shifted by the largest key of each channel so far) plus, for AFT-local, the last
        `window - 1` keys and values that the band of biases still reaches."""
        b, h, t, d = q.shape
        if self.w is not None and start + t > self.max_len:
            raise ValueError(f"{type(self).__name__}: position {start + t - 1} is past max_len="
                             f"{self.max_len} (the position biases cover max_len positions)")
        if mask is not None:
            k = k.masked_fill(~rearrange(mask, "b n -> b 1 n 1"), neg_fill(k.dtype))
        if cache is None:
            big = k.new_full((b, h, 1, d), neg_fill(k.dtype))
            cache = (k.new_zeros(b, h, 1, d), k.new_zeros(b, h, 1, d), big, k[:, :, :0], v[:, :, :0], None)
        num, den, top, old_k, old_v, old_mask = cache
        new_top = torch.maximum(top, k.amax(dim=2, keepdim=True).detach())
        gain = (top - new_top).exp()
        keys, values = torch.cat([old_k, k], dim=2), torch.cat([old_v, v], dim=2)
        keep = concat_mask(old_mask, mask, old_k.shape[2], t, b, k.device)
        ek = zero_padded((keys - new_top).exp(), keep)  # (b h tail+t d)
        ekv = ek * values
        tail = old_k.shape[2]
        # the AFT-simple sums over every position so far, and the window's correction
        num = num * gain + ekv[:, :, tail:].cumsum(dim=2)  # (b h t d)
        den = den * gain + ek[:, :, tail:].cumsum(dim=2)
        cache = (num[:, :, -1:], den[:, :, -1:], new_top)
        if self.variant == "local":
            c = self.w.shape[-1]
            # the window of c positions ending at each new one, zeros before position 0
            both = F.pad(torch.cat([ekv, ek], dim=-1), (0, 0, c - 1 - tail, 0)).unfold(2, c, 1)
            both = einsum(torch.expm1(self.w[:, start:start + t]), both, "h t c, b h t x c -> b h t x")
            num, den = num + both[..., :d], den + both[..., d:]
        out = q.sigmoid() * num / safe_denominator(den)
        # the band reaches back window - 1 positions (AFT-simple: none)
        back = min(keys.shape[2], self.w.shape[-1] - 1 if self.variant == "local" else 0)
        tail = slice(keys.shape[2] - back, None)
        cache += (keys[:, :, tail], values[:, :, tail], None if keep is None else keep[:, tail])
        return out, cache
