r"""Reformer: The Efficient Transformer.

Queries and keys share one projection (keys are the unit-normalised queries), so a random
rotation can hash both into the same angular buckets: $h(x) = \arg\max[xR;\,-xR]$. Tokens are
sorted by bucket (then position) and cut into equal chunks; each chunk attends to itself and to the
chunk before it, and only to keys of its own bucket. Several independent hash rounds are run and
merged by their softmax normalisers, with pairs met in several rounds counted once. A token never
attends to itself unless it has nothing else to attend to, since with shared QK its own key would
dominate.

$$ o_i = \sum_r e^{z^{(r)}_i - z_i} \sum_{j \in \tilde P^{(r)}_i}
   e^{\,s\, q_i^\top k_j - m_{ij} - z^{(r)}_i}\, v_j, \qquad
   m_{ij} = \begin{cases} \infty & h^{(r)}(q_i) \ne h^{(r)}(k_j) \\ 10^5 & j = i \\
   \log N_{ij} & \text{else} \end{cases} $$

($z^{(r)}_i$ is the log normaliser of round $r$, $z_i$ of all rounds, $N_{ij}$ the number of rounds
in which $i$ and $j$ share a bucket, $\tilde P^{(r)}_i$ the query's chunk and the one before it.)

`reformer_attention_reference` is that equation: the hash as written, keys $q/\|q\|$, and the
dense round-by-round form of the chunked attention (`zoo.core.sorting.bucket_attention_reference`).
The fast path `reformer_attention`, tested equal, sorts and gathers (`zoo.core.sorting`, shared
with `routing_transformer`, `smyrf` and `sinkhorn_attention`).

Deviations from the paper:
- `attend(q, k, v)` hashes `q` and `k` separately and excludes position `i` from row `i`; the layer
  passes `k = None`, the paper's shared QK: the keys are `q / |q|`, hashed once (the argmax does
  not see the scale) and gathered once with the queries, each score scaled by its key's inverse
  norm (tests/entries/test_reformer.py checks it against `k = q / |q|` passed explicitly).
- Causal: a query sees the same-bucket keys among the `chunk_size` sorted slots before it (not the
  whole previous chunk), so which keys it sees never depends on later tokens.
- The scores are $q_i^\top k_j / \sqrt{d}$ with $k_j = q_j / \|q_j\|$, as the paper's formulas
  write them. transformers' `ReformerModel` normalises the keys the same way and does not divide
  by $\sqrt d$, a temperature $\sqrt d$ away from ours: `scale=1.0` selects it (tested equal,
  `tests/peers/`). Its chunks also read the keys of other buckets that share them; ours read
  only their own bucket's (equal to it once its mask refuses those keys, `tests/peers/`).
- Self-exclusion uses the dtype's half-most-negative value instead of $10^5$, so it holds at any
  score scale. No reversible layers or chunked feed-forward (they are not attention).
"""

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from torch import nn

from zoo.core.checks import check_dtype, check_qkv, check_sequence, positive_int
from zoo.core.shell import MultiHead
from zoo.core.sorting import bucket_attention, bucket_attention_reference


def reformer_attention_reference(q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor,
                                 rotations: torch.Tensor, mask: torch.Tensor | None = None, *,
                                 chunk_size: int, causal: bool = False,
                                 scale: float | None = None) -> torch.Tensor:
    """`reformer_attention` as the paper writes it: k None means the keys are q / |q|; both are
    hashed by h(x) = argmax[xR; -xR]; attention within buckets over sorted chunks, densely."""
    check_qkv(q, q if k is None else k, v, mask, name="reformer_attention")
    k = F.normalize(q, dim=-1) if k is None else k
    return bucket_attention_reference(q, k, v, lsh_buckets_reference(q, rotations),
                                      lsh_buckets_reference(k, rotations), mask, chunk_size=chunk_size,
                                      causal=causal, exclude_self=True, scale=scale)


def lsh_buckets_reference(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """`lsh_buckets` as written, h(x) = argmax[xR; -xR], one round per rotation: `(b, h, n, r)`."""
    rotated = einsum(x, rotations, "b h n d, r d f -> b h n r f")
    if rotated.shape[-1] == 0:  # no rotation columns: one bucket
        return x.new_zeros(*x.shape[:3], rotations.shape[0], dtype=torch.long)
    return torch.cat([rotated, -rotated], dim=-1).argmax(dim=-1)


def lsh_buckets(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Angular LSH, $h(x) = \\arg\\max[xR; -xR]$: x `(b, h, n, d)`, rotations `(r, d, nb/2)` ->
    buckets `(b, h, n, r)` in `[0, nb)`; one bucket when there are no rotation columns."""
    r, _, f = rotations.shape
    if f == 0:
        return x.new_zeros(*x.shape[:3], r, dtype=torch.long)
    rotated = rearrange(x @ rearrange(rotations, "r d f -> d (r f)"), "... (r f) -> ... r f", r=r)
    # argmax over [xR; -xR] without building it: the largest entry, or the most negative one
    high, high_at = rotated.max(dim=-1)  # (b h n r)
    low, low_at = rotated.min(dim=-1)
    return torch.where(high >= -low, high_at, low_at + f)


def reformer_attention(q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor,
                       rotations: torch.Tensor, mask: torch.Tensor | None = None, *, chunk_size: int,
                       causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """Multi-round LSH attention (Sec. 2): hash, sort, attend in chunks, merge rounds.

    Args:
        q, k: `(b, h, n, d)`; k None: shared QK, the keys are the unit-normalised queries.
        v: `(b, h, n, e)`. rotations: `(r, d, nb/2)`, one per hash round.
        mask: `(b, n)`, True = real token. chunk_size: sorted chunk length `c`.
        causal: query `i` sees keys `j <= i` only.

    Returns:
        `(b, h, n, e)`.
    """
    check_qkv(q, q if k is None else k, v, mask, name="reformer_attention")
    buckets = lsh_buckets(q, rotations)
    if k is None:  # q / |q| hashes as q (the argmax does not see the scale); keys as scaled queries
        inverse_norm = 1 / q.norm(dim=-1).clamp(min=1e-12)  # (b h n), as F.normalize
        return bucket_attention(q, q, v, buckets, buckets, mask, chunk_size=chunk_size,
                                causal=causal, exclude_self=True, scale=scale, key_scale=inverse_norm)
    return bucket_attention(q, k, v, buckets, lsh_buckets(k, rotations), mask,
                            chunk_size=chunk_size, causal=causal, exclude_self=True, scale=scale)


class Reformer(MultiHead):
    """LSH attention with shared queries and keys. `(b, n, dim) -> (b, n, dim)`.

    Args:
        n_hashes: hash rounds (more rounds, closer to softmax attention).
        n_buckets: buckets per round (1, or even).
        chunk_size: length of the sorted chunks.
        seed: seeds the random rotations (a buffer).
        scale: the factor of the scores `q . k / |k|`; None: `1 / sqrt(dim_head)`, the paper's
            scaled dot product. `scale=1.0` is transformers' `LSHSelfAttention` convention (keys
            normalised to unit length, no further scaling), tested equal to it.
    """

    def __init__(self, dim: int, *, heads: int = 8, dim_head: int | None = None,
                 causal: bool = False, n_hashes: int = 2, n_buckets: int = 64,
                 chunk_size: int = 64, seed: int = 0, scale: float | None = None):
        super().__init__(dim, heads=heads, dim_head=dim_head, causal=causal)
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                                  or not scale > 0):
            raise ValueError(f"scale must be a positive number or None, got {scale!r}")
        self.scale = None if scale is None else float(scale)
        positive_int(n_hashes, "n_hashes")
        self.chunk_size = positive_int(chunk_size, "chunk_size")
        if positive_int(n_buckets, "n_buckets") > 1 and n_buckets % 2:
            raise ValueError(f"n_buckets must be 1 or even (angular LSH), got {n_buckets}")
        del self.to_qkv  # shared QK: one projection for queries (and keys), one for values
        self.to_qv = nn.Linear(dim, 2 * heads * self.dim_head, bias=False)
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("rotations", torch.randn(n_hashes, self.dim_head, n_buckets // 2,
                                                      generator=g))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        check_sequence(x, self.dim, mask, name=type(self).__name__)
        check_dtype(x, self, name=type(self).__name__)
        q, v = map(self.split_heads, self.to_qv(x).chunk(2, dim=-1))
        return self.to_out(self.merge_heads(self.attend(q, None, v, mask)))  # keys: q / |q|

    def attend(self, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        return reformer_attention(q, k, v, self.rotations.to(q.dtype), mask,
                                  chunk_size=self.chunk_size, causal=self.causal, scale=self.scale)
