r"""Transformers are SSMs: Generalized Models and Efficient Algorithms Through Structured State Space Duality.

A selective state-space model whose transition is a scalar per head and step,
$h_t = a_t h_{t-1} + B_t x_t^\top$, $y_t = C_t^\top h_t$, is the same map as masked linear
attention: $Y = (L \odot C B^\top) X$ with $L_{ij} = a_{j+1} \cdots a_i$ below the diagonal, a
1-semiseparable matrix. The quadratic (attention) form and the linear (scan) form are two
algorithms for one function; the paper's SSD algorithm mixes them, quadratic inside chunks and a
scan over the chunks' states. The step sizes $\Delta_t$ are data-dependent, so the decay is too:
$a_t = \exp(\Delta_t A)$, $A < 0$ per head, and the input is scaled by $\Delta_t$.

$$ Y = \operatorname{SSD}(X, A, B, C) = (L \odot C B^\top)\, X + D X, \qquad
   L_{ij} = \exp\Big(\sum_{j < t \le i} \Delta_t A\Big) \text{ for } i \ge j, \text{ else } 0 $$

with $X$ the values (times $\Delta$), $B$ like keys and $C$ like queries, one head of each per head.

Deviations from the paper:
- the SSD layer only: no short convolution, no output gate and norm of the Mamba-2 block; the
  state size equals the head width and $B$, $C$ have one head per head (the paper's
  `ngroups = heads`);
- `causal=False` is ours: the mirrored mask $L_{ij} = \exp(-|\sum_{t \le i} - \sum_{t \le j}|)$,
  a forward and a backward scan;
- padded tokens neither write nor decay ($\Delta = 0$ there), so padding changes nothing.
"""

import math

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from torch import nn

from zoo.core.checks import check_qkv, check_sequence, positive_int
from zoo.core.decay import decay_matrix, decay_recurrence, decayed_sum, fill_padded
from zoo.core.masks import zero_padded_tokens
from zoo.core.shell import MultiHead


def ssd_reference(x: torch.Tensor, log_a: torch.Tensor, b: torch.Tensor, c: torch.Tensor,
                  mask: torch.Tensor | None = None, *, causal: bool = False,
                  chunk: int = 64) -> torch.Tensor:
    r"""The quadratic form: `Y = (L * C B^T) X` with the 1-semiseparable mask `L` (eq. 16).

    Args:
        x: `(batch, h, n, e)`, the inputs times Delta. log_a: `(batch, h, n)`, `Delta A <= 0`.
        b, c: `(batch, h, n, d)`, the SSM's input and output matrices. mask: `(batch, n)`.
        chunk: unused here (the chunked algorithm's size).

    Returns:
        `(batch, h, n, e)`.
    """
    check_qkv(c, b, x, mask, name="ssd")
    log_a, b, x = fill_padded(log_a, mask), fill_padded(b, mask), fill_padded(x, mask)
    scores = einsum(c, b, "z h i d, z h j d -> z h i j") * decay_matrix(log_a, causal=causal)
    return scores @ x


def ssd(x: torch.Tensor, log_a: torch.Tensor, b: torch.Tensor, c: torch.Tensor,
        mask: torch.Tensor | None = None, *, causal: bool = False, chunk: int = 64) -> torch.Tensor:
    """The SSD algorithm (Sec. 6): quadratic within chunks, the states scanned across them. The
    same numbers as `ssd_reference` in linear time."""
    check_qkv(c, b, x, mask, name="ssd")
    log_a, b, x = fill_padded(log_a, mask), fill_padded(b, mask), fill_padded(x, mask)
    return decayed_sum(c, b, x, log_a, causal=causal, chunk=chunk)


def ssd_scan(x, log_a, b, c, state=None, mask=None):
    """The linear form, step by step: `h_t = a_t h_{t-1} + B_t x_t^T`, `y_t = C_t^T h_t`.
    x `(batch, h, t, e)`, log_a `(batch, h, t)`, b, c `(batch, h, t, d)`, state `(batch, h, d, e)`
    or None. Returns `(y (batch, h, t, e), state)`."""
    log_a, b, x = fill_padded(log_a, mask), fill_padded(b, mask), fill_padded(x, mask)
    return decay_recurrence(c, b, x, log_a, state)


class Mamba2SSD(MultiHead):
    """The SSD layer of Mamba-2 (projections, SSD, skip `D`). `(b, n, dim) -> (b, n, dim)`.

    Args:
        dt_min, dt_max: the range of the initial step sizes (log-uniform, as the paper's code).
        chunk: tokens per chunk of the SSD algorithm (no effect on the result).
    """

    def __init__(self, dim: int, *, heads: int = 8, dim_head: int | None = None,
                 causal: bool = False, dt_min: float = 1e-3, dt_max: float = 0.1, chunk: int = 64):
        super().__init__(dim, heads=heads, dim_head=dim_head, causal=causal)
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"Mamba2SSD: need 0 < dt_min <= dt_max, got dt_min={dt_min}, "
                             f"dt_max={dt_max}")
        self.chunk = positive_int(chunk, "chunk")
        self.to_dt = nn.Linear(dim, heads, bias=False)
        g = torch.Generator().manual_seed(0)
        dt = torch.exp(torch.rand(heads, generator=g) * (math.log(dt_max) - math.log(dt_min))
                       + math.log(dt_min))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
        self.a_log = nn.Parameter(torch.log(1 + 15 * torch.rand(heads, generator=g)))  # A in [1, 16]
        self.d = nn.Parameter(torch.ones(heads))

    def project(self, x):
        """C (queries), B (keys), X times Delta (values), log a = Delta A, and X for the skip."""
        c, b, xs = map(self.split_heads, self.to_qkv(x).chunk(3, dim=-1))
        # softplus on a contiguous (b h n) copy: on the permuted view, torch.compile's meta
        # strides for softplus' backward disagree with eager's and AOT autograd's backward
        # fails on a view (torch 2.13; found by zoo compat).
        dt = F.softplus(rearrange(self.to_dt(x) + self.dt_bias, "b n h -> b h n").contiguous())
        return xs * dt[..., None], dt * -self.a_log.exp()[:, None], b, c, xs

    def finish(self, y, xs):
        return self.to_out(self.merge_heads(y + self.d[:, None, None] * xs))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        check_sequence(x, self.dim, mask, name="Mamba2SSD", layer=self)
        x = zero_padded_tokens(x, mask)
        x_dt, log_a, b, c, xs = self.project(x)
        return self.finish(ssd(x_dt, log_a, b, c, mask, causal=self.causal, chunk=self.chunk), xs)

    def decode(self, x: torch.Tensor, cache, mask: torch.Tensor | None, start: int):
        """The linear scan (`step` of the shell): the SSM's `h` `(d, e)` per head carried over."""
        x_dt, log_a, b, c, xs = self.project(x)
        y, cache = ssd_scan(x_dt, log_a, b, c, cache, mask)
        return self.finish(y, xs), cache

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, chunk={self.chunk}"
