"""Linear transformer: parallel == recurrent, and both == the explicit kernel formula."""

import torch
import torch.nn.functional as F

from zoo.entries.linear_transformer import linear_attention, linear_attention_step


def qkv(b=2, h=3, n=37, d=8, e=6):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(b, h, n, s, generator=g, dtype=torch.float64) for s in (d, d, e)]


def explicit(q, k, v, causal):
    """The kernelised attention written as an explicit n x n map of phi(q) . phi(k)."""
    sim = (F.elu(q) + 1) @ (F.elu(k) + 1).transpose(-1, -2)
    if causal:
        sim = sim.tril()
    return (sim / sim.sum(-1, keepdim=True)) @ v


def test_parallel_equals_explicit_map():
    q, k, v = qkv()
    for causal in (False, True):
        torch.testing.assert_close(linear_attention(q, k, v, causal=causal, eps=0.0),
                                   explicit(q, k, v, causal), rtol=1e-10, atol=1e-12)


def test_recurrent_form_equals_parallel_causal_form():
    q, k, v = qkv()
    state, outs = None, []
    for t in range(q.shape[2]):
        out, state = linear_attention_step(q[:, :, t], k[:, :, t], v[:, :, t], state)
        outs.append(out)
    torch.testing.assert_close(torch.stack(outs, dim=2), linear_attention(q, k, v, causal=True),
                               rtol=1e-12, atol=1e-12)


def test_gradients_match_explicit_map():
    q, k, v = (t.requires_grad_() for t in qkv(n=9))
    grads = torch.autograd.grad(linear_attention(q, k, v, causal=True, eps=0.0).sum(), (q, k, v))
    ref = torch.autograd.grad(explicit(q, k, v, True).sum(), (q, k, v))
    for a, b in zip(grads, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
