r"""Star-Transformer.

Replace the fully connected attention graph by a star with a ring. Every token (a satellite node)
attends only to a context of five: its two ring neighbours, itself, its own input embedding and
one shared relay node. The relay in turn attends to itself and every satellite, so any two tokens
are two hops apart. A few alternating update steps give each token a global view at linear cost.

$$ C_i = [h_{i-1}; h_i; h_{i+1}; e_i; s], \qquad
   h_i \leftarrow \operatorname{LN}\big(\operatorname{ReLU}(\operatorname{MultiAtt}(h_i, C_i))\big) $$

$$ s \leftarrow \operatorname{LN}\big(\operatorname{ReLU}(\operatorname{MultiAtt}(s, [s; H]))\big),
   \qquad h^0 = E, \quad s^0 = \operatorname{mean}(E) $$

Here E is the layer input and the output is the satellites after `steps` updates; indices are
taken round the ring (the first and last tokens are neighbours).

Deviations from the paper:

- Each step has its own weights (the paper's equations leave this open; the authors' code does
  the same). The relay update after the last step is not computed: the layer returns the
  satellites, and the final relay would only feed a classifier.
- With a padding mask the ring runs over the real tokens only (a padded sequence gives the
  same outputs as the sequence without its padding) and the relay ignores padded satellites.
- No position embeddings are added inside the layer; they are the caller's job.
"""

import torch
import torch.nn.functional as F
from einops import einsum, rearrange, reduce
from torch import nn

from zoo.core.checks import check_sequence, positive_int, refuse_causal
from zoo.core.masks import neg_fill, zero_padded_tokens
from zoo.entries.set_transformer import head_width


class StarAttention(nn.Module):
    """The weights of one `MultiAtt` plus its layer norm."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = nn.Linear(dim, 2 * heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim)
        self.norm = nn.LayerNorm(dim)

    def finish(self, out: torch.Tensor) -> torch.Tensor:
        """`(b, n, h * e)` heads' outputs -> projection, ReLU, layer norm -> `(b, n, dim)`."""
        return self.norm(F.relu(self.to_out(out)))


def ring_neighbours(real: torch.Tensor):
    """Previous and next real token round the ring of real tokens; a padded position gets itself.

    Args:
        real: `(b, n)` bool, True = real token.

    Returns:
        `(prev, next)`, each `(b, n)` position indices.
    """
    pos = torch.arange(real.shape[1], device=real.device).expand_as(real)
    order = torch.sort((~real).to(torch.int8), dim=-1, stable=True).indices  # real ones first
    count = real.sum(-1, keepdim=True).clamp(min=1)
    rank = real.long().cumsum(-1) - 1
    prev, nxt = (order.gather(-1, (rank + step) % count) for step in (-1, 1))
    return torch.where(real, prev, pos), torch.where(real, nxt, pos)


def take_rows(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`t[b, index[b, i]]` for t `(b, n, c)`, index `(b, n)`: one index_select on flattened rows."""
    b, n = index.shape
    rows = index + n * torch.arange(b, device=index.device)[:, None]
    return t.flatten(0, 1).index_select(0, rows.flatten()).view(b, n, t.shape[-1])


def satellite_update(h: torch.Tensor, e: torch.Tensor, s: torch.Tensor, prev: torch.Tensor | None,
                     nxt: torch.Tensor | None, att: StarAttention) -> torch.Tensor:
    """One satellite step: token i attends to `[h_prev(i); h_i; h_next(i); e_i; s]`.

    Args:
        h, e: `(b, n, dim)` satellites and embeddings. s: `(b, 1, dim)` relay.
        prev, nxt: `(b, n)` ring neighbours; None when every token is real (the ring is the
            sequence, and the neighbours are shifted views).

    Returns:
        `(b, n, dim)`.
    """
    heads = att.heads
    q = rearrange(att.to_q(h), "b n (h d) -> b n h d", h=heads)
    kv_h = att.to_kv(h)  # (b n kv)
    # in the first step the satellites are the embeddings (h^0 = E): project them once
    kv_e = kv_h if e is h else att.to_kv(e)
    if prev is None or nxt is None:  # the ring closed by one row at each end, then two views
        ring = torch.cat([kv_h[:, -1:], kv_h, kv_h[:, :1]], dim=1)  # (b n+2 kv)
        before, after = ring[:, :-2], ring[:, 2:]
    else:
        before, after = take_rows(kv_h, prev), take_rows(kv_h, nxt)
    context = (before, kv_h, after, kv_e, att.to_kv(s))
    keys, values = zip(*(rearrange(t, "b n (two h d) -> two b n h d", two=2, h=heads)
                         for t in context), strict=True)
    scale = q.shape[-1] ** -0.5
    # the five contexts on the first axis: a softmax over it runs along contiguous (b n h) rows
    scores = torch.stack([torch.linalg.vecdot(q, k) for k in keys]) * scale  # (c b n h), c = 5
    attn = rearrange(scores.softmax(dim=0), "c b n h -> c b n h 1")
    out = attn[0] * values[0]  # (b n h e), then += a_c v_c for the other four, in place
    for a, v in zip(attn[1:], values[1:], strict=True):
        out.addcmul_(a, v)
    return att.finish(rearrange(out, "b n h e -> b n (h e)"))


def relay_update(s: torch.Tensor, h: torch.Tensor, mask: torch.Tensor | None,
                 att: StarAttention) -> torch.Tensor:
    """The relay attends to `[s; H]`, padded satellites left out. s `(b, 1, dim)`, h `(b, n, dim)`.

    One query reads n + 1 rows, so the key weights are folded into the query and the value weights
    applied after the attention-weighted sum of the rows: the same sums as projecting every row,
    for a fraction of the work.
    """
    w_k, w_v = (rearrange(w, "(h d) x -> h d x", h=att.heads) for w in att.to_kv.weight.chunk(2))
    q = rearrange(att.to_q(s), "b 1 (h d) -> b h d", h=att.heads) * (w_k.shape[1] ** -0.5)
    rows = torch.cat([s, h], dim=1)  # (b j dim)
    scores = einsum(einsum(q, w_k, "b h d, h d x -> b h x"), rows, "b h x, b j x -> b h j")
    if mask is not None:
        keep = torch.cat([mask.new_ones(mask.shape[0], 1), mask], dim=1)
        scores = scores.masked_fill(~rearrange(keep, "b j -> b 1 j"), neg_fill(scores.dtype))
    read = einsum(scores.softmax(dim=-1), rows, "b h j, b j x -> b h x")
    return att.finish(rearrange(einsum(read, w_v, "b h x, h e x -> b h e"), "b h e -> b 1 (h e)"))


class StarTransformer(nn.Module):
    """Star-Transformer encoder steps, `(b, n, dim) -> (b, n, dim)`; not causal.

    Args:
        dim: model width.
        heads: number of heads.
        dim_head: width of one head; None means `dim // heads`.
        causal: must be False (the relay reads every token).
        steps: number of alternating satellite and relay updates (the paper's T).
    """

    def __init__(self, dim: int, *, heads: int = 8, dim_head: int | None = None,
                 causal: bool = False, steps: int = 2):
        refuse_causal(type(self).__name__, causal)
        super().__init__()
        self.dim, self.heads = positive_int(dim, "dim"), positive_int(heads, "heads")
        self.dim_head = dim_head = head_width(dim, heads, dim_head, type(self).__name__)
        self.steps = positive_int(steps, "steps")
        self.satellites = nn.ModuleList(StarAttention(dim, heads, dim_head) for _ in range(steps))
        self.relays = nn.ModuleList(StarAttention(dim, heads, dim_head) for _ in range(steps - 1))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        check_sequence(x, self.dim, mask, name=type(self).__name__, layer=self)
        x = zero_padded_tokens(x, mask)
        if mask is None:
            prev = nxt = None
            s = reduce(x, "b n d -> b 1 d", "mean")  # s^0: the mean of the embeddings
        else:  # the ring and the mean over the real tokens
            prev, nxt = ring_neighbours(mask)
            weight = rearrange(mask.to(x.dtype), "b n -> b n 1")
            s = reduce(x * weight, "b n d -> b 1 d", "sum") / reduce(weight, "b n 1 -> b 1 1",
                                                                     "sum").clamp(min=1)
        h = x
        for step, att in enumerate(self.satellites):
            h = satellite_update(h, x, s, prev, nxt, att)
            if step < len(self.relays):
                s = relay_update(s, h, mask, self.relays[step])
        return h

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, dim_head={self.dim_head}, steps={self.steps}"
