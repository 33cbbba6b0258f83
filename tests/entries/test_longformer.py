"""Longformer: the pattern is the paper's (hand-written cases); the dilated window plus global tokens
read off the layer is that pattern; the fast path equals the reference (dense softmax on the
pattern, the global rows with their own projections)."""

import pytest
import torch

import zoo
import zoo.entries.longformer as longformer
from tests.layer_checks import (
    assert_dtype_mismatch_is_refused,
    assert_empty_batch_gives_empty_output,
    assert_masked_garbage_changes_nothing,
    assert_unchanged_with_references,
)
from zoo import probe
from zoo.core.masks import causal_mask
from zoo.core.softmax import softmax_attention
from zoo.entries.longformer import (
    longformer_attention,
    longformer_attention_reference,
    longformer_pattern,
)


def qkv(n=37, b=2, h=2, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g, dtype=torch.float64) for _ in range(3)]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_pattern_by_hand(causal):
    """w = 2 (one key each side), dilation 2, token 0 global."""
    want = torch.tensor([[1, 1, 1, 1, 1, 1],
                         [1, 1, 0, 1, 0, 0],
                         [1, 0, 1, 0, 1, 0],
                         [1, 1, 0, 1, 0, 1],
                         [1, 0, 1, 0, 1, 0],
                         [1, 0, 0, 1, 0, 1]], dtype=torch.bool)
    if causal:  # the left half of the window; j <= i comes from the causal mask
        want = torch.tensor([[1, 1, 1, 1, 1, 1],
                             [1, 1, 0, 0, 0, 0],
                             [1, 0, 1, 0, 0, 0],
                             [1, 1, 0, 1, 0, 0],
                             [1, 0, 1, 0, 1, 0],
                             [1, 0, 0, 1, 0, 1]], dtype=torch.bool)
    assert torch.equal(longformer_pattern(6, 2, 2, 1, causal=causal), want)


CASES = [(w, delta, g, causal) for w, delta, g in ((6, 1, 0), (6, 2, 2), (4, 3, 1), (9, 2, 3))
         for causal in (False, True)]
IDS = [f"w{w}-dil{d}-g{g}-{'causal' if c else 'full'}" for w, d, g, c in CASES]


@pytest.mark.parametrize("w, delta, g, causal", CASES, ids=IDS)
def test_influence_support_is_the_papers_pattern(w, delta, g, causal):
    layer = zoo.create("longformer", dim=16, heads=2, window=w, dilation=delta, global_tokens=g,
                       causal=causal).double()
    x = torch.randn(1, 37, 16, dtype=torch.float64)  # 37: not a multiple of any block
    support = probe.influence(layer, x) > 0
    want = longformer_pattern(37, w, delta, g, causal=causal)
    assert torch.equal(support, want & causal_mask(37, 37) if causal else want)


@pytest.mark.parametrize("w, delta, g, causal", CASES, ids=IDS)
def test_fast_path_equals_reference_with_global_projections(w, delta, g, causal):
    q, k, v = (t.requires_grad_() for t in qkv())
    qg, kg, vg = (t.requires_grad_() for t in qkv(seed=1))
    mask = torch.ones(2, 37, dtype=torch.bool)
    mask[1, 29:] = False
    mask[1, 1] = False
    kw = dict(window=w, dilation=delta, global_tokens=g, causal=causal, global_qkv=(qg, kg, vg))
    out = longformer_attention(q, k, v, mask, **kw)
    ref = longformer_attention_reference(q, k, v, mask, **kw)
    real = mask[:, None, :, None].expand_as(out)
    torch.testing.assert_close(out[real], ref[real], rtol=1e-12, atol=1e-12)
    inputs = (q, k, v, qg, kg, vg)
    grads = torch.autograd.grad((out[real] ** 2).sum(), inputs, allow_unused=True)
    ref_grads = torch.autograd.grad((ref[real] ** 2).sum(), inputs, allow_unused=True)
    for got, want in zip(grads, ref_grads, strict=True):
        if got is None or want is None:  # no global rows: the global projections are unread
            assert g == 0 and not any(t is not None and t.any() for t in (got, want))
        else:
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_layer_is_unchanged_with_the_reference(monkeypatch, causal):
    layer = zoo.create("longformer", dim=32, heads=2, window=6, dilation=2, global_tokens=2,
                       causal=causal)
    with torch.no_grad():  # global projections unlike the local ones
        layer.to_qkv_global.weight.add_(0.1)
    assert_unchanged_with_references(monkeypatch, layer, [
        (longformer, "longformer_attention", longformer_attention_reference)])


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_masked_garbage_and_empty_batch(causal):
    layer = zoo.create("longformer", dim=32, heads=2, window=6, dilation=2, global_tokens=2,
                       causal=causal)
    assert_masked_garbage_changes_nothing(layer)
    assert_empty_batch_gives_empty_output(layer)
    assert_dtype_mismatch_is_refused(layer)


def test_global_projections_start_as_copies_so_a_full_window_is_softmax():
    """Sec. 3.1: Q_g, K_g, V_g are initialised to match Q_s, K_s, V_s."""
    layer = zoo.create("longformer", dim=32, heads=2, window=80, global_tokens=3).double()
    exact = zoo.create("softmax-attention", dim=32, heads=2).double()
    exact.load_state_dict({k: v for k, v in layer.state_dict().items() if "global" not in k})
    assert torch.equal(layer.to_qkv_global.weight, layer.to_qkv.weight)
    x = torch.randn(2, 37, 32, dtype=torch.float64)
    torch.testing.assert_close(layer(x), exact(x), rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        layer.to_qkv_global.weight.add_(0.1)
    changed = (layer(x) - exact(x)).abs().amax(dim=(0, 2))
    assert (changed[:3] > 1e-3).all() and (changed[3:] < 1e-12).all()  # only the global rows


def test_window_covering_the_sequence_is_softmax_attention():
    q, k, v = qkv()
    for causal in (False, True):
        torch.testing.assert_close(longformer_attention(q, k, v, window=74, causal=causal),
                                   softmax_attention(q, k, v, causal=causal), rtol=1e-12,
                                   atol=1e-12)


def test_largest_intermediate_is_linear_in_n_and_in_the_window():
    e = zoo.entry("longformer")
    s = probe.scaling(e, ns=(1024, 4096))
    assert abs(s.memory - 1) <= 0.05 and abs(s.time - 1) <= 0.05
    assert max(s.largest) < 4096 ** 2 / 32  # far from any n x n tensor
