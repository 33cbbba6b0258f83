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

The sort-chunk-attend-scatter helpers here are shared with `routing_transformer`, `smyrf`,
`sinkhorn_attention` and `scram`.

Deviations from the paper:
- `attend(q, k, v)` hashes `q` and `k` separately and excludes position `i` from row `i`; the layer
  passes `k = q / |q|`, where both hashes agree (the paper's shared-QK setting).
- Causal: a query sees the same-bucket keys among the `chunk_size` sorted slots before it (not the
  whole previous chunk), so which keys it sees never depends on later tokens.
- Self-exclusion uses the dtype's half-most-negative value instead of $10^5$, so it holds at any
  score scale. No reversible layers or chunked feed-forward (they are not attention).
"""

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from torch import nn

from zoo.checks import check_qkv, check_sequence, positive_int
from zoo.masks import neg_fill, pad_mask, pad_to_multiple
from zoo.shell import MultiHead

# --- sort into chunks, attend, scatter back (also used by routing, smyrf, sinkhorn, scram) ------


def gather_sorted(t: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Rows of `t` `(b, h, n, ...)` picked along n by `order` `(b, h, m)`: `(b, h, m, ...)`."""
    b, h, n = t.shape[:3]
    offset = torch.arange(b * h, device=t.device).reshape(b, h, 1) * n
    rows = t.reshape(b * h * n, -1).index_select(0, (order + offset).flatten())
    return rows.reshape(*order.shape, *t.shape[3:])


def unsort(t: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Inverse of `gather_sorted` for a permutation: row `s` of `t` goes back to `order[s]`."""
    b, h, n = t.shape[:3]
    offset = torch.arange(b * h, device=t.device).reshape(b, h, 1) * n
    flat = t.reshape(b * h * n, -1)
    return flat.index_copy(0, (order + offset).flatten(), flat).reshape(t.shape)


def to_chunks(t: torch.Tensor, order: torch.Tensor, chunk: int) -> torch.Tensor:
    """Sort `t` `(b, h, n, ...)` by `order` and cut it into chunks: `(b, h, nc, c, ...)`."""
    return rearrange(gather_sorted(t, order), "b h (nc c) ... -> b h nc c ...", c=chunk)


def with_previous(t: torch.Tensor, chunk: int, fill) -> torch.Tensor:
    """Sorted `t` `(b, h, n, ...)` cut into chunks, each preceded by the chunk before it:
    `(b, h, nc, 2c, ...)`. The first chunk has no predecessor; its slots are `fill`."""
    front = torch.full_like(t[:, :, :chunk], fill)
    return torch.cat([front, t], dim=2).unfold(2, 2 * chunk, chunk).movedim(-1, 3)


def chunk_softmax(scores: torch.Tensor, keep: torch.Tensor, v: torch.Tensor):
    """Masked softmax attention inside chunks.

    Args:
        scores: `(b, h, nc, i, j)`. keep: bool, broadcastable to scores. v: `(b, h, nc, j, e)`.

    Returns:
        `(out, lse)`: `(b, h, nc, i, e)` and the log normaliser `(b, h, nc, i)`. A row with no key
        kept gives zeros, and its normaliser is about the dtype's most negative value.
    """
    scores = scores.masked_fill(~keep, neg_fill(scores.dtype))
    attn = scores.softmax(dim=-1) * keep  # (b h nc i j)
    return einsum(attn, v, "b h nc i j, b h nc j e -> b h nc i e"), scores.logsumexp(dim=-1)


def combine_rounds(outs: torch.Tensor, lses: torch.Tensor) -> torch.Tensor:
    """Merge rounds `(r, b, h, n, e)` by their log normalisers `(r, b, h, n)`."""
    return einsum(lses.softmax(dim=0), outs, "r b h n, r b h n e -> b h n e")


def sort_order(groups: torch.Tensor) -> torch.Tensor:
    """Indices sorting `(..., n)` integer groups by (group, position)."""
    n = groups.shape[-1]
    return (groups * n + torch.arange(n, device=groups.device)).argsort(dim=-1)


def bucket_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_buckets: torch.Tensor,
                     k_buckets: torch.Tensor, mask: torch.Tensor | None = None, *, chunk_size: int,
                     causal: bool = False, exclude_self: bool = False,
                     scale: float | None = None) -> torch.Tensor:
    """Attention within buckets, over sorted chunks, merged over rounds.

    In each round queries and keys are sorted by (bucket, position) and cut into chunks of
    `chunk_size`; a query chunk attends to the key chunk at its place and the one before, only to
    keys of its own bucket. Rounds merge by their log normalisers, a pair met in N rounds counted
    once.

    Args:
        q, k: `(b, h, n, d)`. v: `(b, h, n, e)`. q_buckets, k_buckets: `(b, h, n, r)` integers.
        mask: `(b, n)`, True = real token. causal: query `i` sees keys `j <= i` only.
        exclude_self: row `i` skips key `i` unless nothing else is left (shared QK).

    Returns:
        `(b, h, n, e)`.
    """
    b, h, n, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    c = min(chunk_size, n)
    (q, pad), (k, _), (v, _), (qb, _), (kb, _) = (pad_to_multiple(t, c, dim=2)
                                                  for t in (q, k, v, q_buckets, k_buckets))
    mask = pad_mask(mask, b, n, pad, q.device)
    real = torch.ones(b, h, n + pad, dtype=torch.bool, device=q.device) if mask is None else \
        rearrange(mask, "b n -> b 1 n").expand(b, h, -1)
    # Padded tokens get a bucket past the last, so they sort behind every real token.
    sentinel = int(max(qb.max(), kb.max())) + 1
    qb, kb = (t.masked_fill(~real[..., None], sentinel) for t in (qb, kb))  # (b h n r)
    rounds = qb.shape[-1]
    slot = torch.arange(2 * c, device=q.device)
    window = slot >= rearrange(torch.arange(c, device=q.device), "i -> i 1")  # the c slots before
    log_count = torch.arange(rounds + 1, dtype=q.dtype, device=q.device).clamp(min=1).log()
    outs, lses = [], []
    for r in range(rounds):
        q_order, k_order = sort_order(qb[..., r]), sort_order(kb[..., r])
        qc, qbc = to_chunks(q, q_order, c), to_chunks(qb, q_order, c)  # (b h nc c d), (b h nc c r)
        kc, vc, kbc, kreal = (with_previous(gather_sorted(t, k_order), c, fill)  # (b h nc 2c ...)
                              for t, fill in ((k, 0.0), (v, 0.0), (kb, -1), (real, False)))
        qpos = rearrange(q_order, "b h (nc c) -> b h nc c 1", c=c)
        kpos = rearrange(with_previous(k_order, c, -1), "b h nc j -> b h nc 1 j")
        shared = [rearrange(qbc[..., s], "b h nc i -> b h nc i 1") ==
                  rearrange(kbc[..., s], "b h nc j -> b h nc 1 j") for s in range(rounds)]
        keep = shared[r] & rearrange(kreal, "b h nc j -> b h nc 1 j")  # (b h nc i j)
        if causal:
            keep = keep & (kpos <= qpos) & window
        scores = einsum(qc, kc, "b h nc i d, b h nc j d -> b h nc i j") * scale
        if rounds > 1:  # a pair met in N rounds is counted once over the rounds: minus log N
            scores -= log_count[sum(t.to(torch.uint8) for t in shared).long()]
        if exclude_self:
            scores.masked_fill_((kpos == qpos) & keep, neg_fill(scores.dtype) / 2)
        out, lse = chunk_softmax(scores, keep, vc)
        outs.append(unsort(rearrange(out, "b h nc c e -> b h (nc c) e"), q_order))
        lses.append(unsort(rearrange(lse, "b h nc c -> b h (nc c)"), q_order))
    return combine_rounds(torch.stack(outs), torch.stack(lses))[:, :, :n]


# --- Reformer -------------------------------------------------------------------------------------


def lsh_buckets(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Angular LSH, $h(x) = \\arg\\max[xR; -xR]$: x `(b, h, n, d)`, rotations `(r, d, nb/2)` ->
    buckets `(b, h, n, r)` in `[0, nb)`; one bucket when there are no rotation columns."""
    if rotations.shape[-1] == 0:
        return x.new_zeros(*x.shape[:3], rotations.shape[0], dtype=torch.long)
    rotated = einsum(x, rotations, "b h n d, r d f -> b h n r f")
    return torch.cat([rotated, -rotated], dim=-1).argmax(dim=-1)


def reformer_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rotations: torch.Tensor,
                       mask: torch.Tensor | None = None, *, chunk_size: int, causal: bool = False,
                       scale: float | None = None) -> torch.Tensor:
    """Multi-round LSH attention (Sec. 2): hash, sort, attend in chunks, merge rounds.

    Args:
        q, k: `(b, h, n, d)`. v: `(b, h, n, e)`. rotations: `(r, d, nb/2)`, one per hash round.
        mask: `(b, n)`, True = real token. chunk_size: sorted chunk length `c`.
        causal: query `i` sees keys `j <= i` only.

    Returns:
        `(b, h, n, e)`.
    """
    check_qkv(q, k, v, mask, name="reformer_attention")
    return bucket_attention(q, k, v, lsh_buckets(q, rotations), lsh_buckets(k, rotations), mask,
                            chunk_size=chunk_size, causal=causal, exclude_self=True, scale=scale)


class Reformer(MultiHead):
    """LSH attention with shared queries and keys. `(b, n, dim) -> (b, n, dim)`.

    Args:
        n_hashes: hash rounds (more rounds, closer to softmax attention).
        n_buckets: buckets per round (1, or even).
        chunk_size: length of the sorted chunks.
        seed: seeds the random rotations (a buffer).
    """

    def __init__(self, dim: int, *, heads: int = 8, dim_head: int | None = None,
                 causal: bool = False, n_hashes: int = 2, n_buckets: int = 64,
                 chunk_size: int = 64, seed: int = 0):
        super().__init__(dim, heads=heads, dim_head=dim_head, causal=causal)
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
        q, v = map(self.split_heads, self.to_qv(x).chunk(2, dim=-1))
        return self.to_out(self.merge_heads(self.attend(q, F.normalize(q, dim=-1), v, mask)))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        return reformer_attention(q, k, v, self.rotations.to(q.dtype), mask,
                                  chunk_size=self.chunk_size, causal=self.causal)
