"""Axial attention: equals row-then-column attention computed on the grid one line at a time; a
position's influence set is what the two (masked) axis steps allow."""

import pytest
import torch

import zoo
from zoo import probe
from zoo.entries.axial_attention import axial_attention


def grid_lines(n, width, axis):
    """Raster positions grouped by row or by column of a grid with `width` columns."""
    key = (lambda p: p // width) if axis == "row" else (lambda p: p % width)
    return [[p for p in range(n) if key(p) == g] for g in sorted({key(p) for p in range(n)})]


def line_attention(q, k, v, lines, causal, mask=None):
    """Softmax attention within each line, one line at a time: q, k, v `(h, n, d)`."""
    out = torch.zeros_like(v)
    for line in lines:
        keys = [j for j in line if mask is None or mask[j]]
        for i in line:
            seen = [j for j in keys if j <= i or not causal]
            scores = q[:, i:i + 1] @ k[:, seen].transpose(-1, -2) / q.shape[-1] ** 0.5
            out[:, i] = (scores.softmax(-1) @ v[:, seen])[:, 0]
    return out


@pytest.mark.parametrize("n, width, causal", [(37, 6, False), (37, 6, True), (20, 4, True),
                                              (9, 12, False)],
                         ids=["37-w6-full", "37-w6-causal", "20-w4-causal", "9-w12-full"])
@pytest.mark.parametrize("axis", ["row", "column"])
def test_axis_step_equals_attention_within_each_line(n, width, causal, axis):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 5, generator=g, dtype=torch.float64) for _ in range(3))
    mask = torch.ones(2, n, dtype=torch.bool)
    mask[1, ::4] = False
    mask[1, 0] = True
    out = axial_attention(q, k, v, mask, width=width, axis=axis, causal=causal)
    for b in range(2):
        ref = line_attention(q[b], k[b], v[b], grid_lines(n, width, axis), causal, mask[b])
        real = mask[b]  # a padded query may have no key at all; its output is free
        torch.testing.assert_close(out[b][:, real], ref[:, real], rtol=1e-12, atol=1e-12)


def test_layer_equals_row_then_column_steps_with_its_weights():
    layer = zoo.create("axial-attention", dim=12, heads=3, width=5, causal=True).double()
    x = torch.randn(2, 23, 12, dtype=torch.float64, requires_grad=True)

    def step(x, to_qkv, to_out, axis):
        q, k, v = (t.reshape(23, 3, 4).transpose(0, 1) for t in to_qkv(x).chunk(3, -1))
        out = line_attention(q, k, v, grid_lines(23, 5, axis), causal=True)
        return to_out(out.transpose(0, 1).reshape(23, 12))

    ref = torch.stack([step(step(xi, layer.to_qkv, layer.to_out, "row"), layer.to_qkv_column,
                            layer.to_out_column, "column") for xi in x])
    out = layer(x)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(out.square().sum(), x)[0],
                               torch.autograd.grad(ref.square().sum(), x)[0],
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("n, width", [(37, 6), (36, 6), (30, 4)], ids=["37-w6", "36-w6", "30-w4"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_influence_support_is_row_then_column(n, width, causal):
    """i = (r, c) reads j = (r', c') through (r', c), which must exist; causal: r' <= r, c' <= c."""
    layer = zoo.create("axial-attention", dim=8, heads=2, width=width, causal=causal).double()
    support = probe.influence(layer, torch.randn(1, n, 8, dtype=torch.float64)) > 0
    expected = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            (r, c), (r2, c2) = divmod(i, width), divmod(j, width)
            expected[i, j] = r2 * width + c < n and (not causal or (r2 <= r and c2 <= c))
    assert torch.equal(support, expected)
    if not causal and n % width == 0:
        assert support.all()  # two axis steps reach every position


def test_default_width_is_ceil_sqrt_n():
    layer = zoo.create("axial-attention", dim=8, heads=2).double()
    fixed = zoo.create("axial-attention", dim=8, heads=2, width=7).double()
    fixed.load_state_dict(layer.state_dict())
    x = torch.randn(2, 40, 8, dtype=torch.float64)
    torch.testing.assert_close(layer(x), fixed(x), rtol=0, atol=0)
