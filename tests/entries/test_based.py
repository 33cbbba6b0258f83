"""Based: the Taylor feature map's dot product is exp's second-order expansion (so the linear branch
approaches softmax attention with error of third order in the scores); each branch's fast form equals
its dense form (outputs and gradients); decoding equals the causal forward with a state that does not
grow with the context."""

import pytest
import torch

import zoo
from tests.oracles import assert_same_outputs_and_grads, qkv
from tests.stepping import assert_layer_steps_equal_forward, decode, padding, state_elements
from zoo.core.softmax import softmax_attention
from zoo.entries.based import (
    based_linear_attention,
    based_linear_attention_reference,
    sliding_window_attention,
    sliding_window_attention_reference,
    taylor_feature_map,
)

CAUSAL = pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])


def test_feature_dot_product_is_the_second_order_expansion_of_exp():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(5, 6, generator=g, dtype=torch.float64), torch.randn(5, 6, generator=g,
                                                                             dtype=torch.float64)
    s = (q * k).sum(-1) / 6 ** 0.5
    got = (taylor_feature_map(q) * taylor_feature_map(k)).sum(-1)
    torch.testing.assert_close(got, 1 + s + s ** 2 / 2, rtol=1e-13, atol=0)
    assert taylor_feature_map(q).shape[-1] == 1 + 6 + 36


def test_linear_branch_approaches_softmax_with_third_order_error():
    q, k, v = qkv(n=23, d=4)
    errors = []
    for scale in (0.2, 0.1, 0.05):  # the scores scale with q
        exact = softmax_attention(q * scale, k, v, causal=True, scale=4 ** -0.5)
        errors.append((based_linear_attention(q * scale, k, v, causal=True) - exact).norm())
    # halving the scores divides the error by about 2^3 (second order: 4, fourth order: 16)
    assert all(7 < big / small < 9 for big, small in zip(errors, errors[1:], strict=False))


@CAUSAL
def test_linear_branch_prefix_sums_equal_the_kernel_matrix(causal):
    q, k, v = (t.requires_grad_() for t in qkv(n=37, d=4))
    mask = padding(37)
    out = based_linear_attention(q, k, v, mask, causal=causal)
    ref = based_linear_attention_reference(q, k, v, mask, causal=causal)
    assert_same_outputs_and_grads(out, ref, (q, k, v))


@CAUSAL
@pytest.mark.parametrize("window", [1, 2, 5, 40])
def test_window_in_blocks_equals_the_dense_band(window, causal):
    q, k, v = (t.requires_grad_() for t in qkv(n=37))
    mask = padding(37)
    out = sliding_window_attention(q, k, v, mask, window=window, causal=causal)
    ref = sliding_window_attention_reference(q, k, v, mask, window=window, causal=causal)
    assert_same_outputs_and_grads(out, ref, (q, k, v), rtol=1e-12)


def test_window_covering_everything_is_softmax_attention():
    q, k, v = qkv(n=37)
    torch.testing.assert_close(sliding_window_attention(q, k, v, window=37, causal=True),
                               softmax_attention(q, k, v, causal=True), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
def test_step_over_random_splits_equals_the_causal_forward(masked):
    layer = zoo.create("based", dim=32, heads=2, feature_dim=4, window=5, causal=True).double()
    x = torch.randn(2, 23, 32, dtype=torch.float64)
    assert_layer_steps_equal_forward(layer, x, padding(23) if masked else None)


def test_state_does_not_grow_with_the_context():
    layer = zoo.create("based", dim=32, heads=2, feature_dim=4, window=5, causal=True).double()
    sizes = [state_elements(decode(layer, torch.randn(1, n, 32, dtype=torch.float64))[1])
             for n in (9, 40)]
    # sums (2 heads x 21 features x 17) and 4 cached keys and values (2 heads x 16)
    assert sizes[0] == sizes[1] == 2 * 21 * 17 + 2 * 4 * 2 * 16
