"""Mamba-2 SSD: the quadratic (masked attention) form equals the linear scan and the chunked SSD
algorithm (outputs and gradients); the mask L is the product of the decays by hand and is
1-semiseparable; padded tokens vanish; step == forward."""

import pytest
import torch

from tests.oracles import assert_same_outputs_and_grads
from tests.stepping import assert_padded_tokens_vanish, assert_steps_equal_forward, padding_mask, randn
from zoo.core.decay import decay_matrix
from zoo.entries.mamba2_ssd import Mamba2SSD, ssd, ssd_reference, ssd_scan


def inputs(n=37):
    x, b, c = (randn(2, 3, n, 8, seed=s).requires_grad_() for s in range(3))
    log_a = (-torch.nn.functional.softplus(randn(2, 3, n, seed=3))).requires_grad_()
    return x, log_a, b, c


def test_mask_is_the_product_of_decays_and_1_semiseparable():
    log_a = inputs(n=9)[1][0, 0].detach()
    a = log_a.exp()
    ell = decay_matrix(log_a[None, None], causal=True)[0, 0]
    for i in range(9):
        for j in range(9):
            want = torch.prod(a[j + 1:i + 1]) if j <= i else torch.tensor(0.0, dtype=torch.float64)
            torch.testing.assert_close(ell[i, j], want, rtol=1e-12, atol=1e-14)
    for s in range(1, 9):  # every block strictly below the diagonal has rank one
        assert torch.linalg.matrix_rank(ell[s:, :s]) == 1


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("chunk", [1, 5, 8, 64])
def test_chunked_algorithm_equals_quadratic_form(causal, chunk):
    x, log_a, b, c = inputs()
    mask = padding_mask(37)
    assert_same_outputs_and_grads(ssd(x, log_a, b, c, mask, causal=causal, chunk=chunk),
                                  ssd_reference(x, log_a, b, c, mask, causal=causal),
                                  (x, log_a, b, c))


def test_linear_scan_equals_quadratic_form():
    x, log_a, b, c = inputs(n=23)
    y, state = None, None
    outs = []
    for t in range(23):
        y, state = ssd_scan(x[:, :, t:t + 1], log_a[:, :, t:t + 1], b[:, :, t:t + 1], c[:, :, t:t + 1], state)
        outs.append(y)
    assert_same_outputs_and_grads(torch.cat(outs, dim=2), ssd_reference(x, log_a, b, c, causal=True),
                                  (x, log_a, b, c))
    assert state.shape == (2, 3, 8, 8)  # the SSM state: d x e per head, whatever the length


def test_padded_tokens_neither_write_nor_decay():
    assert_padded_tokens_vanish("mamba2-ssd")


def test_step_equals_causal_forward_over_random_splits_and_needs_causal():
    for seed in (0, 1):
        assert_steps_equal_forward("mamba2-ssd", seed=seed)



def test_bad_step_size_range_is_refused():
    with pytest.raises(ValueError, match="dt_min"):
        Mamba2SSD(16, heads=2, dt_min=0.5, dt_max=0.1)
