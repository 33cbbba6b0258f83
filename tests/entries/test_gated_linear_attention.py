"""Gated linear attention: the chunkwise form equals the parallel form and the recurrence (outputs
and gradients, the gates' too); the parallel form is the gate products by hand; padded tokens
vanish; step == forward."""

import pytest
import torch
import torch.nn.functional as F

from tests.oracles import assert_same_outputs_and_grads
from tests.stepping import assert_padded_tokens_vanish, assert_steps_equal_forward, padding_mask, randn
from zoo.entries.gated_linear_attention import gla, gla_reference, gla_step


def inputs(n=37):
    q, k, v = (randn(2, 3, n, 6, seed=s).requires_grad_() for s in range(3))
    return q, k, v, F.logsigmoid(randn(2, 3, n, 6, seed=3)).requires_grad_()


def test_parallel_form_is_the_gate_products_by_hand():
    q, k, v, log_alpha = (t[:1, :1, :6].detach() for t in inputs())
    alpha = log_alpha.exp()[0, 0]
    out = gla_reference(q, k, v, log_alpha, causal=True)[0, 0]
    for i in range(6):
        want = sum((q[0, 0, i] * k[0, 0, j] * alpha[j + 1:i + 1].prod(0)).sum() * v[0, 0, j]
                   for j in range(i + 1))
        torch.testing.assert_close(out[i], want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("chunk", [1, 5, 8, 64])
def test_chunkwise_form_equals_parallel_form(causal, chunk):
    q, k, v, log_alpha = inputs()
    mask = padding_mask(37)
    assert_same_outputs_and_grads(gla(q, k, v, log_alpha, mask, causal=causal, chunk=chunk),
                                  gla_reference(q, k, v, log_alpha, mask, causal=causal),
                                  (q, k, v, log_alpha))


def test_recurrence_equals_chunkwise_form():
    q, k, v, log_alpha = inputs(n=23)
    state, outs = None, []
    for t in range(23):
        out, state = gla_step(*(x[:, :, t:t + 1] for x in (q, k, v, log_alpha)), state)
        outs.append(out)
    assert_same_outputs_and_grads(torch.cat(outs, dim=2), gla(q, k, v, log_alpha, causal=True, chunk=4),
                                  (q, k, v, log_alpha))
    assert state.shape == (2, 3, 6, 6)


def test_padded_tokens_neither_write_nor_decay():
    assert_padded_tokens_vanish("gated-linear-attention")


def test_step_equals_causal_forward_over_random_splits_and_needs_causal():
    for seed in (0, 1):
        assert_steps_equal_forward("gated-linear-attention", seed=seed)
