r"""ETC: Encoding Long and Structured Inputs in Transformers.

Global-local attention: the input is a small global sequence (here the first $g$ positions)
followed by a long sequence. Attention splits into four pieces: global-to-global, global-to-long
and long-to-global are unrestricted, while long-to-long is restricted to a radius $r$. Long tokens
then exchange information through the global tokens, and the cost is $O(g^2 + g n + n r)$, linear
in the long length. The long-to-long piece runs in blocks of $r$ tokens, each reading its own and
both neighbouring blocks.

$$ O_i = \operatorname{softmax}_{j \in S_i}\!\big(Q_i K_j^\top/\sqrt{d}\big) V_j,\quad
   S_i = \begin{cases} \text{all } j & i < g \\ \{j < g\} \cup \{j \ge g : |i - j| \le r\} &
   i \ge g \end{cases} $$

Deviations from the paper:
- the global input is the first `global_tokens` positions of `x` (the paper feeds it as a
  second sequence built from the input's structure, e.g. one token per sentence);
- no relative position encodings and no structure-driven hard masks between global tokens and
  their segments (both need per-example structure that the zoo's `forward(x, mask)` does not take);
- one set of projections for all four pieces.
"""

import torch
from einops import einsum, rearrange

from zoo.core.checks import check_qkv, positive_int, refuse_causal
from zoo.core.masks import block_windows, neg_fill, pad_qkv
from zoo.core.shell import MultiHead
from zoo.core.softmax import softmax_attention


def etc_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            mask: torch.Tensor | None = None, *, global_tokens: int = 1,
                            radius: int = 8) -> torch.Tensor:
    """The paper's four pieces as one allowed `(i, j)` pattern: global-to-global, global-to-long
    and long-to-global unrestricted, long-to-long where `|i - j| <= radius`; softmax over it.
    Same arguments as `etc_attention`."""
    n = q.shape[2]
    pos = torch.arange(n, device=q.device)
    i, j = rearrange(pos, "i -> i 1"), rearrange(pos, "j -> 1 j")
    allowed = (i < global_tokens) | (j < global_tokens) | ((i - j).abs() <= radius)
    return softmax_attention(q, k, v, mask, allowed=allowed)


def etc_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  mask: torch.Tensor | None = None, *, global_tokens: int = 1,
                  radius: int = 8) -> torch.Tensor:
    """What the layer runs: `etc_attention_reference` without the `n x n` pattern: the long
    tokens in blocks of `radius`, each reading its neighbour blocks and the global tokens in one
    softmax, the global rows dense (tested equal).

    Args:
        q, k: `(b, h, n, d)`. v: `(b, h, n, e)`. mask: `(b, n)`, True = real token.
        global_tokens: `g`, the leading positions that form the global input.
        radius: `r`, the long-to-long reach on each side.

    Returns:
        `(b, h, n, e)`.
    """
    check_qkv(q, k, v, mask, name="etc_attention")
    b, _, n, d = q.shape
    g, c, scale = min(global_tokens, n), max(radius, 1), d ** -0.5
    real = torch.ones(b, n, dtype=torch.bool, device=q.device) if mask is None else mask

    # long-to-long: blocks of c long tokens, each reading blocks m-1, m, m+1 (Sec. 2.1)
    ql, kl, vl, real_l = pad_qkv(q[:, :, g:], k[:, :, g:], v[:, :, g:], real[:, g:], c)
    ql, kl, vl = (rearrange(t, "b h (m c) d -> b h m c d", c=c) for t in (ql, kl, vl))
    real_l = rearrange(real_l, "b (m c) -> b 1 m c 1", c=c).float()

    def neighbours(t):  # (b h m c d) -> (b h m 3c d): blocks m-1, m, m+1, zeros past the ends
        return rearrange(block_windows(rearrange(t, "b h m c d -> b h (m c) d"), c, dim=2),
                         "b h m d w -> b h m w d")

    i = torch.arange(ql.shape[2] * c, device=q.device).view(-1, c)  # (m c), long positions
    j = neighbours(rearrange(i + c, "m c -> 1 1 m c 1"))[0, 0, ..., 0] - c  # (m w)
    near = (i[:, :, None] - j[:, None, :]).abs() <= radius  # (m c w)
    ok_ll = near & rearrange(neighbours(real_l)[..., 0] > 0, "b 1 m w -> b 1 m 1 w")
    scores_ll = einsum(ql, neighbours(kl), "b h m c d, b h m w d -> b h m c w") * scale
    # long-to-global: every long token reads every global token
    scores_lg = einsum(ql, k[:, :, :g], "b h m c d, b h j d -> b h m c j") * scale
    ok_lg = rearrange(real[:, :g], "b j -> b 1 1 1 j")
    scores = torch.cat([scores_ll.masked_fill(~ok_ll, neg_fill(q.dtype)),
                        scores_lg.masked_fill(~ok_lg, neg_fill(q.dtype))], dim=-1)
    attn_ll, attn_lg = scores.softmax(dim=-1).split([3 * c, g], dim=-1)
    out_l = (einsum(attn_ll, neighbours(vl), "b h m c w, b h m w e -> b h m c e")
             + einsum(attn_lg, v[:, :, :g], "b h m c j, b h j e -> b h m c e"))
    out_l = rearrange(out_l, "b h m c e -> b h (m c) e")[:, :, :n - g]

    # global-to-global and global-to-long: unrestricted
    scores_g = einsum(q[:, :, :g], k, "b h i d, b h j d -> b h i j") * scale
    scores_g = scores_g.masked_fill(~rearrange(real, "b j -> b 1 1 j"), neg_fill(q.dtype))
    out_g = einsum(scores_g.softmax(dim=-1), v, "b h i j, b h j e -> b h i e")
    return torch.cat([out_g, out_l], dim=2)


class ETC(MultiHead):
    """Multi-head global-local attention. `(b, n, dim) -> (b, n, dim)`. Not causal.

    Args:
        global_tokens: how many leading positions form the global input.
        radius: long-to-long reach on each side.
    """

    def __init__(self, dim: int, *, heads: int = 8, dim_head: int | None = None,
                 causal: bool = False, global_tokens: int = 1, radius: int = 8):
        refuse_causal(type(self).__name__, causal)
        super().__init__(dim, heads=heads, dim_head=dim_head, causal=False)
        self.global_tokens = positive_int(global_tokens, "global_tokens")
        self.radius = positive_int(radius, "radius")

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        return etc_attention(q, k, v, mask, global_tokens=self.global_tokens, radius=self.radius)
