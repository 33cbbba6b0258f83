r"""SCRAM: Spatially Coherent Randomized Attention Maps.

Attention maps are sparse (most weight sits near the best-matching key) and spatially coherent
(neighbouring queries match neighbouring keys). So first find, for every query, its most
compatible key with PatchMatch, a randomized correspondence search: start from random matches,
then repeatedly try the matches of neighbouring queries shifted by their offset (propagation) and
random keys at exponentially shrinking distances around the current match (random search), keeping
whichever scores higher. As in PatchMatch (Barnes et al. 2009, $u_l = v_0 + w \alpha^l R_l$), the
random-search candidates of one search are all drawn around the match $v_0$ it starts from, so they
are scored together and the best of them (the first, on a tie) replaces $v_0$ if it scores higher.
Then attend only to the window of keys around that argmax. With $O(\log n)$ candidates per query
and iteration, the cost is $O(n \log n)$.

$$ m_i \approx \arg\max_j q_i^\top k_j, \qquad
   O_i = \sum_{j \in W(m_i)} \operatorname{softmax}_j\big(s\, q_i^\top k_j\big)\, v_j $$

($W(m)$: the `window` keys centred on $m$, shifted to stay inside the sequence.)

Deviations from the paper:
- One-dimensional: the sequence is the grid, so propagation and windows run along it (the paper
  works on images, with 2-D neighbours and patches).
- PatchMatch's sequential scan is replaced by a parallel jump-flood propagation from the queries
  at distances 1, 2, 4, ... (before the query in odd iterations, after it in even ones, as the scan
  alternates), which spreads a good offset along the sequence in one iteration; each iteration
  searches at random first, so that what it finds spreads in the same iteration.
- Random search stops at the window's radius (the window covers what is closer).
- The random draws are integer Weyl sequences, $u_i = ((a i + c) \bmod p)/p$, whose $a$ and $c$ are
  seeded buffers, so eval mode is deterministic and any length works.
"""

import math

import torch
import torch.nn.functional as F
from einops import einsum, rearrange

from zoo.core.checks import check_qkv, positive_int, refuse_causal
from zoo.core.masks import neg_fill
from zoo.core.shell import MultiHead

PRIME = 2_147_483_647  # 2^31 - 1, the modulus of the Weyl sequences


def weyl(n: int, a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """`(n,)` quasi-random numbers in [0, 1): ((a i + c) mod p) / p for i = 0..n-1."""
    i = torch.arange(n, device=a.device)
    return ((a * i + c) % PRIME).double() / PRIME


def flat_rows(idx: torch.Tensor, n: int) -> torch.Tensor:
    """Indices `idx` `(b, h, m, c)` among the n keys of each head as row numbers of the keys
    flattened to `((b h n), d)`: `((b h m), c)`."""
    b, h = idx.shape[:2]
    return rearrange(idx + torch.arange(b * h, device=idx.device).reshape(b, h, 1, 1) * n,
                     "b h m c -> (b h m) c")


def real_at(mask: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Whether the keys `idx` `(b, h, n, c)` are real tokens of `mask` `(b, n)`: `(b, h, n, c)`."""
    b, h = idx.shape[:2]
    real = rearrange(mask, "b n -> b 1 n").expand(b, h, -1)
    return real.gather(2, rearrange(idx, "b h n c -> b h (n c)")).view_as(idx)


def scores_at(q: torch.Tensor, k: torch.Tensor, idx: torch.Tensor, block: int = 32768) -> torch.Tensor:
    """Scores `q_i . k_j` of each query against its own keys `j = idx[b, h, i, :]`.

    The keys are gathered in blocks of about `block` rows, so that each gathered block stays in
    cache instead of a full `(b, h, n, c, d)` copy going through memory.

    Args:
        q, k: `(b, h, n, d)`. idx: `(b, h, n, c)` key indices.

    Returns:
        `(b, h, n, c)`.
    """
    b, h, n, d = q.shape
    c = idx.shape[-1]
    rows = flat_rows(idx, n)  # ((b h n), c)
    q, k = (rearrange(t, "b h n d -> (b h n) d") for t in (q, k))
    step = max(block // c, 1)  # queries per block
    scores = []
    for s in range(0, max(b * h * n, 1), step):  # one (empty) block for an empty batch
        keys = rearrange(k.index_select(0, rows[s:s + step].flatten()), "(r c) d -> r c d", c=c)
        scores.append(einsum(q[s:s + step], keys, "r d, r c d -> r c"))
    return rearrange(torch.cat(scores), "(b h n) c -> b h n c", b=b, h=h, n=n)


@torch.no_grad()  # the match is an index: no gradient flows through the search
def patchmatch(q: torch.Tensor, k: torch.Tensor, draws: torch.Tensor,
               mask: torch.Tensor | None = None, *, iterations: int,
               min_radius: float = 1.0) -> torch.Tensor:
    """PatchMatch for the best key of every query.

    Args:
        q, k: `(b, h, n, d)`. draws: `(iterations + 1, levels, 2)` integer Weyl parameters.
        mask: `(b, n)`, True = real token; padded keys never win, padded queries pass nothing on.
        iterations: propagation and random-search rounds.
        min_radius: the smallest random-search radius (radii halve from n down to it).

    Returns:
        `m` `(b, h, n)`: key indices, each scoring at least as high as every candidate it met.
    """
    b, h, n, d = q.shape
    q, k = q.contiguous(), k.contiguous()  # every scoring pass reads them as rows
    levels = max(math.ceil(math.log2(n)), 1)
    searches = max(math.ceil(math.log2(n / min_radius)), 1)  # random-search radii n / 2^level
    radii = n / 2 ** torch.arange(searches, dtype=torch.float64, device=q.device)
    pos = torch.arange(n, device=q.device)

    def score(idx):  # (b h n c): q_i . k_idx(i), the most negative value where the key is padded
        s = scores_at(q, k, idx)
        return s if mask is None else s.masked_fill(~real_at(mask, idx), neg_fill(s.dtype))

    m = (weyl(n, *draws[0, 0]) * n).long().clamp(max=n - 1).expand(b, h, n)  # random start
    best = rearrange(score(rearrange(m, "b h n -> b h n 1")), "b h n 1 -> b h n")

    def consider(candidates):  # (b h n c): keep the best of the current match and the candidates
        nonlocal m, best
        candidates = candidates.clamp(0, n - 1)
        s = score(candidates)
        pick = s.argmax(dim=-1, keepdim=True)  # the first best candidate
        top, found = (rearrange(t.gather(-1, pick), "b h n 1 -> b h n") for t in (s, candidates))
        better = top > best  # a tie keeps the current match
        m, best = torch.where(better, found, m), torch.where(better, top, best)

    for t in range(1, iterations + 1):
        # Random search: one candidate at each radius n, n/2, n/4, ..., all around the match v0
        # the search starts from (u_l = v0 + radius_l R_l), scored together.
        u = torch.stack([weyl(n, *draws[t, level]) for level in range(searches)], dim=-1) * 2 - 1
        consider(rearrange(m, "b h n -> b h n 1") + (u * radii).round().long())  # (b h n levels)
        # Propagation from the queries delta = 1, 2, 4, ... before (odd iterations) or after
        # (even ones), as PatchMatch alternates its scan direction: their match, shifted by delta.
        for level in range(levels):
            shift = 2 ** level if t % 2 else -(2 ** level)
            src = pos - shift  # (n)
            passed = (src >= 0) & (src < n)
            src = src.clamp(0, n - 1)
            if mask is not None:  # a padded query passes nothing on
                passed = passed & rearrange(mask[:, src], "b n -> b 1 n")
            consider(rearrange(torch.where(passed, m[..., src] + shift, m), "b h n -> b h n 1"))
    return m


def scram_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, draws: torch.Tensor,
                    mask: torch.Tensor | None = None, *, window: int, iterations: int,
                    scale: float | None = None) -> torch.Tensor:
    """Attention to the window of keys around each query's PatchMatch argmax.

    Args:
        q, k: `(b, h, n, d)`. v: `(b, h, n, e)`. draws: Weyl parameters (see `patchmatch`).
        mask: `(b, n)`, True = real token. window: keys attended per query.
        iterations: PatchMatch iterations.

    Returns:
        `(b, h, n, e)`.
    """
    check_qkv(q, k, v, mask, name="scram_attention")
    b, h, n, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    w = min(window, n)
    q, k = q.contiguous(), k.contiguous()  # every scoring pass reads them as rows
    # The window covers the match's neighbourhood: random search stops at its radius.
    m = patchmatch(q, k, draws, mask, iterations=iterations, min_radius=max(w / 2, 1))
    start = (m - w // 2).clamp(0, n - w)
    idx = rearrange(start, "b h n -> b h n 1") + torch.arange(w, device=q.device)  # (b h n w)
    scores = scores_at(q, k, idx) * scale  # (b h n w)
    if mask is None:
        attn = scores.softmax(dim=-1)
    else:  # padded keys get no weight; a query whose window is all padding gets zeros
        keep = real_at(mask, idx)  # (b h n w)
        attn = scores.masked_fill(~keep, neg_fill(scores.dtype)).softmax(dim=-1) * keep
    # O_i = sum_j attn_ij v_j over the window: embedding_bag sums each query's w value rows,
    # weighted by attn, without gathering a (b, h, n, w, e) copy of them.
    out = F.embedding_bag(flat_rows(idx, n), rearrange(v, "b h n e -> (b h n) e"),
                          per_sample_weights=rearrange(attn, "b h n w -> (b h n) w"), mode="sum")
    return rearrange(out, "(b h n) e -> b h n e", b=b, h=h, n=n)


class Scram(MultiHead):
    """SCRAM attention. `(b, n, dim) -> (b, n, dim)`. Not causal.

    Args:
        window: keys attended around each query's match.
        iterations: PatchMatch iterations (propagation and random search).
        seed: seeds the Weyl parameters of the random draws (a buffer).
    """

    max_levels = 63  # enough random-search levels for any length

    def __init__(self, dim: int, *, heads: int = 8, dim_head: int | None = None,
                 causal: bool = False, window: int = 16, iterations: int = 1, seed: int = 0):
        refuse_causal(type(self).__name__, causal)
        super().__init__(dim, heads=heads, dim_head=dim_head, causal=False)
        self.window = positive_int(window, "window")
        self.iterations = positive_int(iterations, "iterations")
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("draws", torch.randint(1, PRIME, (iterations + 1, self.max_levels, 2),
                                                    generator=g))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        return scram_attention(q, k, v, self.draws, mask, window=self.window,
                               iterations=self.iterations)
