"""Interlaced sparse self-attention: equals the two steps computed pixel by pixel, and a pixel's
influence set is what long-range-then-short-range grouping allows."""

import itertools
import math

import pytest
import torch

import zoo
from zoo import probe


def step(sa, x, groups):
    """One self-attention step, a group at a time: x `(c, y, x)`, groups lists of pixels."""
    out = torch.zeros_like(x)
    for group in groups:
        feats = torch.stack([x[:, p, q] for p, q in group])  # (t c)
        q, k, v = sa.to_qkv(feats).chunk(3, dim=-1)
        attn = (q @ k.T / q.shape[-1] ** 0.5).softmax(-1)
        for (p, r), o in zip(group, sa.to_out(attn @ v), strict=True):
            out[:, p, r] = o
    return out


def paper_groups(y, x, py, px):
    pixels = list(itertools.product(range(y), range(x)))
    long = [[(p, q) for p, q in pixels if (p % py, q % px) == off]
            for off in itertools.product(range(py), range(px))]
    short = [[(p, q) for p, q in pixels if (p // py, q // px) == blk]
             for blk in itertools.product(range(-(-y // py)), range(-(-x // px)))]
    return long, short


@pytest.mark.parametrize("size, block", [((6, 6), None), ((7, 5), 3), ((5, 9), 2), ((3, 4), 8)],
                         ids=["6x6-auto", "7x5-block3", "5x9-block2", "3x4-block8"])
def test_equals_long_then_short_steps_pixel_by_pixel(size, block):
    layer = zoo.create("interlaced-sparse-attention", dim=6, block=block).double()
    x = torch.randn(2, 6, *size, dtype=torch.float64, requires_grad=True)
    py, px = (min(block, s) if block else math.ceil(math.sqrt(s)) for s in size)
    long, short = paper_groups(*size, py, px)
    ref = torch.stack([step(layer.short_range, step(layer.long_range, xi, long), short)
                       for xi in x])
    out = layer(x)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(out.square().sum(), x)[0],
                               torch.autograd.grad(ref.square().sum(), x)[0],
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("size, block", [((6, 6), None), ((7, 5), 3), ((5, 7), 2)],
                         ids=["6x6-auto", "7x5-block3", "5x7-block2"])
def test_influence_support_is_long_range_then_short_range(size, block):
    """Pixel i reads pixel j through the pixel in i's block at j's offset, if that pixel exists."""
    y, x = size
    layer = zoo.create("interlaced-sparse-attention", dim=6, block=block).double()
    support = probe.influence(layer, torch.randn(1, 6, y, x, dtype=torch.float64)) > 0
    py, px = (min(block, s) if block else math.ceil(math.sqrt(s)) for s in size)
    pixels = list(itertools.product(range(y), range(x)))
    expected = torch.tensor([[(pi // py * py + pj % py < y) and (qi // px * px + qj % px < x)
                              for pj, qj in pixels] for pi, qi in pixels])
    assert torch.equal(support, expected)
    if (y % py, x % px) == (0, 0):
        assert support.all()  # the paper's claim: two steps reach every pixel


def test_default_block_is_ceil_sqrt_of_each_side():
    layer = zoo.create("interlaced-sparse-attention", dim=6).double()
    x = torch.randn(1, 6, 10, 17, dtype=torch.float64)
    explicit = zoo.create("interlaced-sparse-attention", dim=6, block=4).double()
    explicit.load_state_dict(layer.state_dict())  # ceil(sqrt(10)) = ceil(sqrt(17)) = 4 and 5
    assert not torch.allclose(layer(x), explicit(x))
    long, short = paper_groups(10, 17, 4, 5)
    ref = step(layer.short_range, step(layer.long_range, x[0], long), short)
    torch.testing.assert_close(layer(x)[0], ref, rtol=1e-10, atol=1e-12)
