r"""GMAT: Global Memory Augmentation for Transformers.

Sparse attention (here a sliding window) keeps the cost linear but gives each token only a local
view. GMAT adds a handful of m global memory tokens with dense attention: the memory attends to
itself and the whole sequence, and every sequence token attends to the whole memory besides its
sparse neighbourhood. The memory thus hands an aggregate view of the entire input to every
position, for an extra $O(m (n + m))$.

$$ \hat M = M + W_o\,\operatorname{softmax}\!\big(Q_M [K_M; K_X]^\top/\sqrt{d}\big)[V_M; V_X] $$

$$ O_i = \operatorname{softmax}\!\big(q_i\, [K_{\hat M}; K_{X, |j - i| \le w}]^\top/\sqrt{d}\big)\,
   [V_{\hat M}; V_{X, |j - i| \le w}] $$

Deviations from the paper:

- The paper carries the memory from layer to layer; a layer here maps `(b, n, dim)` to
  `(b, n, dim)`, so each layer starts from its own learned memory M, updates it first (memory
  attends densely to memory and sequence, plus the residual), and the sequence then reads the
  updated memory. That is our ordering; it lets the global view reach every position within one
  layer.
- The sparse part is a sliding window of radius `window` (the paper pairs the memory with
  several sparse patterns); it is computed blockwise, each block of `window` queries against
  the three blocks around it.
"""

import torch
from einops import einsum, rearrange

from zoo.core.checks import check_qkv, check_sequence, positive_int, refuse_causal
from zoo.core.masks import block_windows, neg_fill, pad_mask, pad_to_multiple, zero_padded_tokens
from zoo.core.shell import MultiHead
from zoo.core.softmax import softmax_attention


def gmat_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mem_k: torch.Tensor,
                   mem_v: torch.Tensor, mask: torch.Tensor | None = None, *,
                   window: int) -> torch.Tensor:
    """Sequence queries over every memory slot and the keys within `window` positions.

    Args:
        q, k: `(b, h, n, d)`. v: `(b, h, n, e)`. mask: `(b, n)`, True = real token.
        mem_k: `(b, h, m, d)`, mem_v: `(b, h, m, e)`: the memory, never masked.
        window: w; query i reads key j when `|i - j| <= w`.

    Returns:
        `(b, h, n, e)`.
    """
    check_qkv(q, k, v, mask, name="gmat_attention")
    b, _, n, d = q.shape
    m, w = mem_k.shape[2], window
    (q, pad), (k, _), (v, _) = (pad_to_multiple(t, w) for t in (q * d ** -0.5, k, v))
    real = pad_mask(mask, b, n, pad, q.device)
    real = torch.ones(b, n, dtype=torch.bool, device=q.device) if real is None else real
    q = rearrange(q, "b h (nc i) d -> b h nc i d", i=w)
    k, v = (rearrange(block_windows(t, w, dim=2), "b h nc d j -> b h nc j d") for t in (k, v))
    # Query i of a block and key j of its window are j - w - i positions apart, in every block;
    # keys outside 0..n-1 come out of the padding as False in `real`.
    i, j = torch.arange(w, device=q.device), torch.arange(3 * w, device=q.device)
    band = (j - w - i[:, None]).abs() <= w  # (i j)
    allowed = band & rearrange(block_windows(real, w, dim=1, value=False), "b nc j -> b 1 nc 1 j")
    local = einsum(q, k, "b h nc i d, b h nc j d -> b h nc i j").masked_fill(
        ~allowed, neg_fill(q.dtype))
    memory = einsum(q, mem_k, "b h nc i d, b h m d -> b h nc i m")
    attn = torch.cat([memory, local], dim=-1).softmax(dim=-1)  # (b h nc i (m + j))
    out = (einsum(attn[..., :m], mem_v, "b h nc i m, b h m e -> b h nc i e")
           + einsum(attn[..., m:], v, "b h nc i j, b h nc j e -> b h nc i e"))
    return rearrange(out, "b h nc i e -> b h (nc i) e")[:, :, :n]


class GMAT(MultiHead):
    """Sliding-window attention with a global memory, `(b, n, dim) -> (b, n, dim)`; not causal.

    Args:
        memory: m, the number of global memory tokens.
        window: w, the radius of the sliding window.
    """

    def __init__(self, dim: int, *, heads: int = 8, dim_head: int | None = None,
                 causal: bool = False, memory: int = 8, window: int = 64):
        refuse_causal(type(self).__name__, causal)
        super().__init__(dim, heads=heads, dim_head=dim_head, causal=False)
        self.memory_size = positive_int(memory, "memory")
        self.window = positive_int(window, "window")
        self.memory = torch.nn.Parameter(torch.randn(memory, dim) * dim ** -0.5)  # M

    def qkv(self, x: torch.Tensor):
        return map(self.split_heads, self.to_qkv(x).chunk(3, dim=-1))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        check_sequence(x, self.dim, mask, name=type(self).__name__, layer=self)
        x = zero_padded_tokens(x, mask)
        b = x.shape[0]
        # a copy per sample, not a view: a view of a parameter made under no_grad trips module hooks
        mem = self.memory.repeat(b, 1, 1)  # (b m dim)
        q, k, v = self.qkv(x)
        q_m, k_m, v_m = self.qkv(mem)
        keys = None if mask is None else torch.cat([mask.new_ones(b, self.memory_size), mask], 1)
        read = softmax_attention(q_m, torch.cat([k_m, k], 2), torch.cat([v_m, v], 2), keys)
        mem = mem + self.to_out(self.merge_heads(read))  # the memory reads everything first
        _, k_m, v_m = self.qkv(mem)
        out = gmat_attention(q, k, v, k_m, v_m, mask, window=self.window)
        return self.to_out(self.merge_heads(out))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, memory={self.memory_size}, window={self.window}"
