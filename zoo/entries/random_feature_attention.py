r"""Random Feature Attention.

Normalise queries and keys to unit length: then $e^{q \cdot k}$ is a Gaussian kernel of their
distance up to a constant, and random Fourier features (sines and cosines of random projections)
estimate that kernel. The attention matrix becomes a product of feature matrices, so keys and
values fold into an `(f, e)` state: linear time and memory, and constant memory per decoded
token. The projections' scale $\sigma$ is learned (per head and channel), which sets the kernel's
temperature. An optional gate, a learned scalar per token and head, decays the running state
before each write, which gives the model a recency bias; it is defined for causal attention.

$$ \phi(x) = \tfrac{1}{\sqrt{m}} \big[\sin(W x),\ \cos(W x)\big], \quad
   W = \Omega \operatorname{diag}(\sigma),\ \Omega_{rl} \sim \mathcal{N}(0, 1), \quad
   \mathbb{E}\big[\phi(\hat q)^\top \phi(\hat k)\big] = e^{-\|\sigma \odot (\hat q - \hat k)\|^2/2} $$
$$ O_t = \frac{\phi(\hat q_t)^\top S_t}{\phi(\hat q_t)^\top z_t}, \quad
   S_t = g_t S_{t-1} + (1 - g_t)\, \phi(\hat k_t) v_t^\top, \quad
   z_t = g_t z_{t-1} + (1 - g_t)\, \phi(\hat k_t) $$

with $\hat x = x / \|x\|$ and $g_t = \operatorname{sigmoid}(w_g^\top x_t + b_g)$; without the gate
$g_t = 1$ and the factor $1 - g_t$ is dropped, and without causality the sums run over all keys.

Deviations from the paper:
- the learned scale is a vector $\sigma$ per head (initialised to ones) multiplying fixed
  standard-normal projections; at $\sigma = 1$ the layer estimates softmax attention over unit
  queries and keys with scale 1.
- the projections are drawn once at construction from `seed`; `redraw=True` draws new ones at
  every call in training mode, as the paper does per training step; eval mode never redraws.
- a padded token does not touch the state (with the gate: its `g` is taken as 1).
- the causal sums are computed chunk by chunk (gated: with a log-depth scan over chunks).
"""

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from zoo.core.checks import check_qkv, check_sequence
from zoo.core.linear import kernel_attention
from zoo.core.masks import zero_padded_tokens
from zoo.entries.performer_favor import RandomFeatureHeads, trig_features


def random_feature_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor,
                             mask: torch.Tensor | None = None, *, causal: bool = False,
                             gate_logits: torch.Tensor | None = None, chunk: int = 64) -> torch.Tensor:
    """RFA, optionally gated.

    Args:
        q, k: `(b, h, n, d)`. v: `(b, h, n, e)`. w: `(h, m, d)` scaled projections.
        mask: `(b, n)`, True = real token.
        gate_logits: `(b, h, n)`, `g_t = sigmoid(gate_logits)`; only with causal=True.

    Returns:
        `(b, h, n, e)`.
    """
    check_qkv(q, k, v, mask, name="random_feature_attention")
    # the features' 1/sqrt(m) cancels in every row's ratio
    phi_q, phi_k = (trig_features(F.normalize(t, dim=-1), w, normalise=False) for t in (q, k))
    log_decay = write = None
    if gate_logits is not None:
        if not causal:
            raise ValueError("random_feature_attention: the gate is defined for causal=True only")
        log_decay = F.logsigmoid(gate_logits)  # log g_t
        if mask is not None:
            log_decay = log_decay.masked_fill(~rearrange(mask, "b n -> b 1 n"), 0.0)
        write = rearrange(torch.sigmoid(-gate_logits), "b h n -> b h n 1")  # 1 - g_t, per key
    return kernel_attention(phi_q, phi_k, v, mask, causal=causal, chunk=chunk, log_decay=log_decay,
                            key_weight=write)


class RandomFeatureAttention(RandomFeatureHeads):
    """Multi-head RFA. `(b, n, dim) -> (b, n, dim)`.

    Args:
        features: number of random projections `m` (the feature map has `2m` entries).
        gate: the gated variant (needs causal=True); adds a `(dim -> heads)` gate projection.
        redraw: draw new projections at every call in training mode.
        seed: seed of the projections drawn at construction.
        chunk: tokens per chunk of the causal sums (no effect on the result).
    """

    def __init__(self, dim: int, *, heads: int = 8, dim_head: int | None = None,
                 causal: bool = False, features: int = 128, gate: bool = False,
                 redraw: bool = False, seed: int = 0, chunk: int = 64):
        if gate and not causal:
            raise ValueError("RandomFeatureAttention: gate=True needs causal=True (the paper "
                             "defines the gate for causal attention only)")
        super().__init__(dim, heads=heads, dim_head=dim_head, causal=causal, features=features,
                         orthogonal=False, redraw=redraw, seed=seed, chunk=chunk)
        self.sigma = nn.Parameter(torch.ones(self.heads, self.dim_head))
        self.gate = bool(gate)
        self.to_gate = nn.Linear(dim, heads) if gate else None

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        check_sequence(x, self.dim, mask, name=type(self).__name__, layer=self)
        x = zero_padded_tokens(x, mask)
        q, k, v = map(self.split_heads, self.to_qkv(x).chunk(3, dim=-1))
        gate_logits = rearrange(self.to_gate(x), "b n h -> b h n") if self.gate else None
        return self.to_out(self.merge_heads(self.attend(q, k, v, mask, gate_logits=gate_logits)))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None = None, *,
               gate_logits: torch.Tensor | None = None) -> torch.Tensor:
        if self.gate and gate_logits is None:
            raise ValueError("RandomFeatureAttention(gate=True): attend needs gate_logits "
                             "`(b, h, n)`; forward computes them from x")
        w = self.current_projection() * rearrange(self.sigma, "h d -> h 1 d")
        return random_feature_attention(q, k, v, w, mask, causal=self.causal,
                                        gate_logits=gate_logits, chunk=self.chunk)
