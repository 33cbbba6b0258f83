r"""The Hedgehog & the Porcupine: Expressive Linear Attentions with Softmax Mimicry.

Linear attention falls behind softmax because fixed feature maps give flat, non-monotone weights;
softmax's are spiky (low entropy) and monotone in the dot product. Hedgehog learns the feature
map instead: a per-head linear map of the query (or key), then exponentials of it and of its
negation, so that the dot product of two features behaves like an exponential of the dot
product. The maps are trained to mimic softmax attention's weights (a cross-entropy between the
two maps, `distillation_loss`), then the layer runs as linear attention in linear time.

$$ \phi(x) = \big[\operatorname{softmax}(W x + b),\ \operatorname{softmax}(-(W x + b))\big],
   \qquad O_i = \frac{\sum_j \phi_q(Q_i)^\top \phi_k(K_j) V_j}{\sum_j \phi_q(Q_i)^\top \phi_k(K_j)} $$

(the sums over $j \le i$ when causal), separate maps $\phi_q$, $\phi_k$ for queries and keys,
each $W$ `(d, d)` per head, initialised to the identity.

Deviations from the paper:
- the paper writes the features as $\exp(\pm(Wx + b))$; each sign is normalised by its sum here
  (a softmax over the features) so that no exponential overflows (flash-linear-attention's map
  normalises once over both signs); per query the factor cancels, per key it re-weights (the
  map is learnt through it either way);
- the distillation loss is given as a function; the layer does not train itself.
"""

import torch
from einops import einsum
from torch import nn

from zoo.core.checks import check_qkv, check_sequence, positive_int
from zoo.core.decay import decay_recurrence, fill_padded
from zoo.core.linear import kernel_attention, ratio
from zoo.core.masks import score_mask
from zoo.core.shell import MultiHead


def hedgehog_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, maps,
                                 mask: torch.Tensor | None = None, *, causal: bool = False,
                                 chunk: int = 64) -> torch.Tensor:
    """The paper's linear attention as an explicit `(n, n)` map of feature dot products, each row
    normalised; the arguments of `hedgehog_attention` (`chunk` unused). Returns `(b, h, n, e)`."""
    check_qkv(q, k, v, mask, name="hedgehog_attention")
    return hedgehog_weights(q, k, maps, mask, causal=causal) @ fill_padded(v, mask)


def hedgehog_features(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """`(b, h, n, d) -> (b, h, n, 2f)`: both signs of the learned projection, each through a softmax.
    weight `(h, d, f)`, bias `(h, f)`."""
    z = einsum(x, weight, "b h n d, h d f -> b h n f") + bias[:, None]
    # [softmax(z), softmax(-z)], as one softmax over a stacked pair: the same values, and under
    # torch.compile (inductor, torch 2.13) the concatenation of two softmaxes followed by a padding
    # fill gave a wrong input gradient (found by zoo compat; the stacked form compiles correctly).
    return torch.stack([z, -z], dim=-2).softmax(-1).flatten(-2)


def hedgehog_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, maps,
                       mask: torch.Tensor | None = None, *, causal: bool = False,
                       chunk: int = 64) -> torch.Tensor:
    """Linear attention with the learned features (chunkwise prefix sums when causal).

    Args:
        q, k: `(b, h, n, d)`. v: `(b, h, n, e)`. maps: `(w_q, b_q, w_k, b_k)`, the feature maps'
        weights `(h, d, f)` and biases `(h, f)`. mask: `(b, n)`, True = real token.

    Returns:
        `(b, h, n, e)`.
    """
    check_qkv(q, k, v, mask, name="hedgehog_attention")
    w_q, b_q, w_k, b_k = maps
    phi_q, phi_k = hedgehog_features(q, w_q, b_q), hedgehog_features(k, w_k, b_k)
    return kernel_attention(phi_q, fill_padded(phi_k, mask), fill_padded(v, mask), mask,
                            causal=causal, chunk=chunk)


def hedgehog_weights(q, k, maps, mask=None, *, causal=False) -> torch.Tensor:
    """The linear attention's weights `(b, h, i, j)` as an explicit map (rows sum to one)."""
    w_q, b_q, w_k, b_k = maps
    sim = einsum(hedgehog_features(q, w_q, b_q), hedgehog_features(k, w_k, b_k),
                 "b h i f, b h j f -> b h i j")
    allowed = score_mask(mask, q.shape[2], k.shape[2], causal=causal, device=q.device)
    if allowed is not None:
        sim = torch.where(allowed, sim, torch.zeros((), dtype=sim.dtype))
    return sim / sim.sum(-1, keepdim=True).clamp(min=torch.finfo(sim.dtype).tiny)


def distillation_loss(q: torch.Tensor, k: torch.Tensor, maps, mask: torch.Tensor | None = None, *,
                      causal: bool = False) -> torch.Tensor:
    """The paper's attention distillation: the cross-entropy of Hedgehog's weights under softmax
    attention's (`q k^T / sqrt(d)`), summed over keys, averaged over the real queries' rows.
    Quadratic in the length: train the maps on short sequences, as the paper does."""
    check_qkv(q, k, k, mask, name="distillation_loss")
    allowed = score_mask(mask, q.shape[2], k.shape[2], causal=causal, device=q.device)
    scores = einsum(q, k, "b h i d, b h j d -> b h i j") * q.shape[-1] ** -0.5
    if allowed is not None:
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    teacher = scores.softmax(-1)
    student = hedgehog_weights(q, k, maps, mask, causal=causal)
    tiny = torch.finfo(student.dtype).tiny
    cross = -(teacher * student.clamp(min=tiny).log()).sum(-1)  # (b h i)
    if mask is None:
        return cross.mean()
    real = mask[:, None, :].expand_as(cross)
    return cross[real].mean()


class Hedgehog(MultiHead):
    """Multi-head linear attention with Hedgehog feature maps. `(b, n, dim) -> (b, n, dim)`.

    Args:
        chunk: tokens per chunk of the causal prefix sums (no effect on the result).
    """

    def __init__(self, dim: int, *, heads: int = 8, dim_head: int | None = None,
                 causal: bool = False, chunk: int = 64):
        super().__init__(dim, heads=heads, dim_head=dim_head, causal=causal)
        self.chunk = positive_int(chunk, "chunk")
        eye = torch.eye(self.dim_head).expand(heads, -1, -1)
        self.w_q, self.w_k = nn.Parameter(eye.clone()), nn.Parameter(eye.clone())
        self.b_q, self.b_k = (nn.Parameter(torch.zeros(heads, self.dim_head)) for _ in range(2))

    @property
    def maps(self):
        return self.w_q, self.b_q, self.w_k, self.b_k

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        return hedgehog_attention(q, k, v, self.maps, mask, causal=self.causal, chunk=self.chunk)

    def distillation_loss(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """`distillation_loss` on this layer's queries and keys of `x` `(b, n, dim)`."""
        check_sequence(x, self.dim, mask, name="Hedgehog.distillation_loss")
        q, k, _ = map(self.split_heads, self.to_qkv(x).chunk(3, dim=-1))
        return distillation_loss(q, k, self.maps, mask, causal=self.causal)

    def decode(self, x: torch.Tensor, cache, mask: torch.Tensor | None, start: int):
        """The recurrent form (`step` of the shell): the key-value sums `(2f, e + 1)` per head,
        the normaliser as the last column."""
        q, k, v = map(self.split_heads, self.to_qkv(x).chunk(3, dim=-1))
        phi_q, phi_k = hedgehog_features(q, self.w_q, self.b_q), hedgehog_features(k, self.w_k, self.b_k)
        v = torch.cat([fill_padded(v, mask), torch.ones_like(v[..., :1])], dim=-1)
        out, cache = decay_recurrence(phi_q, fill_padded(phi_k, mask), v, None, cache)
        return self.to_out(self.merge_heads(ratio(out))), cache

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, chunk={self.chunk}"
