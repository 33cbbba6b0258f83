"""cosFormer: the linear (cos/sin feature) form equals the explicit re-weighted map, which is the
paper's ReLU x cos weight by hand; the sequence limit M is enforced; step == forward."""

import math

import pytest
import torch

from tests.oracles import assert_same_outputs_and_grads
from tests.stepping import assert_steps_equal_forward, padding_mask, randn
from zoo.entries.cosformer import Cosformer, cosformer_attention, cosformer_attention_reference


def test_reference_is_the_re_weighted_relu_map_by_hand():
    q, k, v = randn(1, 1, 5, 4, seed=1), randn(1, 1, 5, 4, seed=2), randn(1, 1, 5, 2, seed=3)
    q[..., 0], k[..., 0] = 1.0, 1.0  # every ReLU dot product positive; the others mixed
    m = 8
    for causal in (False, True):
        out = cosformer_attention_reference(q, k, v, causal=causal, max_len=m)
        for i in range(5):
            w = [float(q[0, 0, i].clamp(min=0) @ k[0, 0, j].clamp(min=0))
                 * math.cos(math.pi / 2 * (i - j) / m) for j in range(5) if j <= i or not causal]
            assert sum(w) > 0
            want = sum(wj * v[0, 0, j] for j, wj in enumerate(w)) / sum(w)
            torch.testing.assert_close(out[0, 0, i], want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("chunk", [1, 8, 64])
def test_linear_form_equals_explicit_map(causal, chunk):
    q, k, v = (randn(2, 3, 37, 8, seed=s).requires_grad_() for s in range(3))
    mask = padding_mask(37)
    for start in (0, 11):
        kw = {"causal": causal, "max_len": 64, "start": start, "chunk": chunk}
        assert_same_outputs_and_grads(cosformer_attention(q, k, v, mask, **kw),
                                      cosformer_attention_reference(q, k, v, mask, **kw), (q, k, v))


def test_sequences_longer_than_max_len_are_refused():
    layer = Cosformer(16, heads=2, max_len=8, causal=True)
    layer(torch.randn(1, 8, 16))
    with pytest.raises(ValueError, match="max_len=8"):
        layer(torch.randn(1, 9, 16))
    _, state = layer.step(torch.randn(1, 6, 16))
    with pytest.raises(ValueError, match="max_len=8"):
        layer.step(torch.randn(1, 3, 16), state)


def test_step_equals_causal_forward_over_random_splits_and_needs_causal():
    for seed in (0, 1):
        assert_steps_equal_forward("cosformer", seed=seed, max_len=40)

