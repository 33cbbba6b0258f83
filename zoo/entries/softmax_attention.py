r"""Attention Is All You Need.

The exact baseline: every query scores every key, a softmax turns the scores into weights, and
the output is the weighted sum of the values. Quadratic in the length in time and memory; every
other entry is measured against it.

$$ O = \operatorname{softmax}\!\big(Q K^\top / \sqrt{d}\big)\, V $$

Deviations from the paper: none (dropout on the weights is left out; it is a training detail).
"""

import torch

from zoo.core.decoding import extend_kv, offset_causal
from zoo.core.shell import MultiHead
from zoo.core.softmax import softmax_attention


class SoftmaxAttention(MultiHead):
    """Multi-head softmax attention. `(b, n, dim) -> (b, n, dim)`."""

    def __init__(self, dim: int, *, heads: int = 8, dim_head: int | None = None,
                 causal: bool = False):
        super().__init__(dim, heads=heads, dim_head=dim_head, causal=causal)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        return softmax_attention(q, k, v, mask, causal=self.causal)

    def attend_step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache,
                    mask: torch.Tensor | None = None, start: int = 0):
        """Decoding with a KV cache: the new queries read every cached key up to their position."""
        k, v, mask = cache = extend_kv(cache, k, v, mask, start)
        return softmax_attention(q, k, v, mask, allowed=offset_causal(q.shape[2], start, q.device)), cache
