"""FracTAL: the fractal Tanimoto similarity against its definition (by hand and by explicit
sums), its stated properties, and the layer against the paper's formulas."""

from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

import zoo
from zoo.entries.fractal_tanimoto_attention import fractal_tanimoto, fractal_tanimoto_complement


def test_hand_computed_case():
    """p = (1, 0), l = (1, 1): p.l = 1, p.p = 1, l.l = 2, so the level-i term is
    1 / (2^i 3 - (2^(i+1) - 1)) = 1/2, 1/3, 1/5; the complements (0, 1) and (0, 0) give 0."""
    p = torch.tensor([1.0, 0.0], dtype=torch.float64)
    l = torch.tensor([1.0, 1.0], dtype=torch.float64)
    terms = [Fraction(1, 2), Fraction(1, 3), Fraction(1, 5)]
    for depth in (1, 2, 3):
        expected = sum(terms[:depth]) / depth  # 1/2, 5/12, 31/90
        assert fractal_tanimoto(p, l, depth=depth).item() == pytest.approx(float(expected), abs=1e-15)
        assert fractal_tanimoto_complement(p, l, depth=depth).item() == pytest.approx(
            float(expected) / 2, abs=1e-15)


def definition(p, l, depth, smooth=0.0):
    """T^d(p, l) = 1/d sum_{i<d} p.l / (2^i (p.p + l.l) - (2^(i+1) - 1) p.l), sum by sum (with the
    authors' smoothing s added to the numerator and each denominator when s > 0)."""
    pl = sum(a * b for a, b in zip(p, l, strict=True))
    pp = sum(a * a for a in p)
    ll = sum(b * b for b in l)
    return sum((pl + smooth) / (2 ** i * (pp + ll) - (2 ** (i + 1) - 1) * pl + smooth)
               for i in range(depth)) / depth


@pytest.mark.parametrize("depth", [1, 2, 5])
@pytest.mark.parametrize("smooth", [0.0, 1e-5])
def test_equals_definition(depth, smooth):
    g = torch.Generator().manual_seed(depth)
    p, l = torch.rand(2, 6, 7, generator=g, dtype=torch.float64)
    ours = fractal_tanimoto(p, l, depth=depth, dim=-1, smooth=smooth)[:, 0]
    ref = torch.stack([definition(a, b, depth, smooth) for a, b in zip(p, l, strict=True)])
    torch.testing.assert_close(ours, ref, rtol=1e-13, atol=1e-15)
    ours_c = fractal_tanimoto_complement(p, l, depth=depth, dim=-1, smooth=smooth)[:, 0]
    ref_c = torch.stack([0.5 * (definition(a, b, depth, smooth) + definition(1 - a, 1 - b, depth,
                                                                              smooth))
                         for a, b in zip(p, l, strict=True)])
    torch.testing.assert_close(ours_c, ref_c, rtol=1e-13, atol=1e-15)


def test_stated_properties():
    """Depth 1 is the Tanimoto coefficient; identical vectors score 1 at every depth; for
    non-negative vectors the similarity lies in [0, 1]; a deeper similarity is sharper (lower for
    unequal vectors)."""
    g = torch.Generator().manual_seed(0)
    p, l = torch.rand(2, 50, 8, generator=g, dtype=torch.float64)
    pl, pp, ll = (p * l).sum(-1), (p * p).sum(-1), (l * l).sum(-1)
    torch.testing.assert_close(fractal_tanimoto(p, l, depth=1)[:, 0], pl / (pp + ll - pl))
    for depth in (1, 3, 7):
        torch.testing.assert_close(fractal_tanimoto(p, p, depth=depth), torch.ones(50, 1,
                                                                                   dtype=p.dtype))
        sim = fractal_tanimoto(p, l, depth=depth)
        assert bool(((sim >= 0) & (sim <= 1)).all())
    assert bool((fractal_tanimoto(p, l, depth=5) < fractal_tanimoto(p, l, depth=1)).all())


def paper_fractal(layer, x, gamma):
    """A = (T~_channels(Q, K) V + T~_pixels(Q, K) V) / 2 and z = x (1 + gamma A), the two
    similarities by explicit loops over pixels and channels (smooth = 0: the definition)."""
    q, k, v = (torch.sigmoid(F.conv2d(x, m.weight, m.bias, padding=m.padding))
               for m in (layer.to_q, layer.to_k, layer.to_v))
    b, c, hh, ww = x.shape
    out = torch.empty_like(x)
    for n in range(b):
        def both(p, l):
            return 0.5 * (definition(p, l, layer.depth) + definition(1 - p, 1 - l, layer.depth))
        spatial = [[both(q[n, :, i, j], k[n, :, i, j]) for j in range(ww)] for i in range(hh)]
        channel = [both(q[n, a].flatten(), k[n, a].flatten()) for a in range(c)]
        for a in range(c):
            for i in range(hh):
                for j in range(ww):
                    att = 0.5 * (channel[a] * v[n, a, i, j] + spatial[i][j] * v[n, a, i, j])
                    out[n, a, i, j] = x[n, a, i, j] * (1 + gamma * att)
    return out


def test_similarity_maps_have_the_authors_shapes():
    """The authors' FTAttention2D (github.com/feevos/ceecnet, nn/layers/attention.py, documented
    by its shape comments): the spatial similarity reduces over channels to (b, 1, y, x), the
    channel one over pixels to (b, c, 1, 1); both with the complement, depth 5 by default."""
    layer = zoo.create("fractal-tanimoto-attention", dim=4)
    assert layer.depth == 5
    q, k = torch.rand(2, 2, 4, 3, 5).unbind(0)
    assert fractal_tanimoto_complement(q, k, dim=1).shape == (2, 1, 3, 5)
    assert fractal_tanimoto_complement(q, k, dim=(2, 3)).shape == (2, 4, 1, 1)


def test_layer_equals_paper_formulas():
    layer = zoo.create("fractal-tanimoto-attention", dim=3, depth=3, smooth=0.0).double()
    with torch.no_grad():
        layer.gamma.fill_(0.7)
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    torch.testing.assert_close(layer(x), paper_fractal(layer, x, 0.7), rtol=1e-12, atol=1e-12)


def test_gradients_match_paper_formulas():
    layer = zoo.create("fractal-tanimoto-attention", dim=2, depth=2, smooth=0.0).double()
    with torch.no_grad():
        layer.gamma.fill_(1.3)
    x = torch.randn(1, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    ours = torch.autograd.grad(layer(x).square().sum(), x)[0]
    ref = torch.autograd.grad(paper_fractal(layer, x, 1.3).square().sum(), x)[0]
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)


def test_starts_as_identity_and_stays_finite_when_saturated():
    """gamma starts at 0 (the paper's unit starts as its residual branch). With gamma on and the
    query and key sigmoids saturated at exactly 1 in float32, 1 - q and 1 - k are zero vectors and
    the complement is 0 / 0 by the definition; the smoothing keeps it finite."""
    x = torch.randn(2, 8, 5, 6)
    for smooth, finite in ((1e-5, True), (0.0, False)):
        layer = zoo.create("fractal-tanimoto-attention", dim=8, smooth=smooth)
        torch.testing.assert_close(layer(x), x, rtol=0, atol=0)
        with torch.no_grad():
            layer.gamma.fill_(1.0)
            for conv in (layer.to_q, layer.to_k):
                conv.weight.zero_()
                conv.bias.fill_(100.0)
        assert bool(torch.isfinite(layer(x)).all()) == finite
