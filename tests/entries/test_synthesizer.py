"""Synthesizer: the dense and random variants equal their formulas written out with the layer's
weights; both are bound to max_len; causal outputs do not depend on the length; the random
synthesizer's weights do not depend on the input."""

import dataclasses

import pytest
import torch

import zoo
from zoo.verify.contract import CHECKS, factory


def heads_of(t, h):
    return t.reshape(*t.shape[:-1], h, -1).transpose(-2, -3)  # (b, n, h e) -> (b, h, n, e)


def formula(layer, x, mask=None):
    """O^h = softmax(B^h) G^h(X), B from the paper's formula for the layer's variant, then the
    output projection, with plain matrix products."""
    b, n, _ = x.shape
    h = layer.heads
    if layer.variant == "dense":
        hidden = torch.relu(x @ layer.w1.weight.T + layer.w1.bias)  # (b n dim)
        scores = torch.stack([hidden @ layer.w2[i, :n].T + layer.b2[i, :n] for i in range(h)], 1)
    else:
        scores = layer.r[:, :n, :n].expand(b, h, n, n)
    allowed = torch.ones(b, 1, n, n, dtype=torch.bool)
    if layer.causal:
        allowed = allowed & torch.ones(n, n, dtype=torch.bool).tril()
    if mask is not None:
        allowed = allowed & mask[:, None, None, :]
    attn = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    values = heads_of(x @ layer.to_v.weight.T, h)
    out = (attn @ values).transpose(1, 2).reshape(b, n, -1)
    return out @ layer.to_out.weight.T + layer.to_out.bias


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("variant", ["dense", "random"])
def test_equals_the_papers_formula(variant, causal):
    layer = zoo.create("synthesizer", dim=32, heads=4, variant=variant, max_len=50,
                       causal=causal).double()
    x = torch.randn(2, 37, 32, dtype=torch.float64)
    torch.testing.assert_close(layer(x), formula(layer, x), rtol=1e-12, atol=1e-12)
    mask = torch.ones(2, 37, dtype=torch.bool)
    mask[0, 30:] = False
    mask[1, ::3] = False
    mask[1, 0] = True  # causally, every real query keeps one real key
    out, expected = layer(x, mask=mask), formula(layer, x, mask)
    torch.testing.assert_close(out[mask], expected[mask], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("variant", ["dense", "random"])
def test_input_longer_than_max_len_is_refused(variant):
    layer = zoo.create("synthesizer", dim=32, heads=2, variant=variant, max_len=20)
    assert layer(torch.randn(1, 20, 32)).shape == (1, 20, 32)
    with pytest.raises(ValueError, match=r"length 21, but the synthesized weights cover "
                                         r"max_len=20 positions"):
        layer(torch.randn(1, 21, 32))


@pytest.mark.parametrize("variant", ["dense", "random"])
def test_causal_outputs_do_not_depend_on_the_length(variant):
    """Rows and columns are cut to n: a causal row sees the same weights at any length."""
    layer = zoo.create("synthesizer", dim=32, heads=2, variant=variant, max_len=40,
                       causal=True).double()
    x = torch.randn(2, 40, 32, dtype=torch.float64)
    torch.testing.assert_close(layer(x[:, :23]), layer(x)[:, :23], rtol=1e-12, atol=1e-12)


def test_random_weights_do_not_depend_on_the_input():
    layer = zoo.create("synthesizer", dim=32, heads=2, variant="random", max_len=40).double()
    x1, x2 = torch.randn(2, 1, 31, 32, dtype=torch.float64)
    assert torch.equal(layer.synthesize(x1), layer.synthesize(10 * x2))
    dense = zoo.create("synthesizer", dim=32, heads=2, variant="dense", max_len=40).double()
    assert not torch.allclose(dense.synthesize(x1), dense.synthesize(10 * x2))


def test_contract_holds_for_the_random_variant():
    e = zoo.entry("synthesizer")
    e = dataclasses.replace(e, hparams={**e.hparams, "variant": "random"})
    for check, applies in CHECKS.values():
        if applies(e):
            check(e, factory(e))


def test_only_the_variants_own_parameters_exist():
    dense = dict(zoo.create("synthesizer", dim=32, heads=2, max_len=16).named_parameters())
    rand = dict(zoo.create("synthesizer", dim=32, heads=2, max_len=16,
                           variant="random").named_parameters())
    assert {"w1.weight", "w1.bias", "w2", "b2"} <= set(dense) and "r" not in dense
    assert rand["r"].shape == (2, 16, 16) and not {"w1.weight", "w2"} & set(rand)
    assert "to_qkv.weight" not in dense  # no queries or keys
