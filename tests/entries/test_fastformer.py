"""Fastformer: the layer equals the paper's additive-attention steps computed directly."""

import math

import torch

import zoo
from zoo.entries.fastformer import fastformer_attention


def inputs(b=2, h=3, n=19, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g, dtype=torch.float64) for _ in range(3))
    w_q, w_k = (torch.randn(h, d, generator=g, dtype=torch.float64) for _ in range(2))
    return q, k, v, w_q, w_k


def steps(q, k, v, w_q, w_k, real=None):
    """The paper's steps for one sequence and head, written out with explicit sums:
    alpha_i = exp(w_q.q_i/sqrt d) / sum_j exp(w_q.q_j/sqrt d); q = sum_i alpha_i q_i;
    p_i = q * k_i; beta_i likewise from w_k.p_i; k = sum_i beta_i p_i; u_i = k * v_i.
    `real` lists the positions the sums run over (all by default)."""
    n, d = q.shape
    real = range(n) if real is None else real
    e = [torch.exp(w_q @ q[i] / math.sqrt(d)) for i in real]
    global_q = sum(e_i / sum(e) * q[i] for e_i, i in zip(e, real, strict=True))
    p = [global_q * k[i] for i in range(n)]
    e = [torch.exp(w_k @ p[i] / math.sqrt(d)) for i in real]
    global_k = sum(e_i / sum(e) * p[i] for e_i, i in zip(e, real, strict=True))
    return torch.stack([global_k * v[i] for i in range(n)])


def by_steps(q, k, v, w_q, w_k, mask=None):
    out = torch.empty_like(v)
    for i in range(q.shape[0]):
        real = None if mask is None else mask[i].nonzero().flatten().tolist()
        for h in range(q.shape[1]):
            out[i, h] = steps(q[i, h], k[i, h], v[i, h], w_q[h], w_k[h], real)
    return out


def test_equals_the_additive_attention_steps():
    q, k, v, w_q, w_k = inputs()
    torch.testing.assert_close(fastformer_attention(q, k, v, w_q, w_k), by_steps(q, k, v, w_q, w_k),
                               rtol=1e-12, atol=1e-12)


def test_padded_tokens_are_left_out_of_both_pools():
    q, k, v, w_q, w_k = inputs()
    mask = torch.ones(2, 19, dtype=torch.bool)
    mask[0, 11:] = False
    mask[1, ::3] = False
    out = fastformer_attention(q, k, v, w_q, w_k, mask)
    torch.testing.assert_close(out, by_steps(q, k, v, w_q, w_k, mask), rtol=1e-12, atol=1e-12)


def test_gradients_match_the_steps():
    q, k, v, w_q, w_k = (t.requires_grad_() for t in inputs(b=1, h=2, n=6))
    args = (q, k, v, w_q, w_k)
    grads = torch.autograd.grad(fastformer_attention(*args).square().sum(), args)
    expected = torch.autograd.grad(by_steps(*args).square().sum(), args)
    for a, b in zip(grads, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_zero_pooling_vectors_give_plain_means():
    """With w_q = w_k = 0 both additive attentions are uniform: the global query is the mean
    query and the global key the mean of q * k_i."""
    q, k, v, w_q, w_k = inputs()
    zero = torch.zeros_like(w_q)
    global_q = q.mean(2, keepdim=True)
    expected = (global_q * k).mean(2, keepdim=True) * v
    torch.testing.assert_close(fastformer_attention(q, k, v, zero, zero), expected, rtol=1e-12,
                               atol=1e-12)


def test_layer_output_is_transformed_interaction_plus_query():
    layer = zoo.create("fastformer", dim=12, heads=3).double()
    x = torch.randn(2, 7, 12, dtype=torch.float64)
    q, k, v = (t.reshape(2, 7, 3, 4).transpose(1, 2) for t in (x @ layer.to_qkv.weight.T).chunk(3, -1))
    u = by_steps(q, k, v, layer.w_q.detach(), layer.w_k.detach())
    merge = lambda t: t.transpose(1, 2).reshape(2, 7, 12)  # noqa: E731
    expected = layer.to_out(layer.to_r(merge(u)) + merge(q))
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-12)
