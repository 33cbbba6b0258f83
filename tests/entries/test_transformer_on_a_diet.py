"""Transformer on a Diet: each pattern read off the layer is the paper's key set for layer l; the
output is dense softmax on it; a stack of dilated layers covers an exponentially long context."""

import pytest
import torch

import zoo
from zoo import probe
from zoo.entries.transformer_on_a_diet import diet_attention, diet_attention_reference, diet_levels


def paper_pattern(n, pattern, layer, k, base, window, causal):
    """Key j for query i, from the definitions: dilated i - b^l m (m < k); memory: any level
    l' <= l; cascade: i - m for m < w b^l. Mirrored (|m|) when not causal."""
    if pattern == "cascade":
        sets = [(1, window * base ** layer)]
    else:
        sets = [(base ** lv, k) for lv in (range(layer + 1) if pattern == "dilated-memory"
                                           else [layer])]
    allowed = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            allowed[i, j] = any((i - j) % dil == 0 and (0 <= (i - j) // dil < count if causal
                                                        else abs(i - j) // dil < count)
                                for dil, count in sets)
    return allowed


def qkv(n=37, b=2, h=2, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g, dtype=torch.float64) for _ in range(3)]


CASES = [(p, layer, causal) for p, layer in (("dilated", 0), ("dilated", 2), ("dilated-memory", 1),
                                             ("dilated-memory", 3), ("cascade", 0), ("cascade", 2))
         for causal in (True, False)]
IDS = [f"{p}-l{layer}-{'causal' if c else 'full'}" for p, layer, c in CASES]


@pytest.mark.parametrize("pattern, layer, causal", CASES, ids=IDS)
def test_support_of_attention_matrix_is_the_papers_pattern(pattern, layer, causal):
    net = zoo.create("transformer-on-a-diet", dim=32, heads=2, pattern=pattern, layer=layer,
                     kernel_size=3, base=2, window=3, causal=causal).double()
    a = probe.attention_matrix(net, n=37)
    expected = paper_pattern(37, pattern, layer, 3, 2, 3, causal)
    for head in a:
        assert torch.equal(head != 0, expected)


@pytest.mark.parametrize("pattern, layer, causal", CASES, ids=IDS)
def test_output_and_gradients_equal_the_reference(pattern, layer, causal):
    q, k, v = (t.requires_grad_() for t in qkv())
    mask = torch.ones(2, 37, dtype=torch.bool)
    mask[1, 31:] = False
    mask[1, 4] = False
    levels = diet_levels(pattern, layer, 3, 2, 3)
    out = diet_attention(q, k, v, mask, levels=levels, causal=causal)
    ref = diet_attention_reference(q, k, v, mask, levels=levels, causal=causal)
    real = mask[:, None, :, None].expand_as(out)
    pairs = [(out[real], ref[real])]
    pairs += zip(torch.autograd.grad((out[real] ** 2).sum(), (q, k, v)),
                 torch.autograd.grad((ref[real] ** 2).sum(), (q, k, v)), strict=True)
    for got, want in pairs:
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_stack_of_dilated_layers_covers_an_exponential_context():
    """WaveNet-style: layers 0..L-1 with k = 2, base 2 reach exactly 2^L - 1 tokens back."""
    reach = torch.eye(40, dtype=torch.bool)
    for layer in range(4):
        p = paper_pattern(40, "dilated", layer, 2, 2, 1, causal=True)
        net = zoo.create("transformer-on-a-diet", dim=32, heads=2, pattern="dilated",
                         layer=layer, kernel_size=2, causal=True).double()
        assert torch.equal(probe.attention_matrix(net, n=40)[0] != 0, p)
        reach = (p.double() @ reach.double()) > 0
    lag = torch.arange(40)[:, None] - torch.arange(40)
    assert torch.equal(reach, (lag >= 0) & (lag < 16))


def test_cascade_window_covering_the_sequence_is_softmax_attention():
    q, k, v = qkv()
    for causal in (True, False):
        out = diet_attention(q, k, v, levels=diet_levels("cascade", 2, 3, 2, 10), causal=causal)
        scores = q @ k.transpose(-1, -2) / 8 ** 0.5
        if causal:
            scores = scores.masked_fill(~torch.ones(37, 37, dtype=torch.bool).tril(), -torch.inf)
        torch.testing.assert_close(out, scores.softmax(-1) @ v, rtol=1e-12, atol=1e-12)


def test_largest_intermediate_is_linear_for_every_pattern():
    e = zoo.entry("transformer-on-a-diet")
    for pattern in ("dilated", "cascade"):
        s = probe.scaling(e, ns=(1024, 4096), make=lambda pattern=pattern, **kw: zoo.create(
            e.id, dim=32, heads=2, pattern=pattern, layer=3, **kw).eval())
        assert abs(s.memory - 1) <= 0.05 and abs(s.time - 1) <= 0.05, (pattern, s)
        assert max(s.largest) <= 4096 * 4 * 32 * 2  # n x (a few windows of 4 * 2^3) x heads
