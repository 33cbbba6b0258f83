"""CBAM: the paper's equations (1)-(3) computed pixel by pixel, and the gating semantics."""

import pytest
import torch

import zoo


def paper_cbam(layer, x):
    """Eq. (1)-(3) written out: the MLP by its weight matrices, the k x k convolution as a sum over
    the zero-padded neighbourhood of each pixel."""
    w0, b0 = layer.mlp[0].weight, layer.mlp[0].bias
    w1, b1 = layer.mlp[2].weight, layer.mlp[2].bias

    def mlp(f):
        return w1 @ torch.relu(w0 @ f + b0) + b1

    out = torch.empty_like(x)
    conv_w, conv_b = layer.spatial.weight[0], layer.spatial.bias[0]  # (2, k, k)
    k = conv_w.shape[-1]
    for b in range(x.shape[0]):
        f = x[b]  # (c, y, x)
        avg, peak = f.mean(dim=(1, 2)), f.flatten(1).max(dim=1).values
        m_c = torch.sigmoid(mlp(avg) + mlp(peak))
        f1 = m_c[:, None, None] * f
        pooled = torch.stack([f1.mean(0), f1.max(0).values])  # [avg; max], (2, y, x)
        hh, ww = f.shape[1:]
        for i in range(hh):
            for j in range(ww):
                s = conv_b.clone()
                for di in range(k):
                    for dj in range(k):
                        ii, jj = i + di - k // 2, j + dj - k // 2
                        if 0 <= ii < hh and 0 <= jj < ww:
                            s = s + conv_w[:, di, dj] @ pooled[:, ii, jj]
                out[b, :, i, j] = torch.sigmoid(s) * f1[:, i, j]
    return out


@pytest.mark.parametrize("kernel_size", [3, 7])
def test_equals_paper_equations(kernel_size):
    layer = zoo.create("cbam", dim=8, reduction=2, kernel_size=kernel_size).double()
    x = torch.randn(2, 8, 5, 6, dtype=torch.float64)
    torch.testing.assert_close(layer(x), paper_cbam(layer, x), rtol=1e-12, atol=1e-12)


def test_gradients_match_paper_equations():
    layer = zoo.create("cbam", dim=4, reduction=2, kernel_size=3).double()
    x = torch.randn(1, 4, 3, 4, dtype=torch.float64, requires_grad=True)
    ours = torch.autograd.grad(layer(x).square().sum(), x)[0]
    ref = torch.autograd.grad(paper_cbam(layer, x).square().sum(), x)[0]
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)


def test_pure_gating_like_the_authors_module():
    """The authors' CBAM (github.com/Jongchan/attention-module; paper Fig. 1-3) returns the input
    multiplied by a channel weight and then a pixel weight, each a sigmoid in (0, 1), with no
    residual: so out / x factors into (b, c, 1, 1) times (b, 1, y, x) with both in (0, 1)."""
    layer = zoo.create("cbam", dim=8, reduction=2).double()
    x = torch.randn(2, 8, 5, 6, dtype=torch.float64)
    ratio = layer(x) / x
    assert bool(((ratio > 0) & (ratio < 1)).all())
    m_c = layer.channel_gate(x)
    m_s = ratio / m_c
    # the remaining factor is the same for every channel: a spatial map
    torch.testing.assert_close(m_s, m_s[:, :1].expand_as(m_s), rtol=1e-10, atol=1e-12)


def test_even_kernel_is_refused():
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        zoo.create("cbam", dim=8, kernel_size=4)
