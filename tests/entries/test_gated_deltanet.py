"""Gated DeltaNet: the chunkwise (WY / UT) form equals the step-by-step gated delta rule (outputs
and gradients, the gates' and rates' too); the rule written with the paper's transition matrix;
with alpha = 1 it is DeltaNet's rule, which overwrites where additive writes pile up; padded
tokens vanish; step == forward."""

import pytest
import torch
import torch.nn.functional as F

from tests.oracles import assert_same_outputs_and_grads
from tests.stepping import assert_padded_tokens_vanish, assert_steps_equal_forward, padding_mask, randn
from zoo.entries.gated_deltanet import gated_delta_rule, gated_delta_rule_reference


def inputs(n=37):
    q, k = (F.normalize(randn(2, 3, n, 6, seed=s), dim=-1).requires_grad_() for s in range(2))
    v = randn(2, 3, n, 5, seed=2).requires_grad_()
    beta = torch.sigmoid(randn(2, 3, n, seed=3)).requires_grad_()
    log_alpha = (-0.3 * F.softplus(randn(2, 3, n, seed=4))).requires_grad_()
    return q, k, v, beta, log_alpha


def test_rule_is_the_papers_transition_matrix():
    """S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T, o_t = S_t^T q_t, by hand."""
    q, k, v, beta, log_alpha = (t.detach()[0, 0] for t in inputs(n=7))
    s, outs = torch.zeros(6, 5, dtype=torch.float64), []
    for t in range(7):
        a, b = log_alpha[t].exp(), beta[t]
        transition = a * (torch.eye(6, dtype=torch.float64) - b * torch.outer(k[t], k[t]))
        s = transition @ s + b * torch.outer(k[t], v[t])
        outs.append(s.T @ q[t])
    out = gated_delta_rule_reference(*(t.detach()[:1, :1, :7] for t in inputs(n=7)), causal=True)
    torch.testing.assert_close(out[0, 0], torch.stack(outs), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("chunk", [1, 5, 8, 64])
def test_chunkwise_form_equals_step_by_step_rule(causal, chunk):
    args = inputs()
    mask = padding_mask(37)
    assert_same_outputs_and_grads(gated_delta_rule(*args, mask, causal=causal, chunk=chunk),
                                  gated_delta_rule_reference(*args, mask, causal=causal), args,
                                  rtol=1e-9, atol=1e-11)


def test_without_gates_it_overwrites_where_additive_writes_pile_up():
    """DeltaNet (alpha = 1, beta = 1): writing (k, v1) then (k, v2) leaves v2 under k; linear
    attention's additive state would return v1 + v2."""
    k = torch.tensor([1.0, 0.0], dtype=torch.float64).expand(1, 1, 2, 2)
    v = torch.tensor([[[[1.0, 0.0], [0.0, 3.0]]]], dtype=torch.float64)
    ones, zeros = torch.ones(1, 1, 2, dtype=torch.float64), torch.zeros(1, 1, 2, dtype=torch.float64)
    out = gated_delta_rule(k, k, v, ones, zeros, causal=True, chunk=2)
    torch.testing.assert_close(out[0, 0, 1], v[0, 0, 1], rtol=0, atol=1e-15)
    assert not torch.allclose(out[0, 0, 1], v[0, 0].sum(0))


def test_padded_tokens_neither_write_nor_decay():
    assert_padded_tokens_vanish("gated-deltanet")


def test_step_equals_causal_forward_over_random_splits_and_needs_causal():
    for seed in (0, 1):
        assert_steps_equal_forward("gated-deltanet", seed=seed)
