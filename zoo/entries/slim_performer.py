r"""Sub-Linear Memory: How to Make Performers SLiM.

A causal Performer reads prefix sums of key-value outer products, and the gradient of a prefix
sum is again a prefix sum, running the other way. SLiM uses this to train a Performer without
keeping the prefix sums of every token: the sequence is cut into slices of `C` tokens, each
slice only needs the state carried in from the slices before it, and the backward pass rebuilds
what it needs from the inputs, slice by slice, instead of reading stored intermediates. The
layer computes exactly the Performer's output and gradients; what changes is the memory, traded
against recomputation, with `C` setting the trade.

$$ O_i = \frac{\phi(q_i)^\top R_i}{\phi(q_i)^\top r_i}, \qquad
   R_i = \sum_{j \le i} \phi(k_j)\, v_j^\top, \quad r_i = \sum_{j \le i} \phi(k_j) $$
$$ \frac{\partial L}{\partial \phi(q_i)} = \sum_{j \le i} (g_i^\top v_j)\, \phi(k_j), \quad
   \frac{\partial L}{\partial \phi(k_j)} = \sum_{i \ge j} (g_i^\top v_j)\, \phi(q_i), \quad
   \frac{\partial L}{\partial v_j} = \sum_{i \ge j} \big(\phi(q_i)^\top \phi(k_j)\big)\, g_i $$

with $g_i = \partial L / \partial (\phi(q_i)^\top R_i)$ and $\phi$ the FAVOR+ features (see
performer); the normaliser $r$ rides along as one more value column.

Deviations from the paper:
- the slices are processed in parallel: each slice's state is a cumulative sum over slices, so
  one pass holds `O(n m e / C + n C)` of intermediates instead of the paper's sequential loop
  with one `(m, e)` state, and runs in parallel time.
- the custom backward covers the attention's prefix sums only; autograd keeps the features
  (`O(n m)`), where the paper's algorithm recomputes the whole layer slice by slice.
- features, stabilisation, seeding and `redraw` are the performer entry's; the non-causal
  layer is the Performer's.
"""

import torch

from zoo.core.checks import check_qkv
from zoo.core.features import RandomFeatureHeads, favor_plus_features, favor_plus_key_shift
from zoo.core.linear import causal_sum, kernel_attention, kernel_attention_step, prefix_sum, ratio
from zoo.core.masks import zero_padded


def slim_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor,
                             mask: torch.Tensor | None = None, *, causal: bool = False,
                             chunk: int = 64) -> torch.Tensor:
    """The Performer's attention with the paper's plain prefix sums `R_i`, `r_i` over a
    `(b, h, n, m, e)` tensor, differentiated by autograd; `chunk` is unused here."""
    check_qkv(q, k, v, mask, name="slim_attention_reference")
    phi_q, phi_k = favor_plus_features(q, k, w, mask)
    if not causal:
        return kernel_attention(phi_q, phi_k, v, mask)
    v = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)  # the last column sums r_i
    return ratio(prefix_sum(phi_q, zero_padded(phi_k, mask), v))


def reverse_causal_sum(phi_q, phi_k, v, chunk: int) -> torch.Tensor:
    """`out_j = sum_{i >= j} (phi_q_j . phi_k_i) v_i`: a causal sum over the reversed sequence."""
    return causal_sum(*(t.flip(2) for t in (phi_q, phi_k, v)), chunk=chunk).flip(2)


class SlimPrefixSum(torch.autograd.Function):
    """`causal_sum` whose backward is three more causal sums computed from the inputs alone:
    nothing of the forward pass but its inputs is kept."""

    @staticmethod
    def forward(phi_q, phi_k, v, chunk):
        return causal_sum(phi_q, phi_k, v, chunk=chunk)

    @staticmethod
    def setup_context(ctx, inputs, output):
        phi_q, phi_k, v, chunk = inputs
        ctx.save_for_backward(phi_q, phi_k, v)
        ctx.chunk = chunk

    @staticmethod
    def backward(ctx, grad):
        phi_q, phi_k, v = ctx.saved_tensors
        d_q = causal_sum(grad, v, phi_k, chunk=ctx.chunk)
        d_k = reverse_causal_sum(v, grad, phi_q, ctx.chunk)
        d_v = reverse_causal_sum(phi_k, phi_q, grad, ctx.chunk)
        return d_q, d_k, d_v, None


def slim_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor,
                   mask: torch.Tensor | None = None, *, causal: bool = False,
                   chunk: int = 64) -> torch.Tensor:
    """What the layer runs: `slim_attention_reference`, its causal prefix sums computed slice by
    slice with SLiM's low-memory backward (tested equal, outputs and gradients).

    Args:
        q, k: `(b, h, n, d)`. v: `(b, h, n, e)`. w: `(h, m, d)`. mask: `(b, n)`.
        chunk: the slice size `C`.

    Returns:
        `(b, h, n, e)`.
    """
    check_qkv(q, k, v, mask, name="slim_attention")
    phi_q, phi_k = favor_plus_features(q, k, w, mask)
    if not causal:
        return kernel_attention(phi_q, phi_k, v, mask)
    v = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)  # the last column sums the normaliser
    return ratio(SlimPrefixSum.apply(phi_q, zero_padded(phi_k, mask), v, chunk))


class SlimPerformer(RandomFeatureHeads):
    """Multi-head FAVOR+ attention trained with SLiM's prefix sums. `(b, n, dim) -> (b, n, dim)`.

    The hyper-parameters are the Performer's; `chunk` is the paper's slice size `C`.
    """

    def __init__(self, dim: int, *, heads: int = 8, dim_head: int | None = None,
                 causal: bool = False, features: int = 256, orthogonal: bool = True,
                 redraw: bool = False, seed: int = 0, chunk: int = 64):
        super().__init__(dim, heads=heads, dim_head=dim_head, causal=causal, features=features,
                         orthogonal=orthogonal, redraw=redraw, seed=seed, chunk=chunk)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        return slim_attention(q, k, v, self.current_projection(), mask, causal=self.causal,
                              chunk=self.chunk)

    def attend_step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache,
                    mask: torch.Tensor | None = None, start: int = 0):
        """The recurrent form on a chunk, as the Performer's (the same FAVOR+ sums: SLiM changes
        only how the training pass stores them): the `(m, e)` sums carried between chunks."""
        w = self.current_projection()
        phi_q, phi_k = favor_plus_features(q, k, w, mask)
        return kernel_attention_step(phi_q, phi_k, v, cache, mask, chunk=self.chunk,
                                     key_log_scale=favor_plus_key_shift(k, w, mask))
