r"""Smart Bird: Learnable Sparse Attention for Efficient and Effective Transformer.

Fixed or random sparse patterns may miss the pairs that matter. Smart Bird first computes a
sketch of the attention map with a single cheap head of low dimension $d_s$, then draws, for every
query and every attention head, $k$ keys with the sketch's probabilities, so different heads read
different keys. Each head then runs ordinary softmax attention over its $k$ drawn keys only.

$$ S = \operatorname{softmax}\!\big(Q_s K_s^\top / \sqrt{d_s}\big), \qquad
   I^h_i \sim S_i \ (k \text{ draws without replacement}), \qquad
   O^h_i = \sum_{j \in I^h_i} \operatorname{softmax}_j\!\big(q^h_i \cdot k^h_j / \sqrt d\big)\, v^h_j $$

In training the draws are Gumbel-top-k samples, fresh at every call and independent per head; in
eval mode every head reads the $k$ most probable keys (the sketch's top-k), so the layer is
deterministic. With $k \ge n$ every key is read: softmax attention.

Deviations from the paper:
- The sketch is computed one block of queries at a time and never held in full, so memory is
  linear; its time stays quadratic (with the small dimension $d_s$).
- The draws are discrete; the sketch learns through a straight-through factor on the drawn edges,
  $\exp(\log S_{ij} - \operatorname{sg}(\log S_{ij})) = 1$, which leaves the output unchanged
  and passes the gradient of each drawn weight to the log-probability the key was drawn with (a
  score-function surrogate, each draw taken as one draw from $S_i$). An earlier version
  differentiated the unnormalised sketch score instead.
- That surrogate trains the sketch's own projections only: the sketch reads the heads' queries and
  keys detached. When it flowed back into them, the recall model's loss rose above its starting
  value (n64-p4: 6.92 to 7.15 in 1500 steps) even with $k \ge n$, where every key is read and the
  true gradient through the sketch is zero; there the layer's input gradients were 28% away from
  softmax attention's. Detached, they equal softmax's at $k \ge n$ (the exact-limit claim checks
  gradients too).
- Eval mode takes the top-k instead of sampling, so there all heads read the same keys.
"""

import torch
from einops import einsum, rearrange
from torch import nn

from zoo.core.checks import check_qkv, positive_int, refuse_causal
from zoo.core.edges import drawn_edge_attention
from zoo.core.masks import neg_fill
from zoo.core.shell import MultiHead

CHUNK = 256  # queries whose sketch rows are held at once


def smart_bird_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                   q_sketch: torch.Tensor, k_sketch: torch.Tensor,
                                   mask: torch.Tensor | None = None, *, per_query: int = 16,
                                   sample: bool = False, scale: float | None = None) -> torch.Tensor:
    """The paper's three steps as written: the sketch `S` over every `(i, j)`, `k` keys drawn per
    query and head, and softmax over the drawn keys as an allowed pattern (with the same
    straight-through factor on the drawn edges). Same arguments as `smart_bird_attention`."""
    check_qkv(q, k, v, mask, name="smart_bird_attention_reference")
    n, d = q.shape[2], q.shape[3]
    scale = d ** -0.5 if scale is None else scale
    logits = einsum(q_sketch, k_sketch, "b i f, b j f -> b i j") * q_sketch.shape[-1] ** -0.5
    if mask is not None:
        logits = logits.masked_fill(~rearrange(mask, "b j -> b 1 j"), neg_fill(logits.dtype))
    idx = draw_keys(logits, min(per_query, n), q.shape[1], sample=sample)  # (b h|1 i k)
    drawn = torch.zeros(*idx.shape[:3], n, dtype=torch.bool, device=q.device).scatter(-1, idx, True)
    keep = drawn if mask is None else drawn & rearrange(mask, "b j -> b 1 1 j")  # (b h|1 i j)
    scores = einsum(q, k, "b h i d, b h j d -> b h i j") * scale
    attn = scores.masked_fill(~keep, neg_fill(scores.dtype)).softmax(dim=-1)
    # equal to 1 in value; the gradient of each drawn weight reaches the sketch score it was drawn with
    logp = logits.log_softmax(dim=-1)  # log S_ij, the probability each key is drawn with
    attn = attn * rearrange((logp - logp.detach()).exp(), "b i j -> b 1 i j")
    return einsum(attn, v, "b h i j, b h j e -> b h i e")


def draw_keys(logits: torch.Tensor, per_query: int, heads: int, *, sample: bool) -> torch.Tensor:
    """Indices of the keys each query reads.

    Args:
        logits: `(b, i, j)` sketch scores (masked keys at the dtype's minimum).
        per_query: keys per query, at most j.
        heads: number of heads that draw independently when sampling.
        sample: Gumbel-top-k draws, one per head; otherwise the top-k, shared by the heads.

    Returns:
        `(b, heads or 1, i, per_query)`.
    """
    if not sample:
        return logits.topk(per_query, dim=-1).indices[:, None]
    uniform = torch.rand(logits.shape[0], heads, *logits.shape[1:], dtype=logits.dtype,
                         device=logits.device)
    gumbel = -torch.log(-torch.log(uniform.clamp(min=torch.finfo(logits.dtype).tiny)))
    return (logits[:, None] + gumbel).topk(per_query, dim=-1).indices


def smart_bird_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_sketch: torch.Tensor,
                         k_sketch: torch.Tensor, mask: torch.Tensor | None = None, *,
                         per_query: int = 16, sample: bool = False,
                         scale: float | None = None) -> torch.Tensor:
    """What the layer runs: `smart_bird_attention_reference` without the `n x n` pattern, the
    sketch one block of `CHUNK` queries at a time and the drawn keys gathered (tested equal).
    Sparse attention over keys drawn from a low-dimensional sketch.

    Args:
        q, k: `(b, h, n, d)`. v: `(b, h, n, e)`. mask: `(b, n)`, True = real token.
        q_sketch, k_sketch: `(b, n, f)`, the sketch head's queries and keys.
        per_query: keys drawn per query and head (capped at n).
        sample: draw per head (training) instead of taking the top-k (eval).
        scale: score scale; None means `d ** -0.5`.

    Returns:
        `(b, h, n, e)`.
    """
    check_qkv(q, k, v, mask, name="smart_bird_attention")
    b, h, n, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    per_query = min(per_query, n)
    outs = []
    for start in range(0, n, CHUNK):
        rows = slice(start, start + CHUNK)
        logits = einsum(q_sketch[:, rows], k_sketch, "b i f, b j f -> b i j") * q_sketch.shape[-1] ** -0.5
        if mask is not None:
            logits = logits.masked_fill(~mask[:, None, :], neg_fill(logits.dtype))
        idx = draw_keys(logits, per_query, h, sample=sample)  # (b h|1 i k)
        logp = logits.log_softmax(dim=-1)  # log S_ij
        drawn = torch.take_along_dim(logp[:, None], idx, dim=-1)  # (b h|1 i k)
        real = None if mask is None else torch.take_along_dim(mask[:, None, None, :], idx, dim=-1)
        outs.append(drawn_edge_attention(q[:, :, rows], k, v, idx, drawn, real, scale=scale))
    return torch.cat(outs, dim=2)


class SmartBird(MultiHead):
    """Multi-head Smart Bird attention. `(b, n, dim) -> (b, n, dim)`. Not causal.

    The sketch head reads the layer's queries and keys, all heads together (`sketch_q`,
    `sketch_k`: `heads * dim_head -> sketch_dim`), so `attend(q, k, v)` holds the whole mechanism.

    Args:
        k: keys drawn per query and head; `k >= n` is softmax attention.
        sketch_dim: dimension of the single sketch head.
    """

    def __init__(self, dim: int, *, heads: int = 8, dim_head: int | None = None,
                 causal: bool = False, k: int = 16, sketch_dim: int = 16):
        refuse_causal(type(self).__name__, causal)
        super().__init__(dim, heads=heads, dim_head=dim_head, causal=False)
        self.k = positive_int(k, "k")
        self.sketch_dim = positive_int(sketch_dim, "sketch_dim")
        self.sketch_q = nn.Linear(heads * self.dim_head, sketch_dim, bias=False)
        self.sketch_k = nn.Linear(heads * self.dim_head, sketch_dim, bias=False)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        # The sketch reads the heads' queries and keys but sends no gradient back into them: its
        # surrogate is not the output's gradient, and through q and k it reached the whole model
        # (see the module's deviations).
        q_sketch = self.sketch_q(self.merge_heads(q).detach())
        k_sketch = self.sketch_k(self.merge_heads(k).detach())
        return smart_bird_attention(q, k, v, q_sketch, k_sketch, mask, per_query=self.k,
                                    sample=self.training)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, k={self.k}, sketch_dim={self.sketch_dim}"
