"""Non-local block: equals the paper's formula computed pixel by pixel."""

import torch

import zoo


def test_equals_pixelwise_formula():
    layer = zoo.create("non-local", dim=6).double()
    x = torch.randn(1, 6, 3, 4, dtype=torch.float64)
    conv = lambda m, t: m.weight[:, :, 0, 0] @ t + m.bias  # noqa: E731 - a 1x1 conv on one pixel
    pixels = [x[0, :, i, j] for i in range(3) for j in range(4)]
    expected = torch.empty_like(x)
    for p, xi in enumerate(pixels):
        weights = torch.stack([conv(layer.theta, xi) @ conv(layer.phi, xj) for xj in pixels])
        weights = weights.softmax(0)
        y = sum(w * conv(layer.g, xj) for w, xj in zip(weights, pixels, strict=True))
        expected[0, :, p // 4, p % 4] = xi + conv(layer.w_z, y)
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-12)
