r"""Native Sparse Attention: Hardware-Aligned and Natively Trainable Sparse Attention.

Each query reads three sets of keys and mixes the three outputs with learned sigmoid gates. The
compressed branch: blocks of $l$ consecutive keys (stride $d$) are squeezed into one key and one
value each by a learned map $\varphi$, a coarse summary of the whole past. The selected branch: the
compressed branch's attention weights, summed over the selection blocks of $l'$ tokens they
overlap, rank those blocks, and the query reads every token of the top $n$ (the first block and
the two most recent always among them). The sliding branch: the last $w$ tokens. Each branch has
its own keys and values, so that the local branch cannot shortcut the other two.

$$ o_t = \sum_{c \in \{\mathrm{cmp}, \mathrm{slc}, \mathrm{win}\}} g^c_t\,
   \operatorname{Attn}\!\big(q_t, \tilde K^c_t, \tilde V^c_t\big),\qquad
   \tilde K^{\mathrm{cmp}}_t = \big\{\varphi(k_{id+1:id+l})\big\}_{0 \le i \le \lfloor (t-l)/d \rfloor} $$
$$ p^{\mathrm{cmp}}_t = \operatorname{softmax}\!\big(q_t^\top \tilde K^{\mathrm{cmp}}_t\big),\quad
   p^{\mathrm{slc}}_t[j] = \sum_{m=0}^{l'/d - 1} \sum_{n=0}^{l/d - 1}
   p^{\mathrm{cmp}}_t\big[\tfrac{l'}{d} j + m - n\big], \quad
   \tilde K^{\mathrm{slc}}_t = \operatorname{cat}\big\{k_{jl'+1:(j+1)l'} :
   \operatorname{rank}(p^{\mathrm{slc}}_t[j]) \le n\big\} $$

Every branch is written as softmax attention over an allowed set of keys (`cached_attention`); the
selection pattern is dense `(i, j)`, as its definition is (the paper's kernel gathers the blocks
instead; the compressed branch is quadratic in the length either way, `n^2 / d`).

Deviations from the paper:
- $\varphi$ is one linear map of the block's flattened keys (its weights see each key's position in
  the block: the intra-block position encoding); the paper says an MLP with a position encoding;
- every head ranks its own blocks (the paper sums the ranking scores over the query heads of a
  grouped-query group, which share keys; here each head is its own group);
- a padded token is left out of every branch; a compressed block of padding only is left out;
- `causal=False` (not in the paper, a decoder) lets a query read every compressed block, rank every
  selection block, and see the window on both sides.
"""

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from torch import nn

from zoo.core.checks import check_dtype, check_sequence, positive_int
from zoo.core.decoding import (
    Cached,
    append,
    attention_weights,
    cached_attention,
    real_tokens,
)
from zoo.core.masks import zero_padded_tokens
from zoo.core.shell import MultiHead


def compress(t: torch.Tensor, real: torch.Tensor, phi: nn.Linear, *, block: int, stride: int,
             first: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks `first, first + 1, ..` of `block` tokens every `stride`, each mapped to one vector.

    t `(b, h, n, d)`, real `(b, n)` -> `(b, h, nb, d)` and `(b, nb)`, True where the block holds a
    real token. Only complete blocks: block `i` covers tokens `i stride .. i stride + block - 1`.
    A padded token enters its block's vector as zeros (selected: NaN behind the mask stays out).
    """
    t, real = t[:, :, first * stride:], real[:, first * stride:]
    t = torch.where(rearrange(real, "b n -> b 1 n 1"), t, t.new_zeros(()))
    if t.shape[2] < block:
        return t.new_zeros(*t.shape[:2], 0, phi.out_features), real[:, :0]
    windows = t.unfold(2, block, stride)  # (b h nb d l)
    flat = rearrange(windows, "b h nb d l -> b h nb (l d)")
    return phi(flat), real.unfold(1, block, stride).any(dim=-1)


def selection_scores(p_cmp: torch.Tensor, n_blocks: int, *, block: int, stride: int,
                     select_block: int) -> torch.Tensor:
    """`p_slc[j] = sum_m sum_n p_cmp[a j + m - n]` (`a = l'/d` offsets m, `l/d` offsets n, out of range
    0): the weight of the compressed blocks overlapping selection block `j`, each counted as often
    as the double sum reaches it. `(b, h, i, nb)` -> `(b, h, i, n_blocks)`."""
    a, c = select_block // stride, block // stride
    counts = torch.zeros(a + c - 1, dtype=p_cmp.dtype, device=p_cmp.device)  # offsets -(c-1) .. a-1
    for m in range(a):
        for n in range(c):
            counts[m - n + c - 1] += 1
    # p_cmp[x] sits at padded[x + c - 1]; window j of the unfold holds offsets a j - (c-1) .. a j + a-1
    padded = F.pad(p_cmp, (c - 1, a * n_blocks - p_cmp.shape[-1]))
    return einsum(padded.unfold(-1, a + c - 1, a), counts, "... j s, s -> ... j")


def top_blocks(p_slc: torch.Tensor, pos: torch.Tensor, *, select_block: int, topk: int,
               causal: bool) -> torch.Tensor:
    """`(b, h, i, nb)` bool: the `topk` blocks of highest `p_slc` among those query `pos[i]` may read
    (causal: starting at or before it), the first block and the query's own and previous block
    always first. Ties go to the earlier block (a stable sort)."""
    blocks = torch.arange(p_slc.shape[-1], device=p_slc.device)
    own = rearrange(pos // select_block, "i -> i 1")
    forced = (blocks == 0) | ((blocks <= own) & (blocks >= own - 1))
    readable = blocks <= own if causal else torch.ones_like(forced)
    # forced blocks outrank every score (p_slc <= select_block / stride), unreadable ones rank last
    rank_key = torch.where(forced, p_slc + select_block + 1.0, torch.where(readable, p_slc, -1.0))
    order = torch.sort(rank_key, dim=-1, descending=True, stable=True).indices[..., :topk]
    chosen = torch.zeros_like(rank_key, dtype=torch.bool).scatter(-1, order, True)
    return chosen & readable


def native_sparse_attention(q: torch.Tensor, keys: dict, values: dict, real: torch.Tensor,
                            gates: torch.Tensor, compressed: tuple, *, block: int, stride: int,
                            select_block: int, topk: int, window: int,
                            causal: bool = True) -> torch.Tensor:
    """The three branches and their gated sum, for the last `i` of `n` positions.

    Args:
        q: `(b, h, i, d)`. keys, values: `{"slc": ..., "win": ...}`, each `(b, h, n, d)`.
        real: `(b, n)`, True = real token. gates: `(b, h, i, 3)`, in (0, 1): cmp, slc, win.
        compressed: `(k_cmp, v_cmp, real_cmp)`, the compressed blocks `(b, h, nb, d)`, `(b, nb)`.

    Returns:
        `(b, h, i, e)`.
    """
    n = real.shape[1]
    pos = torch.arange(n - q.shape[2], n, device=q.device)  # the queries' positions
    k_cmp, v_cmp, real_cmp = compressed
    # a compressed block is readable once its last token is (causal)
    ends = torch.arange(k_cmp.shape[2], device=q.device) * stride + block - 1
    p_cmp = attention_weights(q, k_cmp, real_cmp, causal=False,
                              allowed=(ends <= rearrange(pos, "i -> i 1")) if causal else None)
    v_cmp = torch.where(rearrange(real_cmp, "b j -> b 1 j 1"), v_cmp, v_cmp.new_zeros(()))
    out_cmp = einsum(p_cmp, v_cmp, "b h i j, b h j e -> b h i e")

    n_blocks = -(-n // select_block)
    p_slc = selection_scores(p_cmp, n_blocks, block=block, stride=stride, select_block=select_block)
    chosen = top_blocks(p_slc, pos, select_block=select_block, topk=topk, causal=causal)
    token_blocks = torch.arange(n, device=q.device) // select_block
    allowed = chosen[..., token_blocks]  # (b h i n): the tokens of the chosen blocks
    out_slc = cached_attention(q, keys["slc"], values["slc"], real, causal=causal, allowed=allowed)

    gap = rearrange(pos, "i -> i 1") - torch.arange(n, device=q.device)
    near = gap < window if causal else gap.abs() < window
    out_win = cached_attention(q, keys["win"], values["win"], real, causal=causal, allowed=near)
    return einsum(torch.stack([out_cmp, out_slc, out_win], dim=-1), gates,
                  "b h i e c, b h i c -> b h i e")


class NativeSparseAttention(Cached, MultiHead):
    """Multi-head native sparse attention. `(b, n, dim) -> (b, n, dim)`.

    Args:
        block: `l`, tokens per compressed block; stride: `d`, between compressed blocks (it must
            divide `block` and `select_block`).
        select_block: `l'`, tokens per selection block; topk: `n`, blocks each query reads.
        window: `w`, the sliding window.
    """

    def __init__(self, dim: int, *, heads: int = 8, dim_head: int | None = None,
                 causal: bool = False, block: int = 32, stride: int = 16, select_block: int = 64,
                 topk: int = 16, window: int = 512):
        super().__init__(dim, heads=heads, dim_head=dim_head, causal=causal)
        for value, label in ((block, "block"), (stride, "stride"), (select_block, "select_block"),
                             (topk, "topk"), (window, "window")):
            positive_int(value, label)
        if block % stride or select_block % stride:
            raise ValueError(f"stride={stride} must divide block={block} and select_block={select_block}")
        self.block, self.stride, self.select_block = block, stride, select_block
        self.topk, self.window = topk, window
        inner, d = self.heads * self.dim_head, self.dim_head
        # q, then a key and a value for each of the three branches
        self.to_qkv = nn.Linear(dim, 7 * inner, bias=False)
        self.phi_k, self.phi_v = nn.Linear(block * d, d), nn.Linear(block * d, d)
        self.to_gates = nn.Linear(dim, 3 * heads)

    def project(self, x: torch.Tensor):
        """q `(b, h, n, d)`, the keys and the values `{cmp, slc, win}`, the gates `(b, h, n, 3)`."""
        q, *kv = map(self.split_heads, self.to_qkv(x).chunk(7, dim=-1))
        gates = rearrange(self.to_gates(x).sigmoid(), "b n (h c) -> b h n c", c=3)
        branches = ("cmp", "slc", "win")
        return (q, dict(zip(branches, kv[0::2], strict=True)), dict(zip(branches, kv[1::2], strict=True)),
                gates)

    def attend_all(self, q, keys, values, real, gates, compressed, causal):
        return native_sparse_attention(q, keys, values, real, gates, compressed, block=self.block,
                                       stride=self.stride, select_block=self.select_block,
                                       topk=self.topk, window=self.window, causal=causal)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        check_sequence(x, self.dim, mask, name=type(self).__name__)
        check_dtype(x, self, name=type(self).__name__)
        x = zero_padded_tokens(x, mask)
        q, keys, values, gates = self.project(x)
        real = real_tokens(x, mask)
        k_cmp, real_cmp = compress(keys["cmp"], real, self.phi_k, block=self.block, stride=self.stride)
        v_cmp, _ = compress(values["cmp"], real, self.phi_v, block=self.block, stride=self.stride)
        out = self.attend_all(q, keys, values, real, gates, (k_cmp, v_cmp, real_cmp), self.causal)
        return self.to_out(self.merge_heads(out))

    def decode(self, x: torch.Tensor, cache: dict | None, mask: torch.Tensor | None,
               start: int) -> tuple[torch.Tensor, dict]:
        """One chunk. The cache holds every token's keys and values of the three branches and the
        compressed blocks completed so far; a chunk compresses only the blocks it completes."""
        state = dict(cache or {})
        q, keys, values, gates = self.project(x)
        for name in ("cmp", "slc", "win"):
            state[f"k_{name}"] = keys[name] = append(state.get(f"k_{name}"), keys[name], 2)
            state[f"v_{name}"] = values[name] = append(state.get(f"v_{name}"), values[name], 2)
        state["real"] = real = append(state.get("real"), real_tokens(x, mask), 1)
        done = 0 if state.get("c_real") is None else state["c_real"].shape[1]
        new_k, new_real = compress(keys["cmp"], real, self.phi_k, block=self.block, stride=self.stride,
                                   first=done)
        new_v, _ = compress(values["cmp"], real, self.phi_v, block=self.block, stride=self.stride,
                            first=done)
        state["c_k"], state["c_v"] = append(state.get("c_k"), new_k, 2), append(state.get("c_v"), new_v, 2)
        state["c_real"] = append(state.get("c_real"), new_real, 1)
        out = self.attend_all(q, keys, values, real, gates, (state["c_k"], state["c_v"], state["c_real"]),
                              True)
        return self.to_out(self.merge_heads(out)), state

