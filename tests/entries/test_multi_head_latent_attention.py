"""Multi-head latent attention: the explicit form is the paper's eq. (37-44) (against a per-head loop
written here), the absorbed form (folded weights, attention in the latent space) equals it in
outputs and gradients, the rotary part depends only on relative positions, and the decoding cache
holds only the latent and the shared rotary key: (d_c + d_h^R) numbers per token, measured against
multi-head attention's 2 h d_h."""

import math

import pytest
import torch

import zoo
from tests.stepping import assert_layer_steps_equal_forward, decode, padding, state_elements
from zoo.entries.multi_head_latent_attention import rope


def layer_and_input(causal=True, n=23, **kw):
    layer = zoo.create("multi-head-latent-attention", dim=32, heads=2, kv_latent=16, q_latent=24,
                       rope_dim=4, causal=causal, **kw).double()
    return layer, torch.randn(2, n, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))


def paper_loop(layer, x, mask, causal):
    """Eq. (37-44), one head and one query at a time, with the weights written as matrices."""
    h, d, r, n = layer.heads, layer.dim_head, layer.rope_dim, x.shape[1]
    c_q, c_kv = x @ layer.to_q_latent.weight.T, x @ layer.to_kv_latent.weight.T
    q_c, k_c, v_c = c_q @ layer.to_q.weight.T, c_kv @ layer.to_k.weight.T, c_kv @ layer.to_v.weight.T
    q_r = rope((c_q @ layer.to_q_rope.weight.T).unflatten(-1, (h, r)).transpose(1, 2))  # b h n r
    k_r = rope(x @ layer.to_k_rope.weight.T)  # b n r: one rotary key for all heads
    out = torch.zeros(x.shape[0], n, h * d, dtype=x.dtype)
    for b in range(x.shape[0]):
        for t in range(n):
            for i in range(h):
                q = torch.cat([q_c[b, t, i * d:(i + 1) * d], q_r[b, i, t]])
                keys = torch.cat([k_c[b, :, i * d:(i + 1) * d], k_r[b]], dim=-1)
                ok = mask[b] & (torch.arange(n) <= t if causal else True)
                w = torch.softmax((keys @ q / math.sqrt(d + r)).masked_fill(~ok, -math.inf), 0)
                out[b, t, i * d:(i + 1) * d] = w @ v_c[b, :, i * d:(i + 1) * d]
    return layer.to_out(out)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_explicit_form_is_the_papers_equations(causal):
    layer, x = layer_and_input(causal, n=11)
    mask = padding(11)
    torch.testing.assert_close(layer(x, mask=mask)[mask], paper_loop(layer, x, mask, causal)[mask],
                               rtol=1e-12, atol=1e-12)


def test_absorbed_form_equals_explicit_form_outputs_and_gradients():
    layer, x = layer_and_input()
    mask = padding(23)
    x.requires_grad_()
    params = [x, *layer.parameters()]
    explicit = layer(x, mask=mask)
    absorbed, _ = layer.step(x, mask=mask)  # the whole sequence as one chunk: absorbed weights
    torch.testing.assert_close(absorbed, explicit, rtol=1e-10, atol=1e-12)
    grads = torch.autograd.grad(explicit[mask].square().sum(), params)
    for got, want in zip(torch.autograd.grad(absorbed[mask].square().sum(), params), grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_rotary_scores_depend_only_on_the_relative_position():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 8, generator=g, dtype=torch.float64), torch.randn(1, 8, generator=g,
                                                                             dtype=torch.float64)
    score = [(rope(q, s) * rope(k, s - 3)).sum() for s in (3, 10, 50)]
    torch.testing.assert_close(torch.stack(score), score[0].expand(3), rtol=1e-12, atol=1e-12)
    assert not torch.allclose((rope(q, 5) * rope(k, 0)).sum(), score[0])
    torch.testing.assert_close(rope(q, 7).norm(), q.norm(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
def test_step_over_random_splits_equals_the_causal_forward(masked):
    layer, x = layer_and_input()
    mask = padding(23) if masked else None
    assert_layer_steps_equal_forward(layer, x, mask)


def test_cache_holds_the_latent_and_rotary_key_only():
    """At the paper's ratios (d_c = 4 d_h, d_h^R = d_h / 2) the cache is 4.5 d_h per token: what
    grouped-query attention with 2.25 groups would hold, 2.25 / h of multi-head attention's."""
    x = torch.randn(1, 29, 128, dtype=torch.float64)
    mla = zoo.create("multi-head-latent-attention", dim=128, heads=8, causal=True).double()
    mha = zoo.create("grouped-query-attention", dim=128, heads=8, kv_heads=8, causal=True).double()
    _, state = decode(mla, x)
    assert {k: tuple(v.shape) for k, v in state.cache.items()} == {
        "c_kv": (1, 29, 64), "k_rope": (1, 29, 8), "real": (1, 29)}
    d_h = 16
    assert state_elements(state) == 29 * (4 * d_h + d_h // 2)
    assert state_elements(decode(mha, x)[1]) == 29 * 2 * 8 * d_h
    assert state_elements(state) * 8 == state_elements(decode(mha, x)[1]) * 2.25


def test_bad_hyper_parameters_are_refused():
    for bad in ({"rope_dim": 3}, {"kv_latent": 0}, {"q_latent": -1}, {"rope_dim": 2.0}):
        with pytest.raises(ValueError):
            zoo.create("multi-head-latent-attention", dim=32, heads=2, **bad)
