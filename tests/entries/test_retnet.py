"""RetNet: the parallel, chunkwise and recurrent forms of retention agree (outputs and gradients);
the decay mask is gamma^(n-m) by hand; rotated scores depend only on the offset; step == forward."""

import pytest
import torch

from tests.oracles import assert_same_outputs_and_grads
from tests.stepping import assert_steps_equal_forward, padding_mask, randn
from zoo.entries.retnet import RetNet, retention, retention_reference, retention_step, rotate


def inputs(n=37):
    q, k, v = (randn(2, 3, n, 8, seed=s).requires_grad_() for s in range(3))
    log_gamma = torch.tensor([0.9, 0.7, 0.5], dtype=torch.float64).log()
    return q, k, v, log_gamma


def by_hand(q, k, v, gamma, causal):
    """Retention with D written entry by entry."""
    n = q.shape[-2]
    d = torch.tensor([[gamma ** abs(i - j) if (j <= i or not causal) else 0.0 for j in range(n)]
                      for i in range(n)], dtype=torch.float64)
    return (q @ k.transpose(-1, -2) * d) @ v


def test_parallel_form_is_the_decay_mask_by_hand():
    q, k, v, log_gamma = inputs(n=6)
    for causal in (True, False):
        out = retention_reference(q, k, v, log_gamma, causal=causal)
        for h, gamma in enumerate(log_gamma.exp().tolist()):
            want = by_hand(q[:, h], k[:, h], v[:, h], gamma, causal)
            torch.testing.assert_close(out[:, h], want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("chunk", [1, 5, 8, 64])
def test_chunkwise_form_equals_parallel_form(causal, chunk):
    q, k, v, log_gamma = inputs()
    mask = padding_mask(37)
    assert_same_outputs_and_grads(retention(q, k, v, log_gamma, mask, causal=causal, chunk=chunk),
                                  retention_reference(q, k, v, log_gamma, mask, causal=causal),
                                  (q, k, v))


def test_recurrent_form_equals_parallel_form():
    q, k, v, log_gamma = inputs(n=23)
    state, outs = None, []
    for t in range(23):
        out, state = retention_step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], log_gamma, state)
        outs.append(out)
    assert_same_outputs_and_grads(torch.cat(outs, dim=2), retention_reference(q, k, v, log_gamma,
                                                                              causal=True), (q, k, v))
    assert state.shape == (2, 3, 8, 8)  # constant size: d x e per head


def test_gammas_follow_the_paper():
    layer = RetNet(32, heads=4)
    torch.testing.assert_close(layer.log_gamma.exp(), torch.tensor([1 - 2 ** -5, 1 - 2 ** -6,
                                                                    1 - 2 ** -7, 1 - 2 ** -8]))


def test_rotated_scores_depend_only_on_the_offset():
    q, k = randn(1, 1, 1, 8, seed=5), randn(1, 1, 1, 8, seed=6)
    score = [(rotate(q, n) * rotate(k, m)).sum() for n, m in ((3, 1), (10, 8), (2, 0))]
    torch.testing.assert_close(score[0], score[1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(score[0], score[2], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(score[0], (rotate(q, 3) * rotate(k, 0)).sum())


def test_step_equals_causal_forward_over_random_splits_and_needs_causal():
    for seed in (0, 1):
        assert_steps_equal_forward("retnet", seed=seed)



def test_odd_dim_head_is_refused():
    with pytest.raises(ValueError, match="even"):
        RetNet(15, heads=5)
