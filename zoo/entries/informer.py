r"""Informer: Beyond Efficient Transformer for Long Sequence Time-Series Forecasting.

ProbSparse self-attention. Most queries attend almost uniformly; only a few "active" ones have a
peaked attention row. A query's sparsity is measured by the gap between its largest score and its
mean score, estimated on a random sample of $c \lceil \ln n \rceil$ keys per query; only the
$u = c \lceil \ln n \rceil$ queries with the largest gap get exact softmax attention, and every other
query gets what a uniform row would give, the mean of the values. Time and memory are
$\mathcal{O}(n \log n)$.

$$ \bar M(q_i, K) = \max_{j \in S_i} \frac{q_i k_j^\top}{\sqrt d}
   - \frac{1}{n} \sum_{j \in S_i} \frac{q_i k_j^\top}{\sqrt d}, \qquad
   O_i = \begin{cases} \operatorname{softmax}\!\big(q_i K^\top / \sqrt d\big)\, V
   & i \in \operatorname{top}_u \bar M \\ \tfrac{1}{n} \sum_j v_j & \text{otherwise} \end{cases} $$

`masked=True` is the decoder's masked form: active queries see keys up to themselves and the
others get the cumulative sum of the values, as in the authors' code. It is not causal: whether a
query is active depends on the scores of later queries (the top-u ranks all of them) and on
sampled later keys, so the layer refuses `causal=True`.

Deviations from the paper:
- `block` consecutive queries (64 in the layer) share one key sample, so the measurement is a batched
  matrix product over `(b, h, n / block, s, d)` gathered keys instead of a `(b, h, n, s, d)` gather
  (840 MB at n = 16384); each query's sample is still $c \lceil \ln n \rceil$ keys drawn uniformly
  with replacement, only its draw is shared with its neighbours. `block=1` is the paper's per-query
  sample;
- the key sample is drawn per call from torch's global generator in training mode; in eval mode
  it is `seeded_sample`, a fixed integer hash of (`seed`, slot) reduced modulo n: deterministic,
  computed from the sizes alone, so compiled, exported and traced layers draw the same sample as
  eager (a generator seeded inside `forward` would be re-drawn unseeded by a traced graph); one
  sample serves the whole batch and all heads, as in the authors' code;
- at least one query is active and at least one key sampled (for n = 1, $\ln n = 0$);
- with a padding mask, padded keys are left out of the measurement, the softmax and the mean
  (whose divisor is then the number of real keys) and padded queries are never ranked first;
- only the attention: no distilling convolutions between encoder layers, no generative decoder.
"""

import math

import torch
import torch.nn.functional as F
from einops import einsum, rearrange, repeat

from zoo.core.checks import check_qkv, positive_int, refuse_causal
from zoo.core.masks import masked_fill_scores, neg_fill
from zoo.core.shell import MultiHead

_PRIME = 2_147_483_629  # < 2^31, so every product below stays inside int64


def probsparse_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                   sample: torch.Tensor, mask: torch.Tensor | None = None, *,
                                   factor: int = 5, masked: bool = False,
                                   block: int = 1) -> torch.Tensor:
    """The paper's equations for every query at once: the measurement `M(q_i, K)` on each query's
    own sampled keys (row `i // block` of `sample`), the `u` largest, exact softmax rows for them
    and the mean of the values (the cumulative sum when `masked`) for the rest. Same arguments as
    `probsparse_attention`."""
    b, h, n, d = q.shape
    real = torch.ones(b, n, dtype=torch.bool, device=q.device) if mask is None else mask
    count = rearrange(real.sum(-1).clamp(min=1).to(q.dtype), "b -> b 1 1")
    scores = einsum(q, k, "b h i d, b h j d -> b h i j") * d ** -0.5
    # M: the max and the mean (over all n real keys) of the sampled real scores
    per_query = repeat(sample, "c s -> (c w) s", w=block)[:n]  # (i s)
    picked = scores.gather(-1, repeat(per_query, "i s -> b h i s", b=b, h=h))  # (b h i s)
    seen = rearrange(real[:, per_query], "b i s -> b 1 i s")
    gap = picked.masked_fill(~seen, neg_fill(q.dtype)).amax(-1) - (picked * seen).sum(-1) / count
    gap = gap.masked_fill(~rearrange(real, "b i -> b 1 i"), neg_fill(q.dtype))  # padded: last
    top = gap.topk(sample_size(n, factor), dim=-1).indices  # (b h u)
    active = torch.zeros(b, h, n, dtype=torch.bool, device=q.device).scatter(-1, top, True)
    keys = rearrange(real, "b j -> b 1 1 j")
    if masked:
        keys = keys & torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    exact = einsum(masked_fill_scores(scores, keys).softmax(dim=-1), v, "b h i j, b h j e -> b h i e")
    v = v * rearrange(real, "b j -> b 1 j 1").to(v.dtype)  # padded values count as 0
    lazy = v.cumsum(dim=2) if masked else (v.sum(2, keepdim=True) / rearrange(count, "b 1 1 -> b 1 1 1"))
    return torch.where(rearrange(active, "b h i -> b h i 1"), exact, lazy)


def sample_size(n: int, factor: int) -> int:
    """c * ceil(ln n), at least 1 and at most n: the number of active queries and of sampled keys."""
    return min(n, max(1, factor * math.ceil(math.log(n))))


def sampled_scores(q: torch.Tensor, k: torch.Tensor, sample: torch.Tensor, block: int) -> torch.Tensor:
    """`(b, h, n, s)`: $q_i k_j^\top$ for the s keys j sampled for query i.

    Query i uses row i // block of `sample` `(ceil(n / block), s)`: a block of queries shares one
    sample, so its scores are one `(block, d) x (d, s)` matrix product and only
    `(b, h, n / block, s, d)` keys are gathered (block = 1: one sample per query, as in the paper).
    """
    b, h, n, d = q.shape
    pad = sample.shape[0] * block - n
    if pad:  # the last block is partial: fill it with zero queries, dropped below
        q = F.pad(q, (0, 0, 0, pad))
    keys = k[:, :, sample]  # (b h c s d)
    scores = einsum(rearrange(q, "b h (c w) d -> b h c w d", w=block), keys,
                    "b h c w d, b h c s d -> b h c w s")
    return rearrange(scores, "b h c w s -> b h (c w) s")[:, :, :n]


def probsparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sample: torch.Tensor,
                         mask: torch.Tensor | None = None, *, factor: int = 5, masked: bool = False,
                         block: int = 1) -> torch.Tensor:
    """What the layer runs: `probsparse_attention_reference` without the `n x n` scores: the
    measurement on gathered key blocks, exact rows only for the `u` active queries, scattered into
    the lazy rows (tested equal). ProbSparse self-attention.

    Args:
        q, k: `(b, h, n, d)`. v: `(b, h, n, e)`.
        sample: key indices `(ceil(n / block), s)`, one row per block of `block` consecutive queries
            (block = 1: a sample per query, as in the paper).
        mask: `(b, n)`, True = real token. factor: c, as in u = c ceil(ln n).
        masked: the decoder's form (active queries see keys up to themselves; the others get the
            cumulative sum of the values). Not causal; see the module docstring.

    Returns:
        `(b, h, n, e)`.
    """
    check_qkv(q, k, v, mask, name="probsparse_attention")
    b, h, n, d = q.shape
    if sample.shape[0] != -(-n // block):
        raise ValueError(f"probsparse_attention: expected a sample of ceil(n / block) = {-(-n // block)} "
                         f"rows, got {sample.shape[0]}")
    scale, fill = d ** -0.5, neg_fill(q.dtype)
    count = n if mask is None else rearrange(mask.sum(-1).clamp(min=1).to(q.dtype), "b -> b 1 1")
    # eq. (4), on the sampled keys (the others count as 0 in the mean); the scale taken out of both
    scores = sampled_scores(q, k, sample, block)  # (b h i s)
    if mask is None:
        gap = (scores.amax(-1) - scores.sum(-1) / count) * scale  # (b h i)
    else:  # padded keys are left out of the max and the sum; padded queries are ranked last
        per_query = repeat(sample, "c s -> (c w) s", w=block)[:n]  # query i's sample: row i // block
        seen = rearrange(mask[:, per_query], "b i s -> b 1 i s")
        gap = (scores.masked_fill(~seen, fill).amax(-1) - (scores * seen).sum(-1) / count) * scale
        gap = gap.masked_fill(~rearrange(mask, "b i -> b 1 i"), fill)
    top = gap.topk(sample_size(n, factor), dim=-1).indices  # (b h u)
    # eq. (3): exact attention for the active queries
    active = einsum(q.gather(2, repeat(top, "b h u -> b h u d", d=d)) * scale, k,
                    "b h u d, b h j d -> b h u j")
    allowed = None if mask is None else rearrange(mask, "b j -> b 1 1 j")
    if masked:
        before = torch.arange(n, device=q.device) <= top[..., None]  # (b h u j)
        allowed = before if allowed is None else allowed & before
    attn = masked_fill_scores(active, allowed).softmax(dim=-1)  # (b h u j)
    active = einsum(attn, v, "b h u j, b h j e -> b h u e")
    if mask is not None:
        v = v * rearrange(mask, "b j -> b 1 j 1").to(v.dtype)  # padded values count as 0
    lazy = v.cumsum(dim=2) if masked else repeat(v.sum(2) / count, "b h e -> b h n e", n=n)
    return lazy.scatter(2, repeat(top, "b h u -> b h u e", e=v.shape[-1]), active)



def seeded_sample(n: int, shape: tuple[int, int], seed: int, device=None) -> torch.Tensor:
    """`shape` key indices in `[0, n)`, uniform to within n / 2^31 and the same for the same
    `(n, shape, seed)`: each slot's index is an integer hash (multiply-xorshift rounds modulo a
    prime) of the seed and the slot's position. Tensor ops on sizes only, so it traces, compiles
    and exports like any other op; no generator is seeded inside `forward`."""
    x = torch.arange(shape[0] * shape[1], device=device, dtype=torch.int64).reshape(shape)
    x = (x + (seed % _PRIME) * 7_919 + 1) % _PRIME
    for mult in (1_103_515_245, 2_654_435_761 % _PRIME, 1_597_334_677):
        x = (x * mult) % _PRIME
        x = x ^ (x >> 13)
    return x % n


class Informer(MultiHead):
    """Multi-head ProbSparse self-attention. `(b, n, dim) -> (b, n, dim)`.

    Args:
        factor: c: c ceil(ln n) active queries and sampled keys per query.
        block: consecutive queries that share one key sample (1: a sample per query, as in the paper).
        seed: seeds the key sample in eval mode (see `seeded_sample`).
    """

    def __init__(self, dim: int, *, heads: int = 8, dim_head: int | None = None, causal: bool = False,
                 factor: int = 5, block: int = 64, seed: int = 0):
        refuse_causal(type(self).__name__, causal)
        super().__init__(dim, heads=heads, dim_head=dim_head, causal=False)
        self.factor = positive_int(factor, "factor")
        self.block = positive_int(block, "block")
        self.seed = seed

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        n = k.shape[2]
        shape = (-(-n // self.block), sample_size(n, self.factor))  # (ceil(n / block), s)
        sample = (torch.randint(n, shape, device=q.device) if self.training else
                  seeded_sample(n, shape, self.seed, device=q.device))
        return probsparse_attention(q, k, v, sample, mask, factor=self.factor, block=self.block)
