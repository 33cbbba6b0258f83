"""RWKV-4: the WKV operator by hand (causal and mirrored); its chunked prefix-sum form and its
running-maximum RNN form equal the all-pairs form (outputs and gradients, decays and bonuses
too); large keys do not overflow; step == forward."""

import math

import pytest
import torch

from tests.oracles import assert_same_outputs_and_grads
from tests.stepping import assert_steps_equal_forward, padding_mask, randn
from zoo.entries.rwkv import wkv, wkv_reference, wkv_step


def inputs(n=37, c=5):
    k, v = randn(2, n, c, seed=0).requires_grad_(), randn(2, n, c, seed=1).requires_grad_()
    w = randn(c, seed=2).exp().requires_grad_()
    u = randn(c, seed=3).requires_grad_()
    return k, v, w, u


@pytest.mark.parametrize("causal", [True, False])
def test_wkv_by_hand(causal):
    k, v, w, u = (t.detach() for t in inputs(n=6, c=2))
    out = wkv_reference(k, v, w, u, causal=causal)
    for t in range(6):
        for ch in range(2):
            num = den = 0.0
            for i in range(6):
                if i == t:
                    e = math.exp(u[ch] + k[0, t, ch])
                elif i < t or not causal:
                    e = math.exp(-(abs(t - i) - 1) * w[ch] + k[0, i, ch])
                else:
                    continue
                num, den = num + e * v[0, i, ch], den + e
            torch.testing.assert_close(out[0, t, ch], num / den, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("chunk", [1, 5, 8, 64])
def test_chunked_form_equals_all_pairs_form(causal, chunk):
    args = inputs()
    mask = padding_mask(37)
    assert_same_outputs_and_grads(wkv(*args, mask, causal=causal, chunk=chunk),
                                  wkv_reference(*args, mask, causal=causal), args)


def test_rnn_form_equals_all_pairs_form():
    k, v, w, u = inputs(n=23)
    mask = padding_mask(23)
    state, outs = None, []
    for t in range(23):
        out, state = wkv_step(k[:, t:t + 1], v[:, t:t + 1], w, u, state, mask[:, t:t + 1])
        outs.append(out)
    assert_same_outputs_and_grads(torch.cat(outs, dim=1), wkv_reference(k, v, w, u, mask, causal=True),
                                  (k, v, w, u))
    assert all(s.shape == (2, 5) for s in state)  # two sums and a maximum per channel


def test_large_keys_do_not_overflow_in_float32():
    k, v, w, u = (t.detach() for t in inputs())
    k = k * 80  # e^k overflows float32 beyond k = 88
    want = wkv_reference(k, v, w, u, causal=True)
    got = wkv(k.float(), v.float(), w.float(), u.float(), causal=True)
    state, steps = None, []
    for t in range(37):
        out, state = wkv_step(k[:, t:t + 1].float(), v[:, t:t + 1].float(), w.float(), u.float(), state)
        steps.append(out)
    for out in (got, torch.cat(steps, dim=1)):
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-4)


def test_step_equals_causal_forward_over_random_splits_and_needs_causal():
    for seed in (0, 1):
        assert_steps_equal_forward("rwkv", seed=seed)
