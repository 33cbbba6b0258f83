r"""Simple linear attention language models balance the recall-throughput tradeoff.

Based pairs two cheap mixers. Linear attention with the second-order Taylor expansion of the
exponential as its feature map, $\phi(q)^\top \phi(k) = 1 + q^\top k/\sqrt{f} + (q^\top k)^2/(2f)$
on small projections of width $f$, reaches every earlier token through a fixed-size state; exact
softmax attention over a small sliding window of $w$ tokens gives the sharp local comparisons the
smooth kernel blurs. Both are linear in the length; decoding keeps the $(f^2, e)$ state and the last
$w - 1$ keys and values, whatever the context.

$$ O_i = \frac{\phi(q_i)^\top \sum_{j \le i} \phi(k_j) v_j^\top}{\phi(q_i)^\top \sum_{j \le i} \phi(k_j)}
   + \operatorname{softmax}_{i - w < j \le i}\!\big(q'_i k'^\top_j/\sqrt{d}\big)\, V',\qquad
   \phi(x) = \big[1,\ x / f^{1/4},\ (x \otimes x) / \sqrt{2f}\big] $$

Two forms each, tested equal: the linear branch as the explicit masked kernel matrix and as chunked
prefix sums (`zoo.core.linear`); the window as dense softmax on the band and in blocks of `w - 1`.

Deviations from the paper:
- the paper stacks separate layers (Taylor linear attention, sliding-window attention, and gated
  short convolutions, "BaseConv"); here one layer sums the two attention branches, each with its
  own projections. The short convolution is left out: in the paper it is a layer of its own, not
  part of either attention mixer;
- `causal=False` (not in the paper, a language model) sums over all keys and uses a two-sided window.
"""

import torch
from einops import einsum, rearrange
from torch import nn

from zoo.core.checks import check_dtype, check_sequence, positive_int
from zoo.core.decoding import Cached, append, cached_attention, real_tokens
from zoo.core.linear import causal_sum, kernel_attention, ratio
from zoo.core.masks import block_windows, neg_fill, pad_mask, pad_to_multiple, zero_padded_tokens
from zoo.core.shell import MultiHead


def based_linear_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                     mask: torch.Tensor | None = None, *,
                                     causal: bool = False) -> torch.Tensor:
    """The explicit form: the `(i, j)` kernel matrix `phi(q_i) . phi(k_j)`, masked, row-normalised."""
    sim = einsum(taylor_feature_map(q), taylor_feature_map(k), "b h i f, b h j f -> b h i j")
    ok = torch.ones(sim.shape[-2:], dtype=torch.bool, device=q.device)
    ok = ok.tril() if causal else ok
    if mask is not None:
        ok = ok & rearrange(mask, "b j -> b 1 1 j")
    sim = torch.where(ok, sim, sim.new_zeros(()))
    den = sim.sum(dim=-1, keepdim=True)
    return einsum(sim, v, "b h i j, b h j e -> b h i e") / den.masked_fill(den == 0, 1)


def sliding_window_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                       mask: torch.Tensor | None = None, *, window: int = 64,
                                       causal: bool = False) -> torch.Tensor:
    """Softmax over the band `0 <= i - j < w` (causal) or `|i - j| < w`, as a dense pattern."""
    n = q.shape[2]
    gap = torch.arange(n, device=q.device)[:, None] - torch.arange(n, device=q.device)
    band = gap.abs() < window
    return cached_attention(q, k, v, real_tokens(k[:, 0], mask), causal=causal, allowed=band)


def taylor_feature_map(x: torch.Tensor) -> torch.Tensor:
    """`phi(x) = [1, x / f^(1/4), (x (x) x) / sqrt(2 f)]`: `(..., f) -> (..., 1 + f + f^2)`, so that
    `phi(q) . phi(k) = 1 + q.k / sqrt(f) + (q.k)^2 / (2 f)`, exp's expansion at `q.k / sqrt(f)`."""
    f = x.shape[-1]
    outer = rearrange(einsum(x, x, "... a, ... c -> ... a c"), "... a c -> ... (a c)")
    return torch.cat([torch.ones_like(x[..., :1]), x / f ** 0.25, outer / (2 * f) ** 0.5], dim=-1)


def based_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           mask: torch.Tensor | None = None, *, causal: bool = False) -> torch.Tensor:
    """Taylor linear attention by prefix sums. q, k `(b, h, n, f)`, v `(b, h, n, e)` -> `(b, h, n, e)`."""
    return kernel_attention(taylor_feature_map(q), taylor_feature_map(k), v, mask, causal=causal)


def sliding_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             mask: torch.Tensor | None = None, *, window: int = 64,
                             causal: bool = False) -> torch.Tensor:
    """The same band in blocks of `c = w - 1` queries, each reading its block and the one before
    (and after, two-sided): `(n, 3c)` scores, never `(n, n)`."""
    b, _, n, _ = q.shape
    c = max(window - 1, 1)
    (qp, pad), (kp, _), (vp, _) = (pad_to_multiple(t, c) for t in (q, k, v))
    real = pad_mask(real_tokens(k[:, 0], mask), b, n, pad, q.device)
    zero = q.new_zeros(())
    kp, vp = (torch.where(rearrange(real, "b j -> b 1 j 1"), t, zero) for t in (kp, vp))
    after = 0 if causal else 1
    kw, vw = (block_windows(t, c, dim=2, after=after).movedim(-1, -2) for t in (kp, vp))  # (b h m w d)
    real_w = block_windows(rearrange(real, "b n -> b 1 n 1"), c, dim=2, after=after, value=False)
    # query ci of block m and key wj of its window are c + ci - wj positions apart
    gap = c + torch.arange(c, device=q.device)[:, None] - torch.arange(kw.shape[3], device=q.device)
    band = ((gap >= 0) & (gap < window)) if causal else gap.abs() < window
    ok = band & rearrange(real_w[..., 0, :], "b 1 m w -> b 1 m 1 w")
    qb = rearrange(qp, "b h (m c) d -> b h m c d", c=c) * q.shape[-1] ** -0.5
    scores = einsum(qb, kw, "b h m c d, b h m w d -> b h m c w").masked_fill(~ok, neg_fill(q.dtype))
    attn = torch.where(ok, scores.softmax(dim=-1), zero)
    out = einsum(attn, vw, "b h m c w, b h m w e -> b h m c e")
    return rearrange(out, "b h m c e -> b h (m c) e")[:, :, :n]


class Based(Cached, MultiHead):
    """Taylor linear attention plus sliding-window softmax. `(b, n, dim) -> (b, n, dim)`.

    Args:
        feature_dim: `f`, the width of the linear branch's queries and keys per head (the paper: 16).
        window: `w`, the sliding window (the paper: 64 to 128).
    """

    def __init__(self, dim: int, *, heads: int = 8, dim_head: int | None = None,
                 causal: bool = False, feature_dim: int = 16, window: int = 64):
        super().__init__(dim, heads=heads, dim_head=dim_head, causal=causal)
        self.feature_dim = positive_int(feature_dim, "feature_dim")
        self.window = positive_int(window, "window")
        # the shell's to_qkv feeds the window; the linear branch has its own q, k (width f) and v
        self.to_linear = nn.Linear(dim, heads * (2 * feature_dim + self.dim_head), bias=False)

    def project(self, x: torch.Tensor):
        """The window's q, k, v `(b, h, n, d)` and the linear branch's q, k `(b, h, n, f)`, v."""
        window = map(self.split_heads, self.to_qkv(x).chunk(3, dim=-1))
        f = self.heads * self.feature_dim
        linear = map(self.split_heads, self.to_linear(x).split([f, f, self.heads * self.dim_head], -1))
        return *window, *linear

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        check_sequence(x, self.dim, mask, name=type(self).__name__)
        check_dtype(x, self, name=type(self).__name__)
        q, k, v, q_f, k_f, v_f = self.project(zero_padded_tokens(x, mask))
        out = (based_linear_attention(q_f, k_f, v_f, mask, causal=self.causal)
               + sliding_window_attention(q, k, v, mask, window=self.window, causal=self.causal))
        return self.to_out(self.merge_heads(out))

    def decode(self, x: torch.Tensor, cache: dict | None, mask: torch.Tensor | None,
               start: int) -> tuple[torch.Tensor, dict]:
        """One chunk. The cache does not grow: the linear branch's sums `(b, h, 1 + f + f^2, e + 1)`
        (the last column the normaliser) and the window's last `w - 1` keys and values."""
        state = cache or {}
        real = real_tokens(x, mask)
        q, k, v, q_f, k_f, v_f = self.project(x)
        phi_q = taylor_feature_map(q_f)
        phi_k = torch.where(rearrange(real, "b t -> b 1 t 1"), taylor_feature_map(k_f), q.new_zeros(()))
        v_f = torch.cat([v_f, torch.ones_like(v_f[..., :1])], dim=-1)
        sums = state.get("sums")
        num = causal_sum(phi_q, phi_k, v_f)  # within the chunk, then the chunks before it
        if sums is not None:
            num = num + einsum(phi_q, sums, "b h t f, b h f e -> b h t e")
        sums = einsum(phi_k, v_f, "b h t f, b h t e -> b h f e") + (0 if sums is None else sums)
        k, v = append(state.get("k"), k, 2), append(state.get("v"), v, 2)
        real_all = append(state.get("real"), real, 1)
        gap = torch.arange(k.shape[2] - q.shape[2], k.shape[2], device=x.device)[:, None] \
            - torch.arange(k.shape[2], device=x.device)
        out = ratio(num) + cached_attention(q, k, v, real_all, allowed=gap < self.window)
        first = max(k.shape[2] - (self.window - 1), 0)  # the next query reads back w - 1 tokens
        state = {"sums": sums, "k": k[:, :, first:], "v": v[:, :, first:], "real": real_all[:, first:]}
        return self.to_out(self.merge_heads(out)), state
