"""Hand-crafted attention: the map is the same for every input, equals the box windows built from
their definition, honours padding, and the prefix sums stay accurate on long float32 inputs."""

import pytest
import torch

import zoo
from zoo.entries.hand_crafted_attention import hand_crafted_attention
from zoo.probe import attention_matrix


def window_map(n, heads, radius, mask=None):
    """`(h, n, n)`: head h spreads weight one evenly over the real j with |i - j| <= radius 2^h - 1."""
    amap = torch.zeros(heads, n, n, dtype=torch.float64)
    for h in range(heads):
        r = radius * 2 ** h - 1
        for i in range(n):
            window = [j for j in range(max(i - r, 0), min(i + r + 1, n))
                      if mask is None or mask[j]]
            amap[h, i, window] = 1.0 / len(window) if window else 0.0
    return amap


@pytest.mark.parametrize("n, heads, radius", [(37, 4, 1), (37, 4, 2), (16, 2, 3), (1, 4, 1)])
def test_map_equals_box_windows(n, heads, radius):
    layer = zoo.create("hand-crafted-attention", dim=8 * heads, heads=heads, radius=radius).double()
    amap = attention_matrix(layer, n)
    torch.testing.assert_close(amap, window_map(n, heads, radius), rtol=1e-13, atol=1e-14)
    assert torch.equal(amap > 0, window_map(n, heads, radius) > 0)  # the support: the windows


def test_map_is_the_same_for_every_input():
    layer = zoo.create("hand-crafted-attention", dim=32, heads=4).double()
    g = torch.Generator().manual_seed(0)
    q1, k1, q2, k2 = (torch.randn(1, 4, 29, 8, generator=g, dtype=torch.float64) * s
                      for s in (1, 1, 100, 0.01))
    assert torch.equal(attention_matrix(layer, q=q1, k=k1), attention_matrix(layer, q=q2, k=k2))
    # and through the whole layer: with weights fixed, the layer is affine in its input
    x1, x2 = (torch.randn(2, 29, 32, generator=g, dtype=torch.float64) for _ in range(2))
    zero = layer(torch.zeros_like(x1))
    torch.testing.assert_close(layer(x1 + 3 * x2) - zero, (layer(x1) - zero) + 3 * (layer(x2) - zero),
                               rtol=1e-12, atol=1e-12)


def test_padding_is_left_out_of_every_window():
    g = torch.Generator().manual_seed(1)
    v = torch.randn(2, 4, 37, 5, generator=g, dtype=torch.float64)
    mask = torch.ones(2, 37, dtype=torch.bool)
    mask[0, 30:] = False
    mask[1, ::3] = False
    out = hand_crafted_attention(v, mask)
    for b in range(2):
        expected = window_map(37, 4, 1, mask[b]) @ v[b]
        torch.testing.assert_close(out[b][:, mask[b]], expected[:, mask[b]], rtol=1e-12, atol=1e-13)


def test_gradient_equals_transposed_map():
    v = torch.randn(1, 3, 23, 4, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(1, 3, 23, 4, dtype=torch.float64)
    (grad,) = torch.autograd.grad((hand_crafted_attention(v, radius=2) * upstream).sum(), v)
    expected = window_map(23, 3, 2).transpose(-1, -2) @ upstream[0]
    torch.testing.assert_close(grad[0], expected, rtol=1e-12, atol=1e-13)


def test_window_means_stay_accurate_on_long_float32_inputs():
    g = torch.Generator().manual_seed(2)
    v = torch.randn(1, 8, 8192, 16, generator=g, dtype=torch.float64)
    exact = hand_crafted_attention(v)
    approx = hand_crafted_attention(v.float())
    # no worse than rounding the input to float32 (2.4e-7 here) and the output back
    assert (approx.double() - exact).abs().max() < 1e-6
