"""Criss-cross attention: the paper's per-pixel formula, and what one and two passes can see."""

import pytest
import torch

import zoo
from zoo import probe


def paper_cca(layer, x):
    """One pass of eq. (1)-(2), per pixel u: softmax over Omega_u, the H + W - 1 pixels of u's row
    and column (u itself once, as in the authors' module, which masks the repeat), plus H_u."""
    conv = lambda m, t: m.weight[:, :, 0, 0] @ t + m.bias  # noqa: E731 - a 1x1 conv on one pixel
    _, _, hh, ww = x.shape
    out = torch.empty_like(x)
    for b in range(x.shape[0]):
        for i in range(hh):
            for j in range(ww):
                cross = [(z, j) for z in range(hh)] + [(i, w) for w in range(ww) if w != j]
                q = conv(layer.to_q, x[b, :, i, j])
                scores = torch.stack([q @ conv(layer.to_k, x[b, :, p, r]) for p, r in cross])
                attn = scores.softmax(0)
                agg = sum(a * conv(layer.to_v, x[b, :, p, r])
                          for a, (p, r) in zip(attn, cross, strict=True))
                out[b, :, i, j] = x[b, :, i, j] + agg
    return out


@pytest.mark.parametrize("recurrence", [1, 2])
def test_equals_paper_formula_applied_r_times(recurrence):
    layer = zoo.create("criss-cross-attention", dim=8, reduction=2, recurrence=recurrence).double()
    x = torch.randn(2, 8, 4, 5, dtype=torch.float64)
    expected = x
    for _ in range(recurrence):
        expected = paper_cca(layer, expected)
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)


def test_gradients_match_paper_formula():
    layer = zoo.create("criss-cross-attention", dim=8, reduction=2, recurrence=2).double()
    x = torch.randn(1, 8, 3, 4, dtype=torch.float64, requires_grad=True)
    ours = torch.autograd.grad(layer(x).square().sum(), x)[0]
    ref = torch.autograd.grad(paper_cca(layer, paper_cca(layer, x)).square().sum(), x)[0]
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)


def cross_of(hh, ww):
    """(n, n) bool over pixels in row-major order: True where j is on i's row or column."""
    ys, xs = torch.meshgrid(torch.arange(hh), torch.arange(ww), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    return (ys[:, None] == ys[None, :]) | (xs[:, None] == xs[None, :])


def test_one_pass_sees_only_its_row_and_column():
    hh, ww = 5, 6
    layer = zoo.create("criss-cross-attention", dim=8, recurrence=1).double()
    inf = probe.influence(layer, torch.randn(1, 8, hh, ww, dtype=torch.float64))
    cross = cross_of(hh, ww)
    assert inf[~cross].max().item() == 0.0
    assert inf[cross].min().item() > 1e-6 * inf.max().item()


def test_two_passes_see_every_pixel():
    hh, ww = 5, 6
    layer = zoo.create("criss-cross-attention", dim=8, recurrence=2).double()
    inf = probe.influence(layer, torch.randn(1, 8, hh, ww, dtype=torch.float64))
    off_cross = inf[~cross_of(hh, ww)]
    assert off_cross.numel() == (hh * ww) * (hh - 1) * (ww - 1)
    assert off_cross.min().item() > 1e-6 * inf.max().item()


def test_single_row_and_single_pixel_images():
    """Degenerate crosses: a 1 x w image is one row (plain attention along it); 1 x 1 sees itself."""
    layer = zoo.create("criss-cross-attention", dim=8, reduction=2, recurrence=1).double()
    x = torch.randn(2, 8, 1, 5, dtype=torch.float64)
    torch.testing.assert_close(layer(x), paper_cca(layer, x), rtol=1e-12, atol=1e-12)
    x1 = torch.randn(2, 8, 1, 1, dtype=torch.float64)
    torch.testing.assert_close(layer(x1), x1 + layer.to_v(x1), rtol=1e-12, atol=1e-12)
