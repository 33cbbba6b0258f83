r"""SAC: Accelerating and Structuring Self-Attention via Sparse Adaptive Connection.

SAC treats the sequence as a graph and runs attention only along its edges, and it learns the
edges: an edge predictor points from every node to the nodes it should read, and the attention
of all heads then runs over that predicted graph, $k$ edges per node instead of $n$. Fixed
patterns (local windows, strides, global tokens) are special edge sets; here they are
predicted from the input. The prediction is discrete, so the paper trains the predictor with a
policy gradient from the task loss.

$$ \ell_{i,s,j} = \frac{(P_s\, q_i) \cdot (R\, k_j)}{\sqrt{d_e}}, \qquad
   E(i) = \{ \operatorname{argmax}_j \ell_{i,s,j} : s = 1, \dots, k \}, \qquad
   O^h_i = \sum_{j \in E(i)} \operatorname{softmax}_j\!\big(q^h_i \cdot k^h_j / \sqrt d\big)\, v^h_j $$

Pointer $s$ of node $i$ picks one neighbour; two pointers that pick the same node give one edge.
Causally a pointer only reaches $j \le i$. In training each pointer samples its node
(Gumbel-max, fresh at every call); in eval mode it takes the argmax, so the graph is deterministic.

Deviations from the paper:
- The edge predictor is parallel: $k$ pointer heads per node score all nodes at once, where the
  paper's LSTM predictor emits the edges one after another. Its time is quadratic (all pointer
  logits), computed one block of nodes at a time so that memory stays linear.
- The predictor reads the layer's own queries and keys (all heads concatenated), a linear map of
  the input, so `attend(q, k, v)` holds the whole mechanism.
- The policy gradient becomes a score-function surrogate: each drawn edge is weighted by
  $\exp(\log \pi_{i,s}(j) - \operatorname{sg}(\log \pi_{i,s}(j))) = 1$, with
  $\pi_{i,s} = \operatorname{softmax}_j \ell_{i,s,j}$, which leaves the output unchanged and passes
  each edge's share of the loss to the log-probability of its draw (REINFORCE's
  $\nabla \log \pi$; no baseline, no sampling of the loss). An earlier version differentiated the
  raw logit $\ell$ instead: unnormalised, so the logits grew without bound and the gradient norm
  reached $10^9$ within 200 steps of recall training (found by the recall grid).
"""

import torch
from einops import einsum, rearrange
from torch import nn

from zoo.core.checks import check_qkv, positive_int
from zoo.core.edges import drawn_edge_attention
from zoo.core.masks import neg_fill
from zoo.core.shell import MultiHead

CHUNK = 128  # nodes whose pointer logits are held at once


def sac_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pointers: torch.Tensor,
                            targets: torch.Tensor, mask: torch.Tensor | None = None, *,
                            causal: bool = False, sample: bool = False,
                            scale: float | None = None) -> torch.Tensor:
    """The predicted graph as an allowed `(i, j)` set: every pointer logit `l_{i,s,j}` at once,
    `E(i)` the nodes the pointers pick (one edge however many pick it), softmax over `E(i)`, each
    edge's weight carrying the straight-through factor of the first pointer that picked it. Same
    arguments as `sac_attention`."""
    check_qkv(q, k, v, mask, name="sac_attention_reference")
    n, d = q.shape[2], q.shape[3]
    scale = d ** -0.5 if scale is None else scale
    logits = einsum(pointers * targets.shape[-1] ** -0.5, targets, "b i s f, b j f -> b i s j")
    pos = torch.arange(n, device=q.device)
    if causal:
        later = rearrange(pos, "j -> 1 1 1 j") > rearrange(pos, "i -> 1 i 1 1")
        logits = logits.masked_fill(later, neg_fill(logits.dtype))
    if mask is not None:
        logits = logits.masked_fill(~rearrange(mask, "b j -> b 1 1 j"), neg_fill(logits.dtype))
    _, idx = point(logits, sample=sample)  # (b i s)
    logp = logits.log_softmax(dim=-1)  # log pi(j | i, s): the policy the score function differentiates
    picks = rearrange(idx, "b i s -> b i s 1") == pos  # (b i s j)
    first = picks & (picks.cumsum(dim=2) == 1)  # the first pointer that picks j
    edges = picks.any(dim=2)  # (b i j)
    if causal:
        edges = edges & (rearrange(pos, "j -> 1 1 j") <= rearrange(pos, "i -> 1 i 1"))
    if mask is not None:
        edges = edges & rearrange(mask, "b j -> b 1 j")
    drawn = (logp * first).sum(dim=2)  # (b i j): that pointer's log-probability of j
    scores = einsum(q, k, "b h i d, b h j d -> b h i j") * scale
    keep = rearrange(edges, "b i j -> b 1 i j")
    attn = scores.masked_fill(~keep, neg_fill(scores.dtype)).softmax(dim=-1)
    attn = attn * rearrange((drawn - drawn.detach()).exp(), "b i j -> b 1 i j")
    return einsum(attn, v, "b h i j, b h j e -> b h i e")


def point(logits: torch.Tensor, *, sample: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The node each pointer picks and its logit: `(b, i, s, j)` -> two `(b, i, s)` (Gumbel-max
    samples when `sample`, else the argmax)."""
    if not sample:
        return logits.max(dim=-1)
    uniform = torch.rand_like(logits).clamp(min=torch.finfo(logits.dtype).tiny)
    idx = (logits - torch.log(-torch.log(uniform))).argmax(dim=-1)
    return torch.take_along_dim(logits, idx[..., None], dim=-1)[..., 0], idx


def sac_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pointers: torch.Tensor,
                  targets: torch.Tensor, mask: torch.Tensor | None = None, *,
                  causal: bool = False, sample: bool = False,
                  scale: float | None = None) -> torch.Tensor:
    """What the layer runs: `sac_attention_reference` without the `n x n` pattern, the pointer
    logits one block of `CHUNK` nodes at a time and the picked nodes gathered (tested equal).
    Attention over a predicted graph: each node reads the nodes its pointers pick.

    Args:
        q, k: `(b, h, n, d)`. v: `(b, h, n, e)`. mask: `(b, n)`, True = real token.
        pointers: `(b, n, s, f)`, the s pointer vectors of each node. targets: `(b, n, f)`.
        causal: pointers reach only nodes `j <= i`.
        sample: sample each pointer (training) instead of taking its argmax (eval).
        scale: score scale; None means `d ** -0.5`.

    Returns:
        `(b, h, n, e)`.
    """
    check_qkv(q, k, v, mask, name="sac_attention")
    b, h, n, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    slots = pointers.shape[2]
    pointers = pointers * targets.shape[-1] ** -0.5
    earlier = torch.ones(slots, slots, dtype=torch.bool, device=q.device).tril(-1)
    outs = []
    for start in range(0, n, CHUNK):
        rows = slice(start, start + CHUNK)
        i = torch.arange(start, min(start + CHUNK, n), device=q.device)
        reach = int(i[-1]) + 1 if causal else n  # causally no pointer reaches past the block
        logits = rearrange(rearrange(pointers[:, rows], "b i s f -> b (i s) f")
                           @ targets[:, :reach].transpose(1, 2), "b (i s) j -> b i s j", s=slots)
        if causal:
            later = rearrange(torch.arange(reach, device=q.device) > i[:, None], "i j -> 1 i 1 j")
            logits = logits.masked_fill(later, neg_fill(logits.dtype))
        if mask is not None:
            logits = logits.masked_fill(rearrange(~mask[:, :reach], "b j -> b 1 1 j"),
                                        neg_fill(logits.dtype))
        drawn, idx = point(logits, sample=sample)  # (b i s)
        drawn = drawn - logits.logsumexp(dim=-1)  # the draw's log-probability
        # an edge is kept once (the first pointer that picks it) and only to a node it may read
        real = ~((idx[..., :, None] == idx[..., None, :]) & earlier).any(-1)
        if causal:
            real = real & (idx <= i[:, None])
        if mask is not None:
            real = real & torch.gather(mask, 1, idx.flatten(1)).view_as(idx)
        outs.append(drawn_edge_attention(q[:, :, rows], k, v, idx[:, None], drawn[:, None],
                                         real[:, None], scale=scale))
    return torch.cat(outs, dim=2)


class SAC(MultiHead):
    """Multi-head attention over a graph predicted by SAC's edge pointers. `(b, n, dim) -> same`.

    Args:
        k: edges predicted per node (pointer heads).
        pointer_dim: dimension of the pointer and target vectors.
    """

    def __init__(self, dim: int, *, heads: int = 8, dim_head: int | None = None,
                 causal: bool = False, k: int = 4, pointer_dim: int = 16):
        super().__init__(dim, heads=heads, dim_head=dim_head, causal=causal)
        self.k = positive_int(k, "k")
        self.pointer_dim = positive_int(pointer_dim, "pointer_dim")
        self.to_pointers = nn.Linear(heads * self.dim_head, k * pointer_dim, bias=False)
        self.to_targets = nn.Linear(heads * self.dim_head, pointer_dim, bias=False)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        pointers = rearrange(self.to_pointers(self.merge_heads(q)), "b n (s f) -> b n s f", s=self.k)
        targets = self.to_targets(self.merge_heads(k))
        return sac_attention(q, k, v, pointers, targets, mask, causal=self.causal,
                             sample=self.training)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, k={self.k}, pointer_dim={self.pointer_dim}"
