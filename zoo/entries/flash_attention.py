r"""FlashAttention: Fast and Memory-Efficient Exact Attention with IO-Awareness.

Exact softmax attention, computed so that the `(n, n)` matrix of scores never exists. Queries are
cut into tiles of $B_r$ rows and keys and values into tiles of $B_c$; each key tile is scored
against the query tiles, and a running row maximum $m$ and a running row sum $\ell$ of the
exponentials (the online softmax) let every query tile fold the new tile into an output that is
already correctly normalised for the keys seen so far. Time stays quadratic, memory is linear
(the paper's point is the traffic to slow memory, which the tiles bound; here the measure is the
largest tensor alive).

$$ S = Q_i K_j^\top s,\quad \tilde m = \operatorname{rowmax}(S),\quad \tilde P = e^{S - \tilde m},
   \quad m' = \max(m, \tilde m),\quad \ell' = e^{m - m'} \ell + e^{\tilde m - m'}
   \operatorname{rowsum}(\tilde P),$$
$$ O_i \leftarrow \operatorname{diag}(\ell')^{-1}\big(\operatorname{diag}(\ell)\, e^{m - m'} O_i
   + e^{\tilde m - m'} \tilde P V_j\big) $$

(Algorithm 1 of the paper, one key tile $j$ at a time; the loop over query tiles $i$ runs as one
batched product.)

Deviations from the paper:
- the backward pass is autograd through the tiles, which keeps every tile's probabilities for the
  gradient; the paper recomputes them from $m$ and $\ell$ instead (its Algorithm 2), so its training
  memory is linear too. The forward pass, what the probes measure, is the paper's;
- a query with no key to read (all padded, or causally before every real key) gets 0; dropout is
  left out.
"""

import torch
from einops import einsum, rearrange

from zoo.core.checks import check_qkv, check_sequence, positive_int
from zoo.core.decoding import Cached, append, real_tokens
from zoo.core.masks import neg_fill, pad_to_multiple, zero_padded_tokens
from zoo.core.shell import MultiHead


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    mask: torch.Tensor | None = None, *, causal: bool = False,
                    scale: float | None = None, block_q: int = 64, block_k: int = 64) -> torch.Tensor:
    """Softmax attention in `(block_q, block_k)` tiles with an online softmax.

    Args:
        q: `(b, h, i, d)`. k: `(b, h, j, d)`. v: `(b, h, j, e)`. mask: `(b, j)`, True = real token.
        causal: query `i` reads keys `j <= i + (n_k - n_q)`: the queries are the last `n_q`
            positions (the same as SDPA's `is_causal` when `n_q == n_k`; a decoding chunk otherwise).
        scale: score scale; None means `d ** -0.5`.
        block_q, block_k: the tile sizes `B_r` and `B_c`.

    Returns:
        `(b, h, i, e)`.
    """
    check_qkv(q, k, v, mask, name="flash_attention")
    b, h, n_q, _ = q.shape
    n_k = k.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    real = real_tokens(k[:, 0], mask)
    # padded keys and values are replaced, never multiplied, so NaN behind the mask stays there
    k, v = (torch.where(rearrange(real, "b j -> b 1 j 1"), t, t.new_zeros(())) for t in (k, v))
    qp, _ = pad_to_multiple(q * scale, block_q)
    qt = rearrange(qp, "b h (nq r) d -> b h nq r d", r=block_q)  # the query tiles Q_i
    pos_q = rearrange(torch.arange(qp.shape[2], device=q.device) + (n_k - n_q), "(nq r) -> nq r 1",
                      r=block_q)
    fill = neg_fill(q.dtype)
    out = q.new_zeros(*qt.shape[:-1], v.shape[-1])  # O_i (b h nq r e)
    row_max = q.new_full(qt.shape[:-1], fill)  # m_i (b h nq r)
    row_sum = q.new_zeros(qt.shape[:-1])  # l_i
    for start in range(0, n_k, block_k):
        kj, vj = k[:, :, start:start + block_k], v[:, :, start:start + block_k]
        ok = rearrange(real[:, start:start + block_k], "b c -> b 1 1 1 c")
        if causal:
            ok = ok & (torch.arange(start, start + kj.shape[2], device=q.device) <= pos_q)
        scores = einsum(qt, kj, "b h nq r d, b h c d -> b h nq r c").masked_fill(~ok, fill)
        tile_max = scores.amax(dim=-1)  # m~_ij
        p = torch.where(ok, (scores - tile_max.unsqueeze(-1)).exp(), scores.new_zeros(()))  # P~_ij
        new_max = torch.maximum(row_max, tile_max)
        old_w, new_w = (row_max - new_max).exp(), (tile_max - new_max).exp()
        new_sum = old_w * row_sum + new_w * p.sum(dim=-1)
        # l' = 0 only while a row has read no key; it then stays 0 and so does O_i
        denom = torch.where(new_sum > 0, new_sum, new_sum.new_ones(())).unsqueeze(-1)
        out = ((row_sum * old_w).unsqueeze(-1) * out
               + new_w.unsqueeze(-1) * einsum(p, vj, "b h nq r c, b h c e -> b h nq r e")) / denom
        row_max, row_sum = new_max, new_sum
    return rearrange(out, "b h nq r e -> b h (nq r) e")[:, :, :n_q]


class FlashAttention(Cached, MultiHead):
    """Multi-head exact attention in tiles. `(b, n, dim) -> (b, n, dim)`.

    Args:
        block_q, block_k: tile sizes (the paper picks them from the on-chip memory size).
    """

    def __init__(self, dim: int, *, heads: int = 8, dim_head: int | None = None,
                 causal: bool = False, block_q: int = 64, block_k: int = 64):
        super().__init__(dim, heads=heads, dim_head=dim_head, causal=causal)
        self.block_q = positive_int(block_q, "block_q")
        self.block_k = positive_int(block_k, "block_k")

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        return flash_attention(q, k, v, mask, causal=self.causal, block_q=self.block_q,
                               block_k=self.block_k)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        check_sequence(x, self.dim, mask, name=type(self).__name__)
        return super().forward(zero_padded_tokens(x, mask), mask)

    def decode(self, x: torch.Tensor, cache: dict | None, mask: torch.Tensor | None,
               start: int) -> tuple[torch.Tensor, dict]:
        """One chunk; the cache `{k, v, real}` holds every key and value so far."""
        state = cache or {}
        q, k, v = map(self.split_heads, self.to_qkv(x).chunk(3, dim=-1))
        k, v = append(state.get("k"), k, 2), append(state.get("v"), v, 2)
        real = append(state.get("real"), real_tokens(x, mask), 1)
        out = flash_attention(q, k, v, real, causal=True, block_q=self.block_q, block_k=self.block_k)
        return self.to_out(self.merge_heads(out)), {"k": k, "v": v, "real": real}
