r"""Luna: Linear Unified Nested Attention.

Two nested attentions through a short extra sequence $P$ of fixed length $l$. First $P$ attends to
the input and packs it into $l$ vectors (pack attention); then every input position attends to the
packed vectors (unpack attention). Each attention is $l \times n$, so time and memory are linear
in n. In the causal form position t may only use a pack of the inputs up to t: the pack weights
become a positive activation instead of a softmax, averaged over the prefix, so the packs of all
prefixes are cumulative sums; they are never stored per position but computed as causal linear
attention, chunk by chunk.

$$ Y_P = \operatorname{softmax}\!\big(P_Q K^\top / \sqrt{d}\big)\, V, \qquad
   O = \operatorname{softmax}\!\big(Q\, (Y_P W_K)^\top / \sqrt{d}\big)\, Y_P W_V $$

causal: $Y_P^{(t)} = \tfrac{1}{t} \sum_{s \le t} \omega\big(P_Q k_s^\top / \sqrt{d}\big)\, v_s$ with
$\omega = \operatorname{elu} + 1$, and position t unpacks $Y_P^{(t)}$.

Deviations from the paper:
- $P$ is a learned parameter of the layer (the paper's first-layer $P$); the packed output, which
  the paper passes to the next layer as its $P$, is not returned, and there is no residual or
  LayerNorm around the two attentions;
- the unpack keys and values are bias-free linear maps of the merged heads of $Y_P$;
- the causal activation $\omega = \operatorname{elu} + 1$ and the $1/t$ average follow the
  authors' code; with a padding mask, t counts the real tokens up to t.
"""

import torch
import torch.nn.functional as F
from einops import einsum, rearrange, repeat

from zoo.core.checks import check_qkv, check_sequence, positive_int
from zoo.core.masks import masked_fill_scores, pad_to_multiple, score_mask, zero_padded_tokens
from zoo.core.shell import MultiHead


def luna_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pq: torch.Tensor,
                   w_unpack: torch.Tensor, mask: torch.Tensor | None = None, *,
                   causal: bool = False) -> torch.Tensor:
    """Pack then unpack.

    Args:
        q, k: `(b, h, n, d)`. v: `(b, h, n, e)`. pq: the packed queries `(h, l, d)`.
        w_unpack: `(2 h e, h e)`, maps the merged packed context to unpack keys and values.
        mask: `(b, n)`, True = real token. causal: position t packs only inputs up to t.

    Returns:
        `(b, h, n, e)`.
    """
    check_qkv(q, k, v, mask, name="luna_attention")
    h, scale = q.shape[1], q.shape[-1] ** -0.5
    scores = einsum(pq, k, "h l d, b h n d -> b h l n") * scale
    if not causal:
        keep = score_mask(mask, pq.shape[1], k.shape[2], causal=False, device=q.device)
        attn = masked_fill_scores(scores, keep).softmax(dim=-1)  # pack attention (b h l n)
        packed = rearrange(einsum(attn, v, "b h l n, b h n e -> b h l e"), "b h l e -> b l (h e)")
        pk, pv = rearrange(packed @ w_unpack.T, "b l (two h e) -> two b h l e", two=2, h=h)
        attn = (einsum(q, pk, "b h n d, b h l d -> b h n l") * scale).softmax(dim=-1)  # unpack
        return einsum(attn, pv, "b h n l, b h l e -> b h n e")
    real = (torch.ones_like(k[:, 0, :, 0]) if mask is None else mask).to(k.dtype)  # (b n)
    count = rearrange(real.cumsum(dim=-1).clamp(min=1), "b n -> b 1 n 1")
    weights = rearrange((F.elu(scores) + 1), "b h l n -> b h n l") * rearrange(real, "b n -> b 1 n 1")
    # Packing and the unpack maps commute: map each input v_s into every unpack head g first.
    wk, wv = rearrange(w_unpack, "(two g e) (h f) -> two g h e f", two=2, g=h, h=h)
    uk, uv = (einsum(v, w, "b h n f, g h e f -> b h g n e") for w in (wk, wv))
    spread = repeat(weights, "b h n l -> b h g n l", g=h)
    attn = (_causal_mix(q, uk, spread) / count * scale).softmax(dim=-1)  # unpack (b g n l)
    return _causal_mix(attn, spread, uv) / count


def _causal_mix(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """out[g, t] = sum over s <= t and source heads h of (q[g, t] . k[h, g, s]) v[h, g, s].

    Causal linear attention, chunk by chunk: explicitly inside a chunk, through a running state
    across chunks. q `(b, g, n, f)`, k `(b, h, g, n, f)`, v `(b, h, g, n, e)` -> `(b, g, n, e)`.
    """
    n = q.shape[2]
    q, k, v = (pad_to_multiple(t, chunk, dim=-2)[0] for t in (q, k, v))
    q = rearrange(q, "b g (c i) f -> b g c i f", i=chunk)
    k, v = (rearrange(t, "b h g (c j) f -> b h g c j f", j=chunk) for t in (k, v))
    state = einsum(k, v, "b h g c j f, b h g c j e -> b g c f e")
    state = state.cumsum(dim=2) - state  # the sum over earlier chunks
    out = einsum(q, state, "b g c i f, b g c f e -> b g c i e")
    scores = einsum(q, k, "b g c i f, b h g c j f -> b h g c i j").tril()
    out = out + einsum(scores, v, "b h g c i j, b h g c j e -> b g c i e")
    return rearrange(out, "b g c i e -> b g (c i) e")[:, :, :n]


class Luna(MultiHead):
    """Multi-head Luna attention. `(b, n, dim) -> (b, n, dim)`.

    Args:
        packed_len: length `l` of the packed sequence P.
    """

    def __init__(self, dim: int, *, heads: int = 8, dim_head: int | None = None, causal: bool = False,
                 packed_len: int = 16):
        super().__init__(dim, heads=heads, dim_head=dim_head, causal=causal)
        self.packed_len = positive_int(packed_len, "packed_len")
        inner = self.heads * self.dim_head
        self.p = torch.nn.Parameter(torch.randn(packed_len, dim))
        self.to_pq = torch.nn.Linear(dim, inner, bias=False)
        self.to_unpack_kv = torch.nn.Linear(inner, 2 * inner, bias=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        check_sequence(x, self.dim, mask, name=type(self).__name__, layer=self)
        x = zero_padded_tokens(x, mask)
        q, k, v = map(self.split_heads, self.to_qkv(x).chunk(3, dim=-1))
        pq = rearrange(self.to_pq(self.p), "l (h d) -> h l d", h=self.heads)
        out = luna_attention(q, k, v, pq, self.to_unpack_kv.weight, mask, causal=self.causal)
        return self.to_out(self.merge_heads(out))
