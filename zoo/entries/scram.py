r"""SCRAM: Spatially Coherent Randomized Attention Maps.

Attention maps are sparse (most weight sits near the best-matching key) and spatially coherent
(neighbouring queries match neighbouring keys). So first find, for every query, its most
compatible key with PatchMatch, a randomized correspondence search: start from random matches,
then repeatedly try the matches of neighbouring queries shifted by their offset (propagation) and
random keys at exponentially shrinking distances around the current match (random search), keeping
whichever scores higher. Then attend only to the window of keys around that argmax. With
$O(\log n)$ candidates per query and iteration, the cost is $O(n \log n)$.

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
from einops import einsum, rearrange

from zoo.checks import check_qkv, positive_int, refuse_causal
from zoo.masks import neg_fill
from zoo.shell import MultiHead
from zoo.sorting import chunk_softmax, gather_sorted

PRIME = 2_147_483_647  # 2^31 - 1, the modulus of the Weyl sequences


def weyl(n: int, a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """`(n,)` quasi-random numbers in [0, 1): ((a i + c) mod p) / p for i = 0..n-1."""
    i = torch.arange(n, device=a.device)
    return ((a * i + c) % PRIME).double() / PRIME


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
    levels = max(math.ceil(math.log2(n)), 1)
    pos = torch.arange(n, device=q.device)
    real = torch.ones(b, 1, n, dtype=torch.bool, device=q.device) if mask is None else \
        rearrange(mask, "b n -> b 1 n")

    def score(idx):  # q_i . k_idx(i), the most negative value where the key is padded
        s = (q * gather_sorted(k, idx)).sum(dim=-1)
        if mask is None:
            return s
        return s.masked_fill(~gather_sorted(real.expand(b, h, n), idx), neg_fill(s.dtype))

    m = (weyl(n, *draws[0, 0]) * n).long().clamp(max=n - 1).expand(b, h, n)  # random start
    best = score(m)

    def consider(candidate):
        nonlocal m, best
        candidate = candidate.clamp(0, n - 1)
        s = score(candidate)
        better = s > best
        m, best = torch.where(better, candidate, m), torch.where(better, s, best)

    for t in range(1, iterations + 1):
        for level in range(max(math.ceil(math.log2(n / min_radius)), 1)):
            u = weyl(n, *draws[t, level]) * 2 - 1  # random search at radius n / 2^level
            consider(m + (u * n / 2 ** level).round().long())
        # Propagation from the queries delta = 1, 2, 4, ... before (odd iterations) or after
        # (even ones), as PatchMatch alternates its scan direction: their match, shifted by delta.
        for level in range(levels):
            shift = 2 ** level if t % 2 else -(2 ** level)
            src = pos - shift
            ok = (src >= 0) & (src < n)
            src = src.clamp(0, n - 1).expand(b, h, n)
            passed = ok & real.expand(b, h, n).gather(2, src)
            consider(torch.where(passed, m.gather(2, src) + shift, m))
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
    # The window covers the match's neighbourhood: random search stops at its radius.
    m = patchmatch(q, k, draws, mask, iterations=iterations, min_radius=max(w / 2, 1))
    start = (m - w // 2).clamp(0, n - w)
    idx = rearrange(start, "b h n -> b h n 1") + torch.arange(w, device=q.device)
    flat = rearrange(idx, "b h n w -> b h (n w)")
    kw, vw = (rearrange(gather_sorted(t, flat), "b h (n w) d -> b h n 1 w d", w=w) for t in (k, v))
    keep = torch.ones(1, dtype=torch.bool, device=q.device) if mask is None else rearrange(
        gather_sorted(rearrange(mask, "b n -> b 1 n").expand(b, h, n), flat),
        "b h (n w) -> b h n 1 w", w=w)
    scores = einsum(q, kw, "b h n d, b h n i w d -> b h n i w") * scale  # i = 1: one query a row
    out, _ = chunk_softmax(scores, keep, rearrange(vw, "b h n 1 w e -> b h n w e"))
    return rearrange(out, "b h n 1 e -> b h n e")


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
