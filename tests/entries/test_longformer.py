"""Longformer: the dilated window plus global tokens, read off the layer, is the paper's pattern; the
output equals dense softmax on that pattern with the separate global projections."""

import pytest
import torch

import zoo
from zoo import probe
from zoo.core.softmax import softmax_attention
from zoo.entries.longformer import longformer_attention


def paper_pattern(n, w, delta, g, causal):
    """Query i sees key j: j in the (dilated) window of i, or i or j global; j <= i if causal."""
    allowed = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            steps, rest = divmod(i - j, delta)
            in_window = rest == 0 and (0 <= steps <= w // 2 if causal else abs(steps) <= w // 2)
            allowed[i, j] = (in_window or i < g or j < g) and (j <= i or not causal)
    return allowed


def dense_oracle(q, k, v, allowed, g, global_qkv, mask=None):
    def masked_softmax(q, k, v):
        scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        keep = allowed if mask is None else allowed & mask[:, None, None, :]
        return scores.masked_fill(~keep, torch.finfo(q.dtype).min).softmax(-1) @ v

    out = masked_softmax(q, k, v)
    out[:, :, :g] = masked_softmax(*global_qkv)[:, :, :g]
    return out


def qkv(n=37, b=2, h=2, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g, dtype=torch.float64) for _ in range(3)]


CASES = [(w, delta, g, causal) for w, delta, g in ((6, 1, 0), (6, 2, 2), (4, 3, 1), (9, 2, 3))
         for causal in (False, True)]
IDS = [f"w{w}-dil{d}-g{g}-{'causal' if c else 'full'}" for w, d, g, c in CASES]


@pytest.mark.parametrize("w, delta, g, causal", CASES, ids=IDS)
def test_influence_support_is_the_papers_pattern(w, delta, g, causal):
    layer = zoo.create("longformer", dim=16, heads=2, window=w, dilation=delta, global_tokens=g,
                       causal=causal).double()
    x = torch.randn(1, 37, 16, dtype=torch.float64)  # 37: not a multiple of any block
    support = probe.influence(layer, x) > 0
    assert torch.equal(support, paper_pattern(37, w, delta, g, causal))


@pytest.mark.parametrize("w, delta, g, causal", CASES, ids=IDS)
def test_output_and_gradients_equal_dense_softmax_with_global_projections(w, delta, g, causal):
    q, k, v = (t.requires_grad_() for t in qkv())
    qg, kg, vg = (t.requires_grad_() for t in qkv(seed=1))
    mask = torch.ones(2, 37, dtype=torch.bool)
    mask[1, 29:] = False
    mask[1, 1] = False
    out = longformer_attention(q, k, v, mask, window=w, dilation=delta, global_tokens=g,
                               causal=causal, global_qkv=(qg, kg, vg))
    ref = dense_oracle(q, k, v, paper_pattern(37, w, delta, g, causal), g, (qg, kg, vg), mask)
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
