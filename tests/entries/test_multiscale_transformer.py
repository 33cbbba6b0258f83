"""Multi-scale (retina) attention: each query reads exactly the windows of pooled blocks the
formula defines, and the layer equals a softmax over those blocks built one query at a time."""

import itertools

import pytest
import torch
from einops import rearrange

import zoo
from zoo.entries.multiscale_transformer import retina_attention
from zoo.probe import attention_matrix


def retina_slots(n, i, window, ratio, scales, causal):
    """(scale, block) pairs query i reads, from the definition of W_s(i)."""
    slots = []
    for s in range(scales):
        size, own = -(-n // ratio ** s), i // ratio ** s
        if causal:
            blocks = range(i - window, i + 1) if s == 0 else range(own - window, own)
        else:
            blocks = range(own - window, own + window + 1)
        slots += [(s, u) for u in blocks if 0 <= u < size]
    return slots


def oracle(q, k, v, window, ratio, scales, causal, mask=None):
    """Per query, a matrix P whose rows average the real tokens of each block it reads; the
    token-level map is softmax(q (P k)^T / sqrt d) P, and the output that map times v.
    Returns the output and the map `(b, h, n, n)`."""
    n, d = q.shape[2:]
    real = torch.ones(q.shape[0], n, dtype=torch.bool) if mask is None else mask
    rows = []
    for bi, i in itertools.product(range(q.shape[0]), range(n)):
        pool = torch.zeros(0, n, dtype=q.dtype)
        for s, u in retina_slots(n, i, window, ratio, scales, causal):
            member = torch.zeros(n, dtype=q.dtype)
            member[u * ratio ** s:(u + 1) * ratio ** s] = 1.0
            member = member * real[bi]
            if member.sum() > 0:
                pool = torch.cat([pool, (member / member.sum())[None]])
        attn = (q[bi, :, i, None] @ (pool @ k[bi]).transpose(-1, -2) * d ** -0.5).softmax(-1)
        rows.append((attn @ pool)[:, 0])  # (h n)
    amap = rearrange(torch.stack(rows), "(b i) h j -> b h i j", i=n)
    return amap @ v, amap


def qkv(b=2, h=2, n=37, d=8, e=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, s, generator=g, dtype=torch.float64) for s in (d, d, e)]


CONFIGS = [(2, 2, 3), (1, 3, 3), (3, 4, 2), (2, 2, 1)]  # window, ratio, scales


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("window, ratio, scales", CONFIGS)
@pytest.mark.parametrize("n", [37, 64])
def test_map_equals_pooled_window_oracle(n, window, ratio, scales, causal):
    layer = zoo.create("multiscale-transformer", dim=16, heads=2, window=window, ratio=ratio,
                       scales=scales, causal=causal).double()
    q, k, v = qkv(b=1, n=n)
    amap = attention_matrix(layer, q=q, k=k)
    _, expected = oracle(q, k, v, window, ratio, scales, causal)
    torch.testing.assert_close(amap, expected[0], rtol=1e-12, atol=1e-13)
    # the support: the union of the blocks the definition lists, nothing else
    support = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for s, u in retina_slots(n, i, window, ratio, scales, causal):
            support[i, u * ratio ** s:(u + 1) * ratio ** s] = True
    assert torch.equal(amap.abs().sum(0) > 0, support)
    if causal:
        assert not support.triu(1).any()


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


def test_padding_is_left_out_of_the_blocks():
    q, k, v = qkv(n=37)
    mask = torch.ones(2, 37, dtype=torch.bool)
    mask[0, 30:] = False
    mask[1, ::3] = False
    out = retina_attention(q, k, v, mask, window=2, ratio=2, scales=3)
    expected, _ = oracle(q, k, v, 2, 2, 3, False, mask)
    real = mask[:, None, :].expand(-1, 2, -1)
    torch.testing.assert_close(out[real], expected[real], rtol=1e-12, atol=1e-13)


def test_gradients_match_oracle():
    q, k, v = (t.requires_grad_() for t in qkv(b=1, n=19))
    out = retina_attention(q, k, v, window=1, ratio=2, scales=3, causal=True)
    ref = oracle(q, k, v, 1, 2, 3, True)[0]
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_ratio_below_two_is_refused():
    with pytest.raises(ValueError, match="ratio must be at least 2"):
        zoo.create("multiscale-transformer", dim=32, ratio=1)
