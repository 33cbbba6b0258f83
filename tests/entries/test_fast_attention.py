"""Fast attention (FANet): equals its explicit n x n cosine-similarity formula; linear in pixels."""

import torch

import zoo
from zoo import probe
from zoo.entries.fast_attention import fast_attention


def qkv(b=2, h=1, n=37, d=8, e=6):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(b, h, n, s, generator=g, dtype=torch.float64) for s in (d, d, e)]


def explicit(q, k, v):
    """The paper's formula before reordering: (Q~ K~^T / n) V with rows l2-normalised, n the
    number of keys."""
    qn = q / q.norm(dim=-1, keepdim=True)
    kn = k / k.norm(dim=-1, keepdim=True)
    return (qn @ kn.transpose(-1, -2) / k.shape[-2]) @ v


def test_equals_explicit_cosine_map():
    q, k, v = qkv()
    torch.testing.assert_close(fast_attention(q, k, v), explicit(q, k, v), rtol=1e-12, atol=1e-12)


def test_padded_positions_are_left_out_and_n_counts_real_ones():
    q, k, v = qkv()
    mask = torch.ones(2, 37, dtype=torch.bool)
    mask[0, 25:] = False
    out = fast_attention(q, k, v, mask)
    torch.testing.assert_close(out[0], explicit(q[0], k[0, :, :25], v[0, :, :25]),
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out[1], explicit(q[1], k[1], v[1]), rtol=1e-12, atol=1e-12)


def test_gradients_match_explicit_map():
    q, k, v = (t.requires_grad_() for t in qkv(n=9))
    grads = torch.autograd.grad(fast_attention(q, k, v).square().sum(), (q, k, v))
    ref = torch.autograd.grad(explicit(q, k, v).square().sum(), (q, k, v))
    for a, b in zip(grads, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_layer_equals_pixelwise_formula():
    layer = zoo.create("fast-attention", dim=6).double()
    x = torch.randn(1, 6, 3, 4, dtype=torch.float64)
    conv = lambda m, t: m.weight[:, :, 0, 0] @ t + m.bias  # noqa: E731 - a 1x1 conv on one pixel
    pixels = [x[0, :, i, j] for i in range(3) for j in range(4)]
    expected = torch.empty_like(x)
    for p, xi in enumerate(pixels):
        qi = conv(layer.to_q, xi)
        y = sum(torch.cosine_similarity(qi, conv(layer.to_k, xj), dim=0) * conv(layer.to_v, xj)
                for xj in pixels) / len(pixels)
        expected[0, :, p // 4, p % 4] = xi + conv(layer.to_out, y)
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-12)


def test_affinities_are_cosines_over_n():
    """Every entry of the effective map is a cosine divided by n: at most 1/n in size, and exactly
    1/n where a query meets itself as a key."""
    layer = zoo.create("fast-attention", dim=16).double()
    q, k, _ = probe.qkv_for(layer, 20)
    assert probe.attention_matrix(layer, q=q, k=k).abs().max() <= 1 / 20 + 1e-15
    a = probe.attention_matrix(layer, q=q, k=q)
    torch.testing.assert_close(a[0].diagonal(), torch.full((20,), 1 / 20, dtype=a.dtype),
                               rtol=1e-12, atol=1e-15)


def test_linear_in_pixels():
    """FLOPs per pixel are the same at every size, and no tensor has n x n elements."""
    s = probe.scaling("fast-attention", ns=(256, 1024, 4096))
    per_pixel = [f / n for f, n in zip(s.flops, s.ns, strict=True)]
    assert per_pixel[0] == per_pixel[1] == per_pixel[2]
    assert all(big < n * n for big, n in zip(s.largest, s.ns, strict=True))
    assert s.largest[2] / s.largest[1] == s.ns[2] / s.ns[1]
