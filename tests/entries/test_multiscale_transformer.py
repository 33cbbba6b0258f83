"""Multi-scale (retina) attention: the reference reads the blocks W_s(i) defines (a hand-written
case), the fast path equals the reference (maps, outputs with padding, gradients), and the reach
grows geometrically with the scales."""

import pytest
import torch

import zoo
import zoo.core.blocks as blocks
import zoo.entries.multiscale_transformer as multiscale
from tests.layer_checks import (
    assert_empty_batch_gives_empty_output,
    assert_masked_garbage_changes_nothing,
    assert_unchanged_with_references,
)
from tests.oracles import assert_same_outputs_and_grads
from zoo.entries.multiscale_transformer import retina_attention, retina_attention_reference
from zoo.probe import attention_matrix


def qkv(b=2, h=2, n=37, d=8, e=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, s, generator=g, dtype=torch.float64) for s in (d, d, e)]


def test_map_by_hand():
    """n = 4, window 1, ratio 2, two scales, causal: token 3 reads tokens 2 and 3 at scale 0 and
    the complete block {0, 1} before its own block at scale 1, all with one softmax."""
    q, k, v = qkv(b=1, h=1, n=4, d=2, e=4)
    v = torch.eye(4, dtype=torch.float64)[None, None]  # the output is the token-level map
    amap = retina_attention_reference(q, k, v, window=1, ratio=2, scales=2, causal=True)[0, 0, 3]
    keys = torch.stack([k[0, 0, 2], k[0, 0, 3], k[0, 0, :2].mean(0)])
    w = (keys @ q[0, 0, 3] / 2 ** 0.5).softmax(0)
    torch.testing.assert_close(amap, torch.stack([w[2] / 2, w[2] / 2, w[0], w[1]]))


CONFIGS = [(2, 2, 3), (1, 3, 3), (3, 4, 2), (2, 2, 1)]  # window, ratio, scales


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("window, ratio, scales", CONFIGS)
@pytest.mark.parametrize("n", [37, 64])
def test_map_equals_the_reference_map(monkeypatch, n, window, ratio, scales, causal):
    layer = zoo.create("multiscale-transformer", dim=16, heads=2, window=window, ratio=ratio,
                       scales=scales, causal=causal).double()
    q, k, _ = qkv(b=1, n=n)
    amap = attention_matrix(layer, q=q, k=k)
    monkeypatch.setattr(multiscale, "retina_attention", retina_attention_reference)
    torch.testing.assert_close(amap, attention_matrix(layer, q=q, k=k), rtol=1e-12, atol=1e-13)
    if causal:
        assert not (amap.abs().sum(0) > 0).triu(1).any()


def test_reach_grows_geometrically_with_the_scales():
    """Causally, w blocks of r^(S-1) tokens at the top scale: the reach is about w r^(S-1)."""
    n, window, ratio = 200, 2, 3
    for scales in (1, 2, 3, 4):
        layer = zoo.create("multiscale-transformer", dim=16, heads=2, window=window, ratio=ratio,
                           scales=scales, causal=True).double()
        support = attention_matrix(layer, n).abs().sum(0) > 0
        reach = (torch.arange(n)[:, None] - torch.arange(n)[None, :])[support].max().item()
        top = ratio ** (scales - 1)
        assert window * top <= reach < (window + 1) * top + window + 1


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("chunk", [8, 1])
def test_fast_path_equals_reference_with_padding_and_gradients(monkeypatch, causal, chunk):
    monkeypatch.setattr(blocks, "QUERY_BLOCK", 4 if chunk == 1 else blocks.QUERY_BLOCK)
    monkeypatch.setattr(blocks, "CHUNK", chunk)
    q, k, v = (t.requires_grad_() for t in qkv(n=37))
    mask = torch.ones(2, 37, dtype=torch.bool)
    mask[0, 30:] = False
    mask[1, 1::3] = False
    kw = dict(window=2, ratio=2, scales=3, causal=causal)
    out, ref = retina_attention(q, k, v, mask, **kw), retina_attention_reference(q, k, v, mask, **kw)
    real = mask[:, None, :, None]
    assert_same_outputs_and_grads(out * real, ref * real, (q, k, v))


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_layer_is_unchanged_with_the_references(monkeypatch, causal):
    """Both forms of both levels: the retina pattern, and the windows under it."""
    layer = zoo.create("multiscale-transformer", dim=32, heads=2, window=2, ratio=2, scales=3,
                       causal=causal)
    assert_unchanged_with_references(monkeypatch, layer, [
        (multiscale, "retina_attention", retina_attention_reference),
        (multiscale, "node_attention", blocks.node_attention_reference)])


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_masked_garbage_and_empty_batch(causal):
    layer = zoo.create("multiscale-transformer", dim=32, heads=2, window=2, ratio=2, scales=3,
                       causal=causal)
    assert_masked_garbage_changes_nothing(layer)
    assert_empty_batch_gives_empty_output(layer)


def test_ratio_below_two_is_refused():
    with pytest.raises(ValueError, match="ratio must be at least 2"):
        zoo.create("multiscale-transformer", dim=32, ratio=1)
