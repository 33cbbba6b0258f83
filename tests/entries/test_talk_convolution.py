"""TaLK convolutions: the summed-area-table form equals a direct windowed sum, position by
position, with the window ends each token predicts."""

import pytest
import torch

import zoo
from zoo.entries.talk_convolution import talk_convolution

L_MAX, R_MAX = 4, 3


def inputs(b=2, h=3, n=17, e=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(b, h, n, e, generator=g, dtype=torch.float64)
    left, right = (torch.rand(b, h, n, generator=g, dtype=torch.float64) for _ in range(2))
    return v, left, right


def windowed(v, left, right, mask=None):
    """For each token i, the window [i - left_i * l_max, i + right_i * r_max] clipped to the
    sequence; token t counts with the part of the unit cell [t, t + 1) inside [start, end + 1)
    (1 inside, a fraction at the two ends), and the sum is divided by l_max + r_max + 1.
    right=None: the window ends at i."""
    b, h, n, e = v.shape
    out = torch.zeros_like(v)
    for i in range(b):
        for head in range(h):
            for t in range(n):
                start = torch.clamp(t - left[i, head, t] * L_MAX, min=0)
                reach = torch.zeros((), dtype=v.dtype) if right is None else right[i, head, t] * R_MAX
                end = torch.clamp(t + reach, max=n - 1)
                for s in range(n):
                    if mask is None or mask[i, s]:
                        cover = torch.clamp(s - start + 1, 0, 1) * torch.clamp(end - s + 1, 0, 1)
                        out[i, head, t] += cover * v[i, head, s]
    return out / (L_MAX + R_MAX + 1)


@pytest.mark.parametrize("causal", [False, True], ids=["two-sided", "causal"])
def test_summed_area_table_equals_direct_windowed_sum(causal):
    v, left, right = inputs()
    right = None if causal else right
    out = talk_convolution(v, left, right, max_left=L_MAX, max_right=R_MAX)
    torch.testing.assert_close(out, windowed(v, left, right), rtol=1e-12, atol=1e-12)


def test_whole_offsets_give_plain_box_sums():
    """Offsets 1 and 0 give windows of whole tokens: the largest one, and the token alone."""
    v, _, _ = inputs(n=11)
    one, zero = torch.ones(2, 3, 11, dtype=torch.float64), torch.zeros(2, 3, 11, dtype=torch.float64)
    widest = torch.stack([v[:, :, max(i - L_MAX, 0):i + R_MAX + 1].sum(2) for i in range(11)], 2)
    torch.testing.assert_close(talk_convolution(v, one, one, max_left=L_MAX, max_right=R_MAX),
                               widest / (L_MAX + R_MAX + 1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(talk_convolution(v, zero, zero, max_left=L_MAX, max_right=R_MAX),
                               v / (L_MAX + R_MAX + 1), rtol=1e-12, atol=1e-12)


def test_padded_values_count_as_zero():
    v, left, right = inputs()
    mask = torch.ones(2, 17, dtype=torch.bool)
    mask[0, 12:] = False
    mask[1, ::3] = False
    out = talk_convolution(v, left, right, mask, max_left=L_MAX, max_right=R_MAX)
    torch.testing.assert_close(out, windowed(v, left, right, mask), rtol=1e-12, atol=1e-12)


def test_gradients_reach_values_and_offsets():
    v, left, right = (t.requires_grad_() for t in inputs(b=1, h=2, n=9))
    for r in (right, None):
        args = (v, left) if r is None else (v, left, r)
        out = talk_convolution(v, left, r, max_left=L_MAX, max_right=R_MAX)
        grads = torch.autograd.grad(out.square().sum(), args)
        expected = torch.autograd.grad(windowed(v, left, r).square().sum(), args)
        for a, b in zip(grads, expected, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True], ids=["two-sided", "causal"])
def test_layer_predicts_each_tokens_window_from_its_value(causal):
    layer = zoo.create("talk-convolution", dim=12, heads=3, max_left=L_MAX, max_right=R_MAX,
                       causal=causal).double()
    x = torch.randn(2, 10, 12, dtype=torch.float64)
    v = layer.to_v(x)  # (b, n, h * e)
    alpha = torch.sigmoid(layer.to_offsets(v)).reshape(2, 10, -1, 3).permute(2, 0, 3, 1)
    heads = v.reshape(2, 10, 3, 4).transpose(1, 2)
    out = windowed(heads, alpha[0], None if causal else alpha[1])
    expected = layer.to_out(out.transpose(1, 2).reshape(2, 10, 12))
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-12)
