"""Fast weight programmers: DPFP by its definition, the chunked delta rule against the paper's
update run step by step, and the correction the delta rule makes that additive writes cannot."""

import pytest
import torch

import zoo
from zoo import probe
from zoo.entries.fast_weight_transformer import (
    delta_rule,
    delta_rule_reference,
    delta_rule_step,
    dpfp,
    fast_weight_attention,
    sum_normalised,
)
from zoo.verify.contract import factory


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_dpfp_by_hand():
    """x = (1, -2): r = relu([x, -x]) = (1, 0, 0, 2)."""
    x = torch.tensor([1.0, -2.0], dtype=torch.float64)
    assert dpfp(x, nu=1).tolist() == [1 * 0, 0 * 0, 0 * 2, 2 * 1]
    assert dpfp(x, nu=2).tolist() == [0, 0, 0, 2, 1 * 0, 0 * 2, 0 * 1, 2 * 0]


@pytest.mark.parametrize("nu", [1, 2, 3])
def test_dpfp_matches_its_definition(nu):
    x = randn(3, 5)
    d = x.shape[-1]
    expected = torch.empty(3, 2 * d * nu, dtype=torch.float64)
    for row in range(3):
        r = [max(float(t), 0.0) for t in torch.cat([x[row], -x[row]])]
        for j in range(1, nu + 1):
            for i in range(2 * d):
                expected[row, i + 2 * d * (j - 1)] = r[i] * r[(i + j) % (2 * d)]
    torch.testing.assert_close(dpfp(x, nu), expected, rtol=0, atol=0)
    phi = sum_normalised(expected)
    nonzero = (expected.sum(-1) > 0).to(torch.float64)  # DPFP can vanish: no adjacent positives
    torch.testing.assert_close(phi.sum(-1), nonzero, rtol=1e-15, atol=1e-15)
    assert (phi >= 0).all()


def features(n=37, seed=0, f=12):
    q, k = (sum_normalised(randn(2, 3, n, f, seed=seed + i).abs()) for i in (0, 1))
    return q, k, randn(2, 3, n, 5, seed=seed + 2), torch.sigmoid(randn(2, 3, n, seed=seed + 3))


@pytest.mark.parametrize("chunk", [1, 5, 8, 64])
def test_chunked_delta_rule_equals_the_reference_outputs_and_gradients(chunk):
    inputs = [t.requires_grad_() for t in features()]
    out = delta_rule(*inputs, chunk=chunk)
    ref = delta_rule_reference(*inputs)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    grads = torch.autograd.grad(out.square().sum(), inputs)
    for a, b in zip(grads, torch.autograd.grad(ref.square().sum(), inputs), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_chunked_delta_rule_equals_one_token_at_a_time():
    q, k, v, beta = features(n=23, seed=4)
    state, outs = None, []
    for t in range(23):
        out, state = delta_rule_step(q[:, :, t], k[:, :, t], v[:, :, t], beta[:, :, t], state)
        outs.append(out)
    torch.testing.assert_close(delta_rule(q, k, v, beta, chunk=4), torch.stack(outs, dim=2),
                               rtol=1e-10, atol=1e-12)


def test_bidirectional_form_reads_the_final_fast_weights():
    q, k, v, beta = features(n=19, seed=8)
    torch.testing.assert_close(delta_rule(q, k, v, beta, causal=False, chunk=4),
                               delta_rule_reference(q, k, v, beta, causal=False), rtol=1e-10, atol=1e-12)


def test_delta_rule_overwrites_where_additive_writes_pile_up():
    """Write (k, v1) then (k, v2) with beta = 1 and a one-hot feature: the delta rule returns v2;
    the purely additive fast weights of linear attention return v1 + v2."""
    x = torch.tensor([1.0, -2.0], dtype=torch.float64)  # DPFP: (0, 0, 0, 2) -> one-hot
    k = sum_normalised(dpfp(x)).expand(1, 1, 2, 4)
    v = torch.tensor([[[[1.0, 0.0], [0.0, 3.0]]]], dtype=torch.float64)
    out = delta_rule(k, k, v, torch.ones(1, 1, 2, dtype=torch.float64))
    torch.testing.assert_close(out[0, 0, 1], v[0, 0, 1], rtol=0, atol=1e-15)
    additive = torch.einsum("bhnf,bhne->bhfe", k, v)
    torch.testing.assert_close(torch.einsum("f,fe->e", k[0, 0, 1], additive[0, 0]), v[0, 0].sum(0))


def test_padded_tokens_do_not_write():
    q, k, v = randn(1, 2, 9, 4, seed=1), randn(1, 2, 9, 4, seed=2), randn(1, 2, 9, 3, seed=3)
    beta = torch.sigmoid(randn(1, 2, 9, seed=4))
    mask = torch.ones(1, 9, dtype=torch.bool)
    mask[0, 3] = False
    keep = [0, 1, 2, 4, 5, 6, 7, 8]
    out = fast_weight_attention(q, k, v, beta, mask, causal=True, nu=2, chunk=4)
    alone = fast_weight_attention(q[:, :, keep], k[:, :, keep], v[:, :, keep], beta[:, :, keep],
                                  causal=True, nu=2, chunk=4)
    torch.testing.assert_close(out[:, :, keep], alone, rtol=1e-12, atol=1e-12)


def test_causal_layer_is_linear_in_time_and_memory():
    e = zoo.entry("fast-weight-transformer")
    s = probe.scaling(e, make=lambda **kw: factory(e)(causal=True, **kw))
    assert abs(s.time - 1) < 0.1 and abs(s.memory - 1) < 0.1, s
