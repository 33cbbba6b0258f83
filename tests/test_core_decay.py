"""zoo.core.decay: the mirrored decay mask by hand (scalar and per-feature gates), the chunkwise
sums against it, and a fill that a NaN behind the mask does not survive."""

import pytest
import torch
import torch.nn.functional as F

from tests.stepping import randn
from zoo.core.decay import decay_matrix, decay_recurrence, decayed_sum, fill_padded


@pytest.mark.parametrize("per_feature", [False, True])
def test_decay_matrix_is_the_product_of_the_gates_between_two_positions(per_feature):
    log_g = F.logsigmoid(randn(1, 1, 6, *([3] if per_feature else []), seed=1))
    g = log_g.exp()[0, 0]
    for causal in (True, False):
        d = decay_matrix(log_g, causal=causal)[0, 0]
        for i in range(6):
            for j in range(6):
                lo, hi = min(i, j), max(i, j)
                want = g[lo + 1:hi + 1].prod(0) if (j <= i or not causal) else torch.zeros_like(g[0])
                torch.testing.assert_close(d[i, j], want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("per_feature", [False, True])
@pytest.mark.parametrize("causal", [True, False])
def test_chunkwise_sums_equal_the_dense_mask(per_feature, causal):
    q, k, v = randn(2, 2, 29, 4, seed=2), randn(2, 2, 29, 4, seed=3), randn(2, 2, 29, 3, seed=4)
    log_g = F.logsigmoid(randn(2, 2, 29, *([4] if per_feature else []), seed=5))
    d = decay_matrix(log_g, causal=causal)
    if per_feature:
        want = torch.einsum("bhid,bhjd,bhijd,bhje->bhie", q, k, d, v)
    else:
        want = (q @ k.transpose(-1, -2) * d) @ v
    for chunk in (1, 6, 64):
        torch.testing.assert_close(decayed_sum(q, k, v, log_g, causal=causal, chunk=chunk), want,
                                   rtol=1e-10, atol=1e-12)
    if causal:
        torch.testing.assert_close(decay_recurrence(q, k, v, log_g)[0], want, rtol=1e-10, atol=1e-12)


def test_fill_padded_selects_so_nan_does_not_survive():
    t = torch.full((1, 2, 3, 4), float("nan"))
    mask = torch.tensor([[True, False, True]])
    out = fill_padded(t, mask)
    assert torch.isnan(out[:, :, [0, 2]]).all() and (out[:, :, 1] == 0).all()
    assert (fill_padded(torch.full((1, 2, 3), float("nan")), mask)[:, :, 1] == 0).all()
