"""Kronecker attention: both operators against the paper's formulas written out sum by sum, and
the cost of each."""

import pytest
import torch

import zoo
from zoo import probe
from zoo.verify.contract import factory


def averages(x):
    """The lateral averages (one per row, over the width) then the horizontal averages (one per
    column, over the height), as (c,) vectors, by explicit sums."""
    _, hh, ww = x.shape
    lateral = [sum(x[:, i, j] for j in range(ww)) / ww for i in range(hh)]
    horizontal = [sum(x[:, i, j] for i in range(hh)) / hh for j in range(ww)]
    return lateral + horizontal


def attend(layer, queries, tokens):
    """softmax(q . k) v per head, one query at a time, unscaled."""
    d, heads = layer.dim_head, layer.heads
    wq = layer.to_q.weight
    wk, wv = layer.to_kv.weight.chunk(2)
    outs = []
    for t in queries:
        per_head = []
        for h in range(heads):
            rows = slice(h * d, (h + 1) * d)
            q = wq[rows] @ t
            scores = torch.stack([q @ (wk[rows] @ c) for c in tokens])
            weights = torch.softmax(scores, 0)
            per_head.append(sum(w * (wv[rows] @ c) for w, c in zip(weights, tokens, strict=True)))
        outs.append(torch.cat(per_head))
    return outs


def paper_kao(layer, x, variant):
    _, hh, ww = x.shape
    conv = lambda t: layer.to_out.weight[:, :, 0, 0] @ t + layer.to_out.bias  # noqa: E731
    tokens = averages(x)
    out = torch.empty_like(x)
    if variant == "qkv":
        o = attend(layer, tokens, tokens)
        for i in range(hh):
            for j in range(ww):
                out[:, i, j] = conv(o[i] + o[hh + j])  # the outer sum
    else:
        o = attend(layer, [x[:, i, j] for i in range(hh) for j in range(ww)], tokens)
        for p, value in enumerate(o):
            out[:, p // ww, p % ww] = conv(value)
    return out


@pytest.mark.parametrize("variant", ["qkv", "kv"])
@pytest.mark.parametrize("heads", [1, 2])
def test_equals_paper_formula(variant, heads):
    layer = zoo.create("kronecker-attention", dim=6, heads=heads, variant=variant).double()
    x = torch.randn(2, 6, 3, 5, dtype=torch.float64)
    expected = torch.stack([paper_kao(layer, xb, variant) for xb in x])
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)


def test_gradients_match_paper_formula():
    layer = zoo.create("kronecker-attention", dim=4, heads=2).double()
    x = torch.randn(1, 4, 3, 4, dtype=torch.float64, requires_grad=True)
    ours = torch.autograd.grad(layer(x).square().sum(), x)[0]
    ref = torch.autograd.grad(paper_kao(layer, x[0], "qkv").square().sum(), x)[0]
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)


def test_qkv_output_is_an_outer_sum_of_rows_and_columns():
    """Before the output projection, Y_ij = O_i + O_{H+j}: every 2 x 2 minor of each channel
    satisfies Y_ij + Y_kl = Y_il + Y_kj (a rank-2 'sum' structure), which KAO_KV's does not."""
    x = torch.randn(1, 6, 4, 5, dtype=torch.float64)
    for variant, holds in (("qkv", True), ("kv", False)):
        layer = zoo.create("kronecker-attention", dim=6, variant=variant).double()
        with torch.no_grad():
            layer.to_out.weight.copy_(torch.eye(6)[..., None, None])
            layer.to_out.bias.zero_()
        y = layer(x)[0]
        minor = y[:, :-1, :-1] + y[:, 1:, 1:] - y[:, :-1, 1:] - y[:, 1:, :-1]
        assert (minor.abs().max().item() < 1e-12) == holds


def test_variant_costs():
    """KAO_QKV is linear in the pixels (the default, claimed in the catalogue); KAO_KV lets every
    pixel attend to H + W summaries, N^1.5."""
    e = zoo.entry("kronecker-attention")
    make = factory(e, dim=32)
    s = probe.scaling(e, make=lambda **o: make(variant="kv", **o))
    assert abs(s.time - 1.5) <= 0.25 and abs(s.memory - 1.5) <= 0.25, s


def test_unknown_variant_is_refused():
    with pytest.raises(ValueError, match="variant must be one of 'qkv', 'kv'"):
        zoo.create("kronecker-attention", dim=8, variant="q")
