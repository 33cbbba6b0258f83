"""AutoNL's LightNL block: equals its formula computed pixel by pixel on a small input."""

import pytest
import torch

import zoo
from zoo.entries.autonl import light_non_local


def by_pixels(x, w, channel_ratio, stride):
    """z_i = x_i + DWConv3x3(y)_i with y_i = (1/n) sum_{j on the strided grid}
    <x_i, x_j> over the first channel_ratio * c channels, times x_j over all channels."""
    _, c, hh, ww = x.shape
    used = max(int(channel_ratio * c), 1)
    grid = [(p, q) for p in range(0, hh, stride) for q in range(0, ww, stride)]
    y = torch.zeros_like(x)
    for i in range(hh):
        for j in range(ww):
            for p, q in grid:
                y[0, :, i, j] += (x[0, :used, i, j] @ x[0, :used, p, q]) * x[0, :, p, q]
    y = y / (hh * ww)
    z = x.clone()
    for ch in range(c):  # a 3x3 depthwise convolution with zero padding, written out
        for i in range(hh):
            for j in range(ww):
                for a in (-1, 0, 1):
                    for b in (-1, 0, 1):
                        if 0 <= i + a < hh and 0 <= j + b < ww:
                            z[0, ch, i, j] += w[ch, 0, a + 1, b + 1] * y[0, ch, i + a, j + b]
    return z


@pytest.mark.parametrize("channel_ratio, stride, size", [(0.5, 2, (5, 4)), (0.25, 3, (4, 7)),
                                                          (1.0, 1, (3, 3))],
                         ids=["half-channels-stride2", "quarter-stride3", "full"])
def test_equals_formula_pixel_by_pixel(channel_ratio, stride, size):
    layer = zoo.create("autonl", dim=8, channel_ratio=channel_ratio, stride=stride).double()
    x = torch.randn(1, 8, *size, dtype=torch.float64)
    expected = by_pixels(x, layer.depthwise.weight.detach(), channel_ratio, stride)
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-12)


def test_full_features_give_the_simplified_non_local_form():
    """With every channel and every position, y = (1/n) X X^T X (the paper's shared-transform
    non-local form before compact features), written with an explicit n x n affinity."""
    x = torch.randn(2, 6, 4, 5, dtype=torch.float64)
    flat = x.flatten(2).transpose(1, 2)  # (b, n, c)
    y = (flat @ flat.transpose(1, 2)) @ flat / 20
    out = light_non_local(x, channel_ratio=1.0, stride=1)
    torch.testing.assert_close(out.flatten(2).transpose(1, 2), y, rtol=1e-12, atol=1e-12)


def test_gradients_match_the_explicit_affinity_form():
    x = torch.randn(1, 8, 6, 5, dtype=torch.float64, requires_grad=True)

    def explicit(t):
        flat = t.flatten(2).transpose(1, 2)  # (1, n, c)
        grid = t[:, :, ::2, ::2].flatten(2).transpose(1, 2)  # (1, n_s, c)
        return ((flat[..., :4] @ grid[..., :4].transpose(1, 2)) @ grid / 30).transpose(1, 2)

    g = torch.autograd.grad(light_non_local(x, channel_ratio=0.5, stride=2).square().sum(), x)[0]
    ref = torch.autograd.grad(explicit(x).square().sum(), x)[0]
    torch.testing.assert_close(g, ref, rtol=1e-10, atol=1e-12)


def test_bad_channel_ratio_is_refused():
    for ratio in (0.0, 1.5):
        with pytest.raises(ValueError, match=r"channel_ratio must be in \(0, 1\]"):
            zoo.create("autonl", dim=8, channel_ratio=ratio)
