"""RFA: converges to softmax attention over unit queries and keys (temperature set by sigma), and
the gated causal form equals the paper's recurrence, run token by token."""

import pytest
import torch
import torch.nn.functional as F

import zoo
from zoo import probe
from zoo.core.features import gaussian_projection, trig_features
from zoo.core.linear import kernel_attention_recurrent
from zoo.core.softmax import softmax_attention
from zoo.entries.random_feature_attention import random_feature_attention
from zoo.verify.contract import factory, run_contract


def with_grads(out, inputs):
    """The output and the gradients of a fixed scalar function of it."""
    return (out, *torch.autograd.grad(out.square().sum(), inputs))


def randn(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def iid_projection(m, d, seed):
    return gaussian_projection(m, d, orthogonal=False, generator=torch.Generator().manual_seed(seed))[None]


def mean_error(q, k, v, ref, m, sigma=1.0, draws=8):
    errs = [(random_feature_attention(q, k, v, iid_projection(m, q.shape[-1], seed) * sigma) - ref).norm()
            / ref.norm() for seed in range(draws)]
    return torch.stack(errs).mean().item()


def test_converges_to_softmax_attention_of_unit_queries_and_keys():
    q, k, v = randn(1, 1, 24, 8, seed=1), randn(1, 1, 24, 8, seed=2), randn(1, 1, 24, 4, seed=3)
    ref = softmax_attention(F.normalize(q, dim=-1), F.normalize(k, dim=-1), v, scale=1.0)
    errors = [mean_error(q, k, v, ref, m) for m in (4, 32, 256, 2048)]
    assert all(big < small for small, big in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] < 0.05, errors


def test_sigma_sets_the_temperature():
    """With sigma = s the kernel is exp(-s^2 |q - k|^2 / 2): softmax of s^2 q.k over unit vectors."""
    q, k, v = randn(1, 1, 24, 8, seed=1), randn(1, 1, 24, 8, seed=2), randn(1, 1, 24, 4, seed=3)
    qn, kn = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    sharp, flat = (softmax_attention(qn, kn, v, scale=s) for s in (2.25, 1.0))
    errors = [mean_error(q, k, v, sharp, m, sigma=1.5) for m in (256, 4096)]
    assert errors[1] < errors[0] / 2 and errors[1] < 0.1, errors
    assert mean_error(q, k, v, flat, 4096, sigma=1.5) > 0.3  # not the sigma = 1 temperature


def paper_gated_recurrence(q, k, v, w, gate_logits):
    """The paper's gated RFA, token by token, written from its equations."""
    qn, kn = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    b, h, n, e = v.shape
    s = torch.zeros(b, h, 2 * w.shape[1], e, dtype=v.dtype)
    z = torch.zeros(b, h, 2 * w.shape[1], dtype=v.dtype)
    outs = []
    for t in range(n):
        g = torch.sigmoid(gate_logits[:, :, t])[..., None]
        proj_k = torch.einsum("bhd,hmd->bhm", kn[:, :, t], w)
        proj_q = torch.einsum("bhd,hmd->bhm", qn[:, :, t], w)
        phi_k = torch.cat([proj_k.sin(), proj_k.cos()], -1) / w.shape[1] ** 0.5
        phi_q = torch.cat([proj_q.sin(), proj_q.cos()], -1) / w.shape[1] ** 0.5
        s = g[..., None] * s + (1 - g)[..., None] * phi_k[..., None] * v[:, :, t, None, :]
        z = g * z + (1 - g) * phi_k
        outs.append(torch.einsum("bhf,bhfe->bhe", phi_q, s) / (phi_q * z).sum(-1, keepdim=True))
    return torch.stack(outs, dim=2)


@pytest.mark.parametrize("chunk", [1, 4, 64])
def test_gated_chunked_form_equals_paper_recurrence_outputs_and_gradients(chunk):
    inputs = [randn(2, 2, 23, s, seed=i).requires_grad_() for i, s in enumerate((8, 8, 5, 1))]
    q, k, v, raw = inputs
    w = torch.cat([iid_projection(6, 8, seed) for seed in range(2)])
    out = random_feature_attention(q, k, v, w, causal=True, gate_logits=2 * raw[..., 0], chunk=chunk)
    ref = paper_gated_recurrence(q, k, v, w, 2 * raw[..., 0])
    torch.testing.assert_close(with_grads(out, inputs), with_grads(ref, inputs), rtol=1e-8, atol=1e-10)


def test_ungated_causal_form_equals_one_token_at_a_time():
    q, k, v = randn(2, 2, 21, 8, seed=1), randn(2, 2, 21, 8, seed=2), randn(2, 2, 21, 3, seed=3)
    w = torch.cat([iid_projection(6, 8, seed) for seed in range(2)])
    phi_q, phi_k = trig_features(F.normalize(q, dim=-1), w), trig_features(F.normalize(k, dim=-1), w)
    torch.testing.assert_close(random_feature_attention(q, k, v, w, causal=True, chunk=4),
                               kernel_attention_recurrent(phi_q, phi_k, v), rtol=1e-9, atol=1e-10)


def test_closed_gate_keeps_only_the_current_token():
    """g_t -> 0 forgets everything before t: with q = k each output is its own value."""
    q, v = randn(1, 2, 9, 8, seed=1), randn(1, 2, 9, 3, seed=2)
    w = torch.cat([iid_projection(6, 8, seed) for seed in range(2)])
    out = random_feature_attention(q, q, v, w, causal=True, gate_logits=torch.full((1, 2, 9), -60.0))
    torch.testing.assert_close(out, v, rtol=1e-12, atol=1e-12)


def test_gated_layer_keeps_the_contract():
    e = zoo.entry("random-feature-attention")
    base = factory(e)
    assert run_contract(e, lambda **kw: base(**{"causal": True, "gate": True, **kw})) == []


def test_gate_needs_causal():
    with pytest.raises(ValueError, match="gate=True needs causal=True"):
        zoo.create("random-feature-attention", dim=32, gate=True)
    layer = zoo.create("random-feature-attention", dim=32, heads=2, gate=True, causal=True)
    q = torch.randn(1, 2, 5, 16)
    with pytest.raises(ValueError, match="attend needs gate_logits"):
        layer.attend(q, q, q)


def test_gated_layer_is_linear_in_time_and_memory():
    e = zoo.entry("random-feature-attention")
    s = probe.scaling(e, make=lambda **kw: factory(e)(causal=True, gate=True, **kw))
    assert abs(s.time - 1) < 0.1 and abs(s.memory - 1) < 0.1, s
