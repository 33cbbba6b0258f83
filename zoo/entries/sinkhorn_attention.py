r"""Sparse Sinkhorn Attention.

Cut the sequence into $N_B$ equal blocks and learn to sort them: a small network scores every
block against every block position from a summary of each block (the sum of its keys), and
Sinkhorn normalisation (alternately normalising rows and columns, in log space, at temperature
$\tau$) turns the scores into a soft permutation matrix, nearly doubly stochastic. Each block then
attends to its own keys and to the keys of the block sorted into its place, a soft mix of blocks
$\sum_j S_{ij} K_j$. The attention cost is that of $N_B$ blocks of $n/N_B$ tokens. In the causal
variant block $i$ is sorted only from earlier blocks, from the running summary of those blocks.

$$ S = \operatorname{Sinkhorn}_T\!\big(P(\psi(K)) / \tau\big), \qquad
   O_{B_i} = \operatorname{softmax}\!\big(s\,Q_{B_i} [\textstyle\sum_j S_{ij} K_{B_j};\, K_{B_i}]^\top\big)
   [\textstyle\sum_j S_{ij} V_{B_j};\, V_{B_i}] $$

Deviations from the paper:
- The sorting network reads each head's keys (block sums) rather than the layer input, so
  `attend(q, k, v)` holds the whole mechanism.
- Causal: row $i$ of the sorting matrix sees only blocks before $i$ (its input is the running sum
  of those blocks, later entries are masked) and only rows are normalised, since normalising columns
  would mix in later blocks' scores.
- Gumbel noise on the scores is drawn per call, and only in training mode.
- No SortCut truncation and no Sinkhorn mixture with full attention.
"""

import math

import torch
from einops import einsum, rearrange
from torch import nn

from zoo.core.checks import check_qkv, positive_int
from zoo.core.masks import neg_fill, pad_mask, pad_qkv, pad_to_multiple, zero_padded
from zoo.core.shell import MultiHead
from zoo.core.sorting import LOG2E, softmax_attend


def sinkhorn_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sort: torch.Tensor,
                                 mask: torch.Tensor | None = None, *, causal: bool = False,
                                 scale: float | None = None) -> torch.Tensor:
    """Each block of queries attends, in one plain softmax, to its sorted block `sum_j R_ij K_j`
    (a sorted key is real where any real key mixes into it) and to its own block (keys `j <= i`
    when causal). Same arguments as `sinkhorn_attention`."""
    b, h, n, d = q.shape
    nb = sort.shape[-1]
    c = math.ceil(n / nb)
    q, k, v, real = pad_qkv(q, k, v, mask, c * nb)
    qb, kb, vb = (rearrange(t, "b h (nb c) d -> b h nb c d", c=c) for t in (q, zero_padded(k, real),
                                                                          zero_padded(v, real)))
    real = rearrange(real, "b (nb c) -> b 1 nb c", c=c).to(q.dtype).expand(b, h, nb, c)
    k_sorted, v_sorted = (einsum(sort, t, "b h i j, b h j c d -> b h i c d") for t in (kb, vb))
    real_sorted = einsum(sort, real, "b h i j, b h j c -> b h i c") > 0
    own = rearrange(real.bool(), "b h nb j -> b h nb 1 j")
    if causal:
        own = own & torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    keep = torch.cat([rearrange(real_sorted, "b h nb j -> b h nb 1 j").expand(-1, -1, -1, c, -1),
                      own.expand(b, h, nb, c, c)], dim=-1)  # (b h nb i 2c)
    scale = d ** -0.5 if scale is None else scale
    scores = einsum(qb, torch.cat([k_sorted, kb], dim=3), "b h nb i d, b h nb j d -> b h nb i j")
    attn = (scores * scale).masked_fill(~keep, neg_fill(scores.dtype)).softmax(dim=-1)
    out = einsum(attn, torch.cat([v_sorted, vb], dim=3), "b h nb i j, b h nb j e -> b h nb i e")
    return rearrange(out, "b h nb c e -> b h (nb c) e")[:, :, :n]


def sinkhorn(logits: torch.Tensor, iters: int, *, causal: bool = False) -> torch.Tensor:
    """Sinkhorn normalisation in log space: `(..., nb, nb)` scores -> sorting matrix.

    Each iteration normalises rows, then columns, so the result is doubly stochastic
    up to the convergence of the iterations. Causal: row `i` keeps only columns `j < i` and only
    rows are normalised (row 0 is empty).
    """
    if causal:
        future = torch.ones(logits.shape[-2:], dtype=torch.bool, device=logits.device).triu()
        logits = logits.masked_fill(future, neg_fill(logits.dtype))
        return logits.softmax(dim=-1) * ~future
    for _ in range(iters):
        logits = logits - logits.logsumexp(dim=-1, keepdim=True)
        logits = logits - logits.logsumexp(dim=-2, keepdim=True)
    return logits.exp()


def sinkhorn_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sort: torch.Tensor,
                       mask: torch.Tensor | None = None, *, causal: bool = False,
                       scale: float | None = None) -> torch.Tensor:
    """What the layer runs: `sinkhorn_attention_reference` with the softmax in log2 units, masked
    in place (`zoo.core.sorting.softmax_attend`) (tested equal). Block attention to the own block
    and the sorted block.

    Args:
        q, k: `(b, h, n, d)`. v: `(b, h, n, e)`. sort: `(b, h, nb, nb)`, row i mixes the blocks
            sorted into place i. mask: `(b, n)`, True = real token.
        causal: query `i` sees keys `j <= i` in its own block; the sorted block must then mix
            only earlier blocks.

    Returns:
        `(b, h, n, e)`.
    """
    check_qkv(q, k, v, mask, name="sinkhorn_attention")
    b, h, n, d = q.shape
    nb = sort.shape[-1]
    c = math.ceil(n / nb)
    q, k, v, real = pad_qkv(q, k, v, mask, c * nb)
    pad = q.shape[2] - n
    qb = rearrange(q, "b h (nb c) d -> b h nb c d", c=c)
    kb, vb = (rearrange(zero_padded(t, real), "b h (nb c) d -> b h nb c d", c=c) for t in (k, v))
    k_sorted, v_sorted = (einsum(sort, t, "b h i j, b h j c d -> b h i c d") for t in (kb, vb))
    keys, values = torch.cat([k_sorted, kb], dim=3), torch.cat([v_sorted, vb], dim=3)  # (b h nb 2c d)
    keep = None  # no padding and not causal: every key is kept
    if mask is not None or pad or causal:
        real = rearrange(real, "b (nb c) -> b 1 nb c", c=c).to(q.dtype)
        real_sorted = einsum(sort, real.expand(b, h, -1, -1), "b h i j, b h j c -> b h i c")
        own = real.bool().unsqueeze(-2)  # (b 1 nb 1 c)
        if causal:
            own = own & torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
        keep = torch.cat([(real_sorted > 0).unsqueeze(-2).expand(-1, -1, -1, c, -1),
                          own.expand(b, h, nb, c, c)], dim=-1)  # (b h nb i 2c)
    scale = d ** -0.5 if scale is None else scale
    # scores in log2 units, as zoo.core.sorting.softmax_attend takes them
    bits = einsum(qb * (scale * LOG2E), keys, "b h nb i d, b h nb j d -> b h nb i j")
    out, _ = softmax_attend(bits if keep is None else bits.masked_fill_(~keep, -math.inf), values)
    return rearrange(out, "b h nb c e -> b h (nb c) e")[:, :, :n]


class SinkhornAttention(MultiHead):
    """Sparse Sinkhorn attention. `(b, n, dim) -> (b, n, dim)`.

    Args:
        n_blocks: number of blocks $N_B$; the block length is `ceil(n / n_blocks)`.
        temperature: $\\tau$ of the Sinkhorn normalisation.
        sinkhorn_iters: row-and-column normalisation rounds.
    """

    def __init__(self, dim: int, *, heads: int = 8, dim_head: int | None = None,
                 causal: bool = False, n_blocks: int = 64, temperature: float = 0.75,
                 sinkhorn_iters: int = 8):
        super().__init__(dim, heads=heads, dim_head=dim_head, causal=causal)
        self.n_blocks = positive_int(n_blocks, "n_blocks")
        self.sinkhorn_iters = positive_int(sinkhorn_iters, "sinkhorn_iters")
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature!r}")
        self.temperature = temperature
        d = self.dim_head
        self.sort_net = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, n_blocks))

    def sort_matrix(self, k: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The soft sorting matrix `(b, h, nb, nb)` from the block sums of the keys `(b, h, n, d)`."""
        b, _, n, _ = k.shape
        c = math.ceil(n / self.n_blocks)
        k, pad = pad_to_multiple(k, c * self.n_blocks)
        k = zero_padded(k, pad_mask(mask, b, n, pad, k.device))
        summary = rearrange(k, "b h (nb c) d -> b h nb c d", c=c).sum(dim=3)  # psi_P
        if self.causal:  # the sum of the blocks before each block
            summary = torch.cat([torch.zeros_like(summary[:, :, :1]),
                                 summary[:, :, :-1].cumsum(dim=2)], dim=2)
        logits = self.sort_net(summary)  # (b h nb nb)
        if self.training:  # Gumbel noise, training only
            logits = logits - torch.empty_like(logits).exponential_().log()
        return sinkhorn(logits / self.temperature, self.sinkhorn_iters, causal=self.causal)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        return sinkhorn_attention(q, k, v, self.sort_matrix(k, mask), mask, causal=self.causal)

