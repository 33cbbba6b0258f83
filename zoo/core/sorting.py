"""Sort into chunks, attend, scatter back: the machinery of the hashing, clustering and sorting
entries (reformer, routing-transformer, smyrf, sinkhorn-attention).

Tokens are ordered by a group id (a hash bucket, a cluster) and position, cut into equal chunks,
attend inside a chunk (and the chunk before it), and go back to their places; several rounds merge
by their softmax normalisers. `bucket_attention_reference` states that densely: each token's
place in the sorted order, the `(i, j)` pairs that share a bucket and sit in neighbouring chunks,
a softmax over them per round, and the merge. `bucket_attention` is the fast path, tested equal.

On CPU at long lengths the time goes to memory traffic, so: row gathers use `index_select` on
flattened rows (several times faster than `gather` with an expanded index); the chunk windows are
overlapping views of one sorted copy; the score tensor is masked and exponentiated in place; the
softmax works in log2 units (`exp2` is several times faster than `exp`, and an exponent of -inf
costs it nothing); and `bucket_attention` takes one head at a time, so that the large temporaries
reuse memory instead of touching fresh pages.

Every (batch, head) row keeps its windows to itself: its first chunk looks back at filled rows of
its own (`sorted_rows` with a front), never at the row before, and the queries, keys and values
of padded tokens are filled with zeros first, so that nothing there (NaN, inf) reaches another row
or a real output, forward or backward. That costs one placeholder window per row (1/nc more work).

The file runs past 250 lines because it holds both forms: the dense reference and its helpers,
then the gathers, windows and log2-unit softmax of the fast path.
"""

from __future__ import annotations

import math

import torch
from einops import einsum, rearrange

from zoo.core.masks import neg_fill, pad_mask, pad_to_multiple

LOG2E = 1 / math.log(2)  # natural scores times LOG2E are scores in log2 units: e^s = 2^(s LOG2E)


def bucket_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               q_buckets: torch.Tensor, k_buckets: torch.Tensor,
                               mask: torch.Tensor | None = None, *, chunk_size: int,
                               causal: bool = False, exclude_self: bool = False,
                               scale: float | None = None,
                               key_scale: torch.Tensor | None = None) -> torch.Tensor:
    """`bucket_attention` written out densely, round by round (quadratic in the length).

    In round r, query i at place p_i of the queries sorted by (bucket, position), padded tokens
    last, reads key j at place s_j of the keys sorted alike when they share the bucket and
    chunk(s_j) is chunk(p_i) or the one before it (causal: s_j >= p_i - c and j <= i). The score
    of a pair is s q_i.k_j - log N_ij, N_ij the rounds in which i and j share a bucket; with
    `exclude_self`, the own key only counts when nothing else is left. Rounds merge with weights
    softmax_r(z_r), z_r the round's log normaliser.
    """
    b, h, n, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    c = min(chunk_size, n)
    real = torch.ones(b, n, dtype=torch.bool, device=q.device) if mask is None else mask
    real_j = rearrange(real, "b j -> b 1 1 j")
    keys = k if key_scale is None else k * key_scale.unsqueeze(-1)
    scores = einsum(q, keys, "b h i d, b h j d -> b h i j") * scale
    shared = rearrange(q_buckets, "b h i r -> b h i 1 r") == rearrange(k_buckets, "b h j r -> b h 1 j r")
    scores = scores - shared.sum(-1).clamp(min=1).to(q.dtype).log()  # - log N_ij
    i = rearrange(torch.arange(n, device=q.device), "i -> i 1")
    j = rearrange(torch.arange(n, device=q.device), "j -> 1 j")
    if exclude_self:
        scores = scores.masked_fill(i == j, neg_fill(q.dtype) / 2)
    behind = rearrange(~real, "b n -> b 1 n")  # padded tokens sort after every real one
    outs, lses = [], []
    for r in range(q_buckets.shape[-1]):
        last = torch.iinfo(q_buckets.dtype).max  # a bucket after every real one
        p, s = (rearrange(stable_places(t[..., r].masked_fill(behind, last)), pattern)
                for t, pattern in ((q_buckets, "b h i -> b h i 1"), (k_buckets, "b h j -> b h 1 j")))
        near = (s // c == p // c) | (s // c == p // c - 1)  # own chunk, or the one before
        if causal:
            near = near & (s >= p - c) & (j <= i)
        out, lse = softmax_with_lse(scores, shared[..., r] & real_j & near, v)
        outs.append(out)
        lses.append(lse)
    weights = torch.stack(lses).softmax(dim=0)  # (r b h i)
    return einsum(weights, torch.stack(outs), "r b h i, r b h i e -> b h i e")


def stable_places(key: torch.Tensor) -> torch.Tensor:
    """The place of each element of `key` `(..., n)` in a stable ascending sort: how many come
    before it, by value and then by position. Dense, `(..., n, n)` comparisons."""
    n = key.shape[-1]
    pos = torch.arange(n, device=key.device)
    a, b = key.unsqueeze(-1), key.unsqueeze(-2)  # (... i 1): the element, (... 1 j): the others
    before = (b < a) | ((b == a) & (pos < rearrange(pos, "i -> i 1")))
    return before.sum(-1)


def softmax_with_lse(scores: torch.Tensor, allowed: torch.Tensor,
                     v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention over the allowed keys and its log normaliser: `(out, lse)`, `(..., i, e)`
    and `(..., i)`. A row with no allowed key gives zeros and the dtype's most negative value."""
    scores = scores.masked_fill(~allowed, neg_fill(scores.dtype))
    some = allowed.any(-1)
    out = torch.where(some.unsqueeze(-1), scores.softmax(dim=-1) @ v, 0.0)
    return out, torch.where(some, scores.logsumexp(dim=-1), neg_fill(scores.dtype))


def storage_rows(t: torch.Tensor, order: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`t` `(b, h, n, ...)` as a matrix of rows `(R, f)` over its storage (f the trailing size),
    and the row of `t[b, h, order[b, h, s]]` for each `(b, h, s)` of `order`. No copy when each
    trailing block is contiguous and starts at a multiple of f: heads split off a projection,
    an expanded mask."""
    b, h, n = t.shape[:3]
    f = math.prod(t.shape[3:])
    if torch.compiler.is_compiling():
        # Compiled graphs get a plain reshape (a copy when needed): inductor does not keep the
        # eager strides of intermediates, and an `as_strided` over them read the wrong memory
        # (NaN and wrong outputs in reformer and routing-transformer, found by zoo compat).
        start = (torch.arange(b, device=t.device).reshape(b, 1, 1) * (h * n)
                 + torch.arange(h, device=t.device).reshape(1, h, 1) * n)
        return t.reshape(b * h * n, f), start + order
    empty = t.numel() == 0  # an empty batch: no rows
    if empty or not (t[0, 0, 0].is_contiguous() and all(s % f == 0 for s in t.stride()[:3])):
        t = t.contiguous()
    sb, sh, sn = (s // max(f, 1) for s in t.stride()[:3])
    size = 0 if empty else (b - 1) * sb + (h - 1) * sh + (n - 1) * sn + 1
    rows = t.as_strided((size, f), (f, 1))
    start = (torch.arange(b, device=t.device).reshape(b, 1, 1) * sb
             + torch.arange(h, device=t.device).reshape(1, h, 1) * sh)  # (b h 1)
    return rows, start + order * sn


def gather_sorted(t: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Rows of `t` `(b, h, n, ...)` picked along n by `order` `(b, h, m)`: `(b, h, m, ...)`."""
    rows, index = storage_rows(t, order)
    return rows.index_select(0, index.flatten()).reshape(*order.shape, *t.shape[3:])


def inverse(order: torch.Tensor) -> torch.Tensor:
    """The inverse permutation of `order` `(..., n)` along its last axis."""
    places = torch.arange(order.shape[-1], device=order.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, places)


def unsort(t: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Inverse of `gather_sorted` for a permutation: row `s` of `t` goes back to `order[s]`."""
    return gather_sorted(t, inverse(order))


def to_chunks(t: torch.Tensor, order: torch.Tensor, chunk: int) -> torch.Tensor:
    """Sort `t` `(b, h, n, ...)` by `order` and cut it into chunks: `(b, h, nc, c, ...)`."""
    return rearrange(gather_sorted(t, order), "b h (nc c) ... -> b h nc c ...", c=chunk)


def sorted_rows(t: torch.Tensor, order: torch.Tensor, front: int = 0,
                fill: float = 0.0) -> torch.Tensor:
    """Rows of `t` `(b, h, n, ...)` taken along n in `order` `(b, h, n)`, flattened over `(b h)`:
    each `(b h)` row's sorted rows preceded by `front` rows set to `fill`, and `front` more such
    rows at the very end: `(b h (front + n) + front, ...)`. So `look_back` gives every chunk a
    predecessor in its own row (the filled rows, for the first chunk) and no window mixes rows."""
    b, h, n = order.shape
    rows, index = storage_rows(t, order)
    index = torch.cat([index[..., :front], index], dim=-1).flatten()  # the fronts: placeholders
    out = rows.index_select(0, torch.cat([index, index[:front]])).reshape(-1, *t.shape[3:])
    if front:
        out[:b * h * (front + n)].view(b * h, front + n, *t.shape[3:])[:, :front] = fill
        out[b * h * (front + n):] = fill
    return out


def look_back(rows: torch.Tensor, chunk: int) -> torch.Tensor:
    """Sorted rows `(c + m, ...)` (a chunk of front rows first) as windows `(m / c, 2c, ...)`, each
    chunk preceded by the chunk before it. A view: the windows overlap, nothing is copied. On the
    rows of `sorted_rows(..., front=c)`, window w of `(b h)` row R is chunk w of R (and the one
    before) for w < nc; window nc of each row (its last chunk and the next row's filled front) is
    a placeholder to be dropped."""
    if rows.shape[0] < 2 * chunk:  # an empty batch: no windows
        return rows.new_empty(0, 2 * chunk, *rows.shape[1:])
    if torch.compiler.is_compiling():  # the same windows as a copy: no overlapping view
        blocks = rows.reshape(-1, chunk, *rows.shape[1:])  # (m / c + 1, c, ...)
        return torch.cat([blocks[:-1], blocks[1:]], dim=1)
    return rows.unfold(0, 2 * chunk, chunk).movedim(-1, 1)


def softmax_attend(bits: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention over the last axis of the scores, given in log2 units (`LOG2E` times the
    natural scores), masked ones at -inf.

    Args:
        bits: `(..., i, j)`, overwritten (it becomes the unnormalised weights). v: `(..., j, e)`.

    Returns:
        `(out, lse)`: `(..., i, e)` and the natural log normaliser `(..., i, 1)`. A row with every
        score masked gives zeros, and its normaliser is about the dtype's most negative value.
    """
    # The result does not depend on the shift `top`; an empty row has top -inf, clamped.
    top = bits.amax(dim=-1, keepdim=True).detach().clamp_(min=neg_fill(bits.dtype))
    weights = bits.sub_(top).exp2_()  # (... i j)
    total = weights.sum(dim=-1, keepdim=True).clamp(min=1)  # >= 1 (the top weight is 1) unless empty
    return (weights @ v).div_(total), (top + total.log2()) / LOG2E


def chunk_softmax(scores: torch.Tensor, keep: torch.Tensor | None, v: torch.Tensor):
    """Masked softmax attention inside chunks.

    Args:
        scores: `(b, h, nc, i, j)`, overwritten. keep: bool, broadcastable to scores (None: all).
        v: `(b, h, nc, j, e)`.

    Returns:
        `(out, lse)`: `(b, h, nc, i, e)` and the log normaliser `(b, h, nc, i)`. A row with no key
        kept gives zeros, and its normaliser is about the dtype's most negative value.
    """
    bits = scores.mul_(LOG2E)
    if keep is not None:
        bits.masked_fill_(~keep, -math.inf)
    out, lse = softmax_attend(bits, v)
    return out, lse.squeeze(-1)


def combine_rounds(outs, lses) -> torch.Tensor:
    """Merge rounds `(r, b, h, n, e)` by their log normalisers `(r, b, h, n)` (or lists of r)."""
    weights = torch.stack(tuple(lses)).softmax(dim=0).unsqueeze(-1)  # (r b h n 1)
    merged = outs[0] * weights[0]
    for out, weight in zip(outs[1:], weights[1:], strict=True):
        merged.addcmul_(out, weight)
    return merged


def sort_order(groups: torch.Tensor) -> torch.Tensor:
    """Indices sorting `(..., n)` integer groups by (group, position)."""
    n = groups.shape[-1]
    return (groups * n + torch.arange(n, device=groups.device)).argsort(dim=-1)


def bucket_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_buckets: torch.Tensor,
                     k_buckets: torch.Tensor, mask: torch.Tensor | None = None, *, chunk_size: int,
                     causal: bool = False, exclude_self: bool = False, scale: float | None = None,
                     key_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Attention within buckets, over sorted chunks, merged over rounds.

    In each round queries and keys are sorted by (bucket, position) and cut into chunks of
    `chunk_size`; a query chunk attends to the key chunk at its place and the one before, only to
    keys of its own bucket. Rounds merge by their log normalisers, a pair met in N rounds counted
    once.

    Args:
        q, k: `(b, h, n, d)`. v: `(b, h, n, e)`. q_buckets, k_buckets: `(b, h, n, r)` integers.
        mask: `(b, n)`, True = real token. causal: query `i` sees keys `j <= i` only.
        exclude_self: row `i` skips key `i` unless nothing else is left (shared QK).
        key_scale: `(b, h, n)`; the keys are `k * key_scale`. With `k is q` (unit-normalised
            queries as keys: their inverse norms) one gather a round serves queries and keys.

    Returns:
        `(b, h, n, e)`, laid out in memory as `(b, n, h, e)`, so that merging the heads is a view.
    """
    # The heads are independent. Taken one at a time, the large temporaries of a head are freed
    # before the next head allocates its own: memory is reused, not fetched fresh from the system
    # (on CPU, first touching fresh memory costs about as much as a pass over it).
    heads = range(q.shape[1])
    q_heads = [q_buckets[:, i:i + 1] for i in heads]
    # shared buckets stay shared per head: the same slice is passed twice
    k_heads = q_heads if q_buckets is k_buckets else [k_buckets[:, i:i + 1] for i in heads]
    outs = [head_attention(q[:, i:i + 1], q[:, i:i + 1] if k is q else k[:, i:i + 1],
                           v[:, i:i + 1], q_heads[i], k_heads[i], mask,
                           chunk_size=chunk_size, causal=causal, exclude_self=exclude_self,
                           scale=scale, key_scale=None if key_scale is None else key_scale[:, i:i + 1])
            for i in heads]
    return rearrange(torch.stack([out[:, 0] for out in outs], dim=2), "b n h e -> b h n e")


def head_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_buckets: torch.Tensor,
                   k_buckets: torch.Tensor, mask: torch.Tensor | None = None, *, chunk_size: int,
                   causal: bool = False, exclude_self: bool = False, scale: float | None = None,
                   key_scale: torch.Tensor | None = None) -> torch.Tensor:
    """`bucket_attention` over the given heads together: `(b, h, n, e)`."""
    b, h, n, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    c = min(chunk_size, n)
    keys_are_queries = k is q
    # Shared QK is told by structure (the caller passes one bucket tensor twice), not by comparing
    # values: a value test (`torch.equal`) would break compiled and exported graphs.
    shared = q_buckets is k_buckets
    (q, pad), (k, _), (v, _), (qb, _), (kb, _) = (pad_to_multiple(t, c, dim=2)
                                                  for t in (q, k, v, q_buckets, k_buckets))
    k = q if keys_are_queries else k
    key_scale = None if key_scale is None else pad_to_multiple(key_scale, c, dim=2)[0]
    mask = pad_mask(mask, b, n, pad, q.device)
    rounds, nc = qb.shape[-1], (n + pad) // c
    if mask is not None:
        behind = rearrange(~mask, "b n -> b 1 n 1")
        # Zeros at padded tokens (a fill, not a product): whatever is there, NaN or inf, then
        # reaches no real output and no other row, forward or backward.
        q, v = q.masked_fill(behind, 0.0), v.masked_fill(behind, 0.0)
        k = q if keys_are_queries else k.masked_fill(behind, 0.0)
        key_scale = None if key_scale is None else key_scale.masked_fill(behind[..., 0], 0.0)
        # Padded tokens get a bucket past every real one (the largest that `sort_order` can
        # take), so they sort behind the real ones.
        sentinel = torch.iinfo(qb.dtype).max // (n + pad) - 1
        qb, kb = qb.masked_fill(behind, sentinel), kb.masked_fill(behind, sentinel)
    # The key slots carry their buckets, -1 (met by no query) for a padded key.
    k_codes = kb if mask is None else kb.masked_fill(behind, -1)  # (b h n r)
    # shared: one order a round, the own key on a diagonal
    one_gather = shared and keys_are_queries  # the sorted queries are the sorted keys
    positions = torch.arange(n + pad, device=q.device).expand(b, h, -1)
    outs, lses = [], []
    for r in range(rounds):
        q_order = sort_order(qb[..., r])
        k_order = q_order if shared else sort_order(kb[..., r])
        # Each (b h) row holds nc + 1 windows: its nc chunks with the chunk before (the first with
        # a filled front, which no query meets), and a placeholder, dropped at the end. So no
        # window reads another row: nothing there, not even inf, reaches this row.
        q_rows = sorted_rows(q, q_order, front=c)
        qc = rearrange(q_rows[c:], "(w i) d -> w i d", i=c)  # w = b h (nc + 1)
        keys = look_back(q_rows if one_gather else sorted_rows(k, k_order, front=c), c)  # (w j d)
        values = look_back(sorted_rows(v, k_order, front=c), c)
        factor = scale * LOG2E  # scores in log2 units (see softmax_attend)
        if key_scale is not None:  # (w 1 j)
            factor = factor * rearrange(look_back(sorted_rows(key_scale, k_order, front=c), c),
                                        "w j -> w 1 j")
        # query codes -2 and key codes -1 in the fronts: they meet nothing
        q_code = rearrange(sorted_rows(qb, q_order, front=c, fill=-2)[c:], "(w i) r -> w i 1 r", i=c)
        k_code = rearrange(look_back(sorted_rows(k_codes, k_order, front=c, fill=-1), c),
                           "w j r -> w 1 j r")
        # (w i j): i the chunk, j the slots of it and of the chunk before
        bits = (qc @ keys.transpose(1, 2)).mul_(factor)
        if rounds > 1:  # a pair met in N rounds is counted once over the rounds: minus log N
            others = [s for s in range(rounds) if s != r]  # N - 1: the other rounds that meet it
            extra = (q_code[..., others] == k_code[..., others]).sum(-1, dtype=bits.dtype)
            bits -= extra if rounds == 2 else extra.log1p_().mul_(LOG2E)  # log2 N (= N - 1 if N <= 2)
        if causal or (exclude_self and not shared):
            q_pos = rearrange(sorted_rows(positions, q_order, front=c)[c:], "(w i) -> w i 1", i=c)
            k_pos = rearrange(look_back(sorted_rows(positions, k_order, front=c), c), "w j -> w 1 j")
        if exclude_self:
            if shared:  # the query at sorted place p meets its own key in slot c + p mod c
                bits.diagonal(offset=c, dim1=1, dim2=2).fill_(neg_fill(bits.dtype) / 2)
            else:
                bits.masked_fill_(k_pos == q_pos, neg_fill(bits.dtype) / 2)
        blocked = q_code[..., r] != k_code[..., r]  # (w i j)
        if causal:  # only the c sorted slots before the query, and no later position
            window = torch.arange(2 * c, device=q.device) >= rearrange(
                torch.arange(c, device=q.device), "i -> i 1")
            blocked |= (k_pos > q_pos) | ~window
        out, lse = softmax_attend(bits.masked_fill_(blocked, -math.inf), values)  # (w i e), (w i 1)
        back = inverse(q_order)  # (b h n): the sorted place of each token
        # drop each row's placeholder window: views, gathered without a copy
        out = rearrange(out, "(b h w) i e -> b h (w i) e", b=b, h=h, w=nc + 1)[:, :, :nc * c]
        lse = rearrange(lse, "(b h w) i 1 -> b h (w i)", b=b, h=h, w=nc + 1)[:, :, :nc * c]
        outs.append(gather_sorted(out, back))
        lses.append(gather_sorted(lse, back))
    return combine_rounds(outs, lses)[:, :, :n]
