r"""DeepSeek-V2: A Strong, Economical, and Efficient Mixture-of-Experts Language Model.

Multi-head latent attention (MLA, Sec. 2.1). Keys and values of all heads are up-projections of
one low-rank latent $c^{KV}_t$ of width $d_c$, and that latent is all a decoder caches, with one
small rotary key $k^R_t$ shared by the heads: rotary position embedding cannot be folded through the
up-projection (the rotation sits between query and key), so it rides on a separate, decoupled
part of width $d_h^R$. Queries are compressed too (to $c^Q_t$, for training memory). Because
$q^\top W^{UK} c$ reassociates, the decoder folds $W^{UK}$ into the query projection and $W^{UV}$
into the output projection and attends in the latent space without ever decompressing the cache.

$$ c^{KV}_t = W^{DKV} h_t,\ k^C_t = W^{UK} c^{KV}_t,\ v^C_t = W^{UV} c^{KV}_t,\
   k^R_t = \operatorname{RoPE}(W^{KR} h_t),\ c^Q_t = W^{DQ} h_t,\ q^C_t = W^{UQ} c^Q_t,\
   q^R_t = \operatorname{RoPE}(W^{QR} c^Q_t) $$
$$ o_{t,i} = \sum_{j \le t} \operatorname{softmax}_j\!\Big(\frac{[q^C_{t,i}; q^R_{t,i}]^\top
   [k^C_{j,i}; k^R_j]}{\sqrt{d_h + d_h^R}}\Big)\, v^C_{j,i},\qquad u_t = W^O [o_{t,1}; \dots; o_{t,n_h}] $$

Two forms, tested equal: the explicit one above (`forward`) and the absorbed one (`step`), which
scores $(W^{UK\top}_i W^{UQ}_i c^Q_t)^\top c^{KV}_j$ and maps $\sum_j a_j c^{KV}_j$ out through the folded
$W^O_i W^{UV}_i$.

Deviations from the paper: the RMSNorm layers after the compressed latents and the extra scaling
factors of DeepSeek-V2's released configuration are left out (the equations above are the
mechanism); `causal=False` lets every token read every key, the rotary part unchanged.
"""

import torch
from einops import einsum, rearrange
from torch import nn

from zoo.core.checks import check_dtype, check_sequence, positive_int
from zoo.core.decoding import Cached, append, cached_attention, real_tokens
from zoo.core.masks import zero_padded_tokens


def rope(x: torch.Tensor, start: int = 0, base: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding of `x` `(..., n, r)` at positions `start .. start + n - 1`: pair
    `(x_2m, x_2m+1)` turns by the angle `pos * base^(-2m / r)`."""
    n, r = x.shape[-2], x.shape[-1]
    freq = base ** (-torch.arange(0, r, 2, dtype=x.dtype, device=x.device) / r)
    angle = einsum(torch.arange(start, start + n, dtype=x.dtype, device=x.device), freq, "n, m -> n m")
    cos, sin = angle.cos(), angle.sin()
    even, odd = x[..., 0::2], x[..., 1::2]
    return rearrange(torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1),
                     "... m two -> ... (m two)")


def latent_attention(q_c: torch.Tensor, q_r: torch.Tensor, c_kv: torch.Tensor, k_r: torch.Tensor,
                     w_uk: torch.Tensor, w_uv: torch.Tensor, real: torch.Tensor, *,
                     causal: bool = False) -> torch.Tensor:
    """The explicit form (eq. 41-43): keys and values decompressed from the latent.

    Args:
        q_c: `(b, h, i, d)`, q_r: `(b, h, i, r)`: the queries' compressed and rotary parts.
        c_kv: `(b, j, c)`, the latents; k_r: `(b, j, r)`, the shared rotary keys.
        w_uk: `(h, d, c)`, w_uv: `(h, e, c)`: the up-projections W^UK, W^UV per head.
        real: `(b, j)`, True = real token. causal: the queries are the last `i` positions.

    Returns:
        `(b, h, i, e)`.
    """
    k_c = einsum(c_kv, w_uk, "b j c, h d c -> b h j d")
    v = einsum(c_kv, w_uv, "b j c, h e c -> b h j e")
    k = torch.cat([k_c, rearrange(k_r, "b j r -> b 1 j r").expand(-1, q_c.shape[1], -1, -1)], dim=-1)
    q = torch.cat([q_c, q_r], dim=-1)
    return cached_attention(q, k, v, real, causal=causal)


def latent_attention_absorbed(c_q: torch.Tensor, q_r: torch.Tensor, c_kv: torch.Tensor,
                              k_r: torch.Tensor, w_q_lat: torch.Tensor, w_o_lat: torch.Tensor,
                              real: torch.Tensor, *, dim_head: int, causal: bool = True) -> torch.Tensor:
    """The absorbed form: attention in the latent space with folded weights; the cache is read as is.

    Args:
        c_q: `(b, i, c')`, the query latents; q_r: `(b, h, i, r)`.
        c_kv: `(b, j, c)`, k_r: `(b, j, r)`: the cache.
        w_q_lat: `(h, c, c')` = `W^UK_i^T W^UQ_i`; w_o_lat: `(m, h, c)` = `W^O_i W^UV_i`.
        real: `(b, j)`. dim_head: `d_h`, for the score scale `(d_h + d_h^R)^-1/2`.

    Returns:
        `(b, i, m)`: the output before W^O's bias.
    """
    q = torch.cat([einsum(c_q, w_q_lat, "b i p, h c p -> b h i c"), q_r], dim=-1)
    # one key for all heads: [c^KV_j; k^R_j], and the latent itself as the value
    k = torch.cat([c_kv, k_r], dim=-1)
    pooled = cached_attention(q, k, c_kv, real, causal=causal, scale=(dim_head + k_r.shape[-1]) ** -0.5)
    return einsum(pooled, w_o_lat, "b h i c, m h c -> b i m")


class MultiHeadLatentAttention(Cached, nn.Module):
    """Multi-head latent attention. `(b, n, dim) -> (b, n, dim)`.

    Args:
        dim_head: `d_h`; None means `dim // heads`.
        kv_latent: `d_c`, the width of the cached latent; None means `4 d_h` (the paper's ratio).
        q_latent: `d_c'`, the query latent; None means `12 d_h` (DeepSeek-V2: 1536 for d_h = 128).
        rope_dim: `d_h^R`, the even width of the decoupled rotary part; None means `d_h / 2`.
    """

    def __init__(self, dim: int, *, heads: int = 8, dim_head: int | None = None,
                 causal: bool = False, kv_latent: int | None = None, q_latent: int | None = None,
                 rope_dim: int | None = None):
        super().__init__()
        positive_int(dim, "dim")
        positive_int(heads, "heads")
        if dim_head is None and dim % heads:
            raise ValueError(f"MultiHeadLatentAttention: heads={heads} must divide dim={dim}, or pass "
                             "dim_head")
        d = positive_int(dim // heads if dim_head is None else dim_head, "dim_head")
        c = positive_int(4 * d if kv_latent is None else kv_latent, "kv_latent")
        p = positive_int(12 * d if q_latent is None else q_latent, "q_latent")
        r = positive_int(max(2, d // 2 // 2 * 2) if rope_dim is None else rope_dim, "rope_dim")
        if r % 2:
            raise ValueError(f"rope_dim must be even (rotary pairs), got {r}")
        self.dim, self.heads, self.dim_head, self.causal = dim, heads, d, bool(causal)
        self.kv_latent, self.q_latent, self.rope_dim = c, p, r
        self.to_q_latent = nn.Linear(dim, p, bias=False)  # W^DQ
        self.to_q = nn.Linear(p, heads * d, bias=False)  # W^UQ
        self.to_q_rope = nn.Linear(p, heads * r, bias=False)  # W^QR
        self.to_kv_latent = nn.Linear(dim, c, bias=False)  # W^DKV
        self.to_k = nn.Linear(c, heads * d, bias=False)  # W^UK
        self.to_v = nn.Linear(c, heads * d, bias=False)  # W^UV
        self.to_k_rope = nn.Linear(dim, r, bias=False)  # W^KR
        self.to_out = nn.Linear(heads * d, dim)  # W^O

    def queries(self, x: torch.Tensor, start: int = 0):
        """`c^Q` `(b, n, c')` and the rotary queries `(b, h, n, r)` at positions `start ..`."""
        c_q = self.to_q_latent(x)
        return c_q, rope(rearrange(self.to_q_rope(c_q), "b n (h r) -> b h n r", h=self.heads), start)

    def cache_entries(self, x: torch.Tensor, start: int = 0):
        """What a token leaves in the cache: `c^KV` `(b, n, c)` and `k^R` `(b, n, r)`."""
        return self.to_kv_latent(x), rope(self.to_k_rope(x), start)

    def folded_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`W^UK_i^T W^UQ_i` `(h, c, c')` and `W^O_i W^UV_i` `(m, h, c)`."""
        w_uq, w_uk, w_uv = (rearrange(lin.weight, "(h d) c -> h d c", h=self.heads)
                            for lin in (self.to_q, self.to_k, self.to_v))
        w_o = rearrange(self.to_out.weight, "m (h e) -> m h e", h=self.heads)
        return (einsum(w_uk, w_uq, "h d c, h d p -> h c p"),
                einsum(w_o, w_uv, "m h e, h e c -> m h c"))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        name = type(self).__name__
        check_sequence(x, self.dim, mask, name=name)
        check_dtype(x, self, name=name)
        x = zero_padded_tokens(x, mask)
        c_q, q_r = self.queries(x)
        c_kv, k_r = self.cache_entries(x)
        q_c = rearrange(self.to_q(c_q), "b n (h d) -> b h n d", h=self.heads)
        w_uk, w_uv = (rearrange(lin.weight, "(h d) c -> h d c", h=self.heads)
                      for lin in (self.to_k, self.to_v))
        out = latent_attention(q_c, q_r, c_kv, k_r, w_uk, w_uv, real_tokens(x, mask),
                               causal=self.causal)
        return self.to_out(rearrange(out, "b h n e -> b n (h e)"))

    def decode(self, x: torch.Tensor, cache: dict | None, mask: torch.Tensor | None,
               start: int) -> tuple[torch.Tensor, dict]:
        """One chunk, in the absorbed form. The cache `{c_kv, k_rope, real}` is the latent cache:
        `d_c + d_h^R` numbers per token, against `2 h d_h` for multi-head attention."""
        state = cache or {}
        c_q, q_r = self.queries(x, start)
        c_kv, k_r = self.cache_entries(x, start)
        c_kv, k_r = append(state.get("c_kv"), c_kv, 1), append(state.get("k_rope"), k_r, 1)
        real = append(state.get("real"), real_tokens(x, mask), 1)
        w_q_lat, w_o_lat = self.folded_weights()
        out = latent_attention_absorbed(c_q, q_r, c_kv, k_r, w_q_lat, w_o_lat, real,
                                        dim_head=self.dim_head)
        return out + self.to_out.bias, {"c_kv": c_kv, "k_rope": k_r, "real": real}

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.heads}, dim_head={self.dim_head}, causal={self.causal}, "
                f"kv_latent={self.kv_latent}, q_latent={self.q_latent}, rope_dim={self.rope_dim}")
