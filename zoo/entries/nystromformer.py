r"""Nyströmformer: A Nyström-Based Algorithm for Approximating Self-Attention.

Treat the softmax attention matrix as a kernel matrix and approximate it with the Nyström method:
pick m landmark queries and keys (the means of m contiguous segments), and rebuild the n x n map
from three small softmax maps: queries against landmark keys, landmarks against landmarks, and
landmark queries against keys. The middle one is inverted with an iterative Moore-Penrose
pseudo-inverse that needs only matrix products. Nothing n x n is formed; for a fixed m, time and
memory are linear in n.

$$ O = \operatorname{softmax}\!\big(Q \tilde K^\top / \sqrt{d}\big)\,
       \operatorname{softmax}\!\big(\tilde Q \tilde K^\top / \sqrt{d}\big)^{+}\,
       \operatorname{softmax}\!\big(\tilde Q K^\top / \sqrt{d}\big)\, V $$

$$ Z_{j+1} = \tfrac14 Z_j \big(13 I - A Z_j (15 I - A Z_j (7 I - A Z_j))\big),
   \qquad Z_0 = A^\top / (\lVert A \rVert_1 \lVert A \rVert_\infty) $$

With as many landmarks as tokens the landmarks are the tokens, all three maps are the softmax
map $S$, and $S S^{+} S = S$: the layer is exactly softmax attention once the iteration has
converged. Six iterations (the paper's choice) are not enough for that at 1e-10, so the exact
claim is made at `pinv_iters=40` (the iteration is tested against `torch.linalg.pinv`). With
fewer landmarks than tokens the six-step iterate is the better choice: it acts as a regularised
inverse, whereas the exact pseudo-inverse of the ill-conditioned middle map amplifies the error.

Deviations from the paper:

- Any n works: the segment length is `ceil(n / m)`, the tail is padded, and a landmark is the mean
  of the real tokens of its segment. A landmark with no real token (padding, or n < m) drops
  out: its row and column of the middle map and its row of the last map are zero, so that is
  exactly attention with fewer landmarks. Padded keys are masked in the last map. The paper needs
  m to divide n.
- `Z_0` is scaled per matrix, not by the maximum over the batch, so samples stay independent.
- The depthwise convolution on V that the paper adds as a skip connection is left out; it is not
  part of the approximation.
"""

import math

import torch
from einops import einsum, rearrange, reduce

from zoo.core.checks import check_qkv, positive_int, refuse_causal
from zoo.core.masks import neg_fill, pad_mask, pad_to_multiple
from zoo.core.shell import MultiHead


def iterative_pinv(a: torch.Tensor, iters: int = 6) -> torch.Tensor:
    """Moore-Penrose pseudo-inverse of each `(m, m)` matrix in `a` `(..., m, m)` by the paper's
    cubic iteration (after Razavi et al.); only matrix products."""
    col = reduce(a.abs(), "... i j -> ... j", "sum").amax(-1)  # ||A||_1
    row = reduce(a.abs(), "... i j -> ... i", "sum").amax(-1)  # ||A||_inf
    # clamped so that an all-zero matrix (a fully padded sample) gives Z = 0, not NaN
    norm = (col * row).clamp(min=torch.finfo(a.dtype).tiny)
    z = a.transpose(-1, -2) / rearrange(norm, "... -> ... 1 1")
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    for _ in range(iters):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


def segment_means(t: torch.Tensor, m: int, mask: torch.Tensor | None):
    """Means of the real tokens in m contiguous segments of `ceil(n / m)` positions.

    Returns:
        landmarks `(b, h, m, d)` and which of them hold a real token, `(b, m)`.
    """
    b, _, n, _ = t.shape
    c = math.ceil(n / m)
    t, pad = pad_to_multiple(t, c * m)
    real = pad_mask(mask, b, n, c * m - n, t.device)
    real = torch.ones(b, n, dtype=torch.bool, device=t.device) if real is None else real
    real = rearrange(real, "b (m c) -> b m c", m=m)
    sums = einsum(rearrange(t, "b h (m c) d -> b h m c d", m=m), real.to(t.dtype),
                  "b h m c d, b m c -> b h m d")
    count = reduce(real.to(t.dtype), "b m c -> b 1 m 1", "sum").clamp(min=1)
    return sums / count, real.any(-1)


def _softmax(scores: torch.Tensor, keys: torch.Tensor | None,
             rows: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax over keys with masked `keys` `(b, j)` left out and masked `rows` `(b, i)` zeroed
    (no pass over the scores where no mask is given). Decided by whether a mask is given, not by
    its values, so compiled and exported graphs and the meta device need no data-dependent branch."""
    if keys is not None:
        scores = scores.masked_fill(~rearrange(keys, "b j -> b 1 1 j"), neg_fill(scores.dtype))
    attn = scores.softmax(dim=-1)
    if rows is None:
        return attn
    return attn * rearrange(rows, "b i -> b 1 i 1").to(attn.dtype)


def nystrom_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      mask: torch.Tensor | None = None, *, landmarks: int = 64,
                      pinv_iters: int = 6, scale: float | None = None) -> torch.Tensor:
    """Nyström approximation of softmax attention.

    Args:
        q, k: `(b, h, n, d)`. v: `(b, h, n, e)`. mask: `(b, n)`, True = real token.
        landmarks: m, the number of segment-mean landmarks.
        pinv_iters: iterations of the pseudo-inverse.
        scale: score scale; None means `d ** -0.5`.

    Returns:
        `(b, h, n, e)`.
    """
    check_qkv(q, k, v, mask, name="nystrom_attention")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q_l, _ = segment_means(q, landmarks, mask)
    k_l, live = segment_means(k, landmarks, mask)
    kernel_1 = _softmax(einsum(q, k_l, "b h i d, b h r d -> b h i r") * scale, live)  # (b h i r)
    # An empty landmark is neither a key nor a row: it drops out as if m were smaller.
    kernel_2 = _softmax(einsum(q_l, k_l, "b h s d, b h r d -> b h s r") * scale, live, live)
    kernel_3 = _softmax(einsum(q_l, k, "b h s d, b h j d -> b h s j") * scale, mask, live)
    context = einsum(kernel_3, v, "b h s j, b h j e -> b h s e")
    context = einsum(iterative_pinv(kernel_2, pinv_iters), context, "b h r s, b h s e -> b h r e")
    return einsum(kernel_1, context, "b h i r, b h r e -> b h i e")


class Nystromformer(MultiHead):
    """Multi-head Nyström attention, `(b, n, dim) -> (b, n, dim)`.

    Args:
        landmarks: number of segment-mean landmarks m.
        pinv_iters: iterations of the pseudo-inverse (the paper uses 6).
    """

    def __init__(self, dim: int, *, heads: int = 8, dim_head: int | None = None,
                 causal: bool = False, landmarks: int = 64, pinv_iters: int = 6):
        refuse_causal(type(self).__name__, causal)
        super().__init__(dim, heads=heads, dim_head=dim_head, causal=False)
        self.landmarks = positive_int(landmarks, "landmarks")
        self.pinv_iters = positive_int(pinv_iters, "pinv_iters")

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        return nystrom_attention(q, k, v, mask, landmarks=self.landmarks,
                                 pinv_iters=self.pinv_iters)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, landmarks={self.landmarks}, pinv_iters={self.pinv_iters}"
