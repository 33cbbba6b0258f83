"""Compressive transformer: all-at-once == streaming == a token-by-token oracle of Algorithm 1;
no output sees a later segment; with unbounded memory it is causal softmax attention."""

import pytest
import torch

import zoo
from zoo.core.softmax import softmax_attention

HP = dict(heads=2, segment_len=8, mem_len=8, cmem_len=4, compression_rate=2)


def make(**overrides):
    torch.manual_seed(0)
    return zoo.create("compressive-transformer", dim=16, **{**HP, **overrides}).double()


def inputs(n=45, b=2, seed=1):
    return torch.randn(b, n, 16, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def oracle(layer, x, boundaries):
    """Algorithm 1 written out per query: for a segment starting at T, the FIFO memory holds inputs
    E .. T-1 with E = c * floor((T - n_m) / c) (at least 0), the compressed memory the last n_cm
    slots f_c(x[u c : (u + 1) c]) with u c < E; attention over [compressed; memory; segment]."""
    c, m, r, h = layer.compression_rate, layer.mem_len, layer.cmem_len, layer.heads
    wq, wk, wv = layer.to_qkv.weight.chunk(3)
    conv_w, conv_b = layer.to_compressed.weight, layer.to_compressed.bias
    out = torch.zeros(x.shape[0], x.shape[1], wq.shape[0], dtype=x.dtype)
    for start, stop in zip(boundaries[:-1], boundaries[1:], strict=True):
        e = max(0, (start - m) // c * c)
        slots = [conv_w @ x[:, u * c:(u + 1) * c].flatten(1).T + conv_b[:, None]
                 for u in range(max(0, e // c - r), e // c)]
        for p in range(start, stop):
            last = p + 1 if layer.causal else stop
            ctx = torch.stack([s.T for s in slots] + [x[:, j] for j in range(e, last)], dim=1)
            for head in range(h):
                rows = slice(head * layer.dim_head, (head + 1) * layer.dim_head)
                q = x[:, p] @ wq[rows].T
                scores = torch.einsum("bd,bjd->bj", q, ctx @ wk[rows].T) * layer.dim_head ** -0.5
                out[:, p, rows] = torch.einsum("bj,bjd->bd", scores.softmax(-1), ctx @ wv[rows].T)
    return layer.to_out(out)


def stream(layer, x, sizes):
    outs, memory = [], None
    for segment in x.split(sizes, dim=1):
        out, memory = layer.segment_step(segment, memory)
        outs.append(out)
    return torch.cat(outs, dim=1), memory


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional-segment", "causal"])
def test_forward_and_streaming_equal_the_oracle(causal):
    layer, x = make(causal=causal), inputs()
    expected = oracle(layer, x, list(range(0, 45, 8)) + [45])
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(stream(layer, x, 8)[0], expected, rtol=1e-10, atol=1e-12)


def test_streaming_with_uneven_segments_equals_the_oracle():
    layer, x = make(causal=True), inputs()
    sizes = [3, 8, 1, 7, 10, 5, 11]
    bounds = torch.tensor([0, *sizes]).cumsum(0).tolist()
    out, (mem, cmem) = stream(layer, x, sizes)
    torch.testing.assert_close(out, oracle(layer, x, bounds), rtol=1e-10, atol=1e-12)
    # after 45 inputs: E = 2 * floor(37 / 2) = 36, so the memory holds x[36:45] and the compressed
    # memory the slots of x[28:36]
    torch.testing.assert_close(mem, x[:, 36:])
    assert cmem.shape == (2, 4, 16)
    torch.testing.assert_close(cmem[:, -1], layer.to_compressed(x[:, 34:36].flatten(1)))


def test_forward_and_streaming_gradients_agree():
    layer, x = make(causal=True), inputs(n=30).requires_grad_()
    grads = torch.autograd.grad(layer(x).square().sum(), (x, *layer.parameters()))
    ref = torch.autograd.grad(stream(layer, x, 8)[0].square().sum(), (x, *layer.parameters()))
    for a, b in zip(grads, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional-segment", "causal"])
def test_no_output_depends_on_a_later_segment(causal):
    layer, x = make(causal=causal), inputs()
    out = layer(x)
    for boundary in (8, 24, 40):
        y = x.clone()
        y[:, boundary:] += 1.0
        changed = layer(y)
        torch.testing.assert_close(changed[:, :boundary], out[:, :boundary], rtol=0, atol=0)
        assert not torch.allclose(changed[:, boundary:], out[:, boundary:])
    if not causal:  # inside a segment, an earlier output does see a later token
        y = x.clone()
        y[:, 15] += 1.0
        assert not torch.allclose(layer(y)[:, 8], out[:, 8])


def test_memory_reaches_back_through_the_compressed_slots():
    """Output 44 (segment 40..44) sees raw inputs from 32 on and compressed inputs 24..31;
    inputs 0..23 have been compressed and pushed out of the 4 compressed slots."""
    layer, x = make(causal=True), inputs()
    out = layer(x)
    for t, sees in ((23, False), (24, True), (31, True), (32, True)):
        y = x.clone()
        y[:, t] += 1.0
        assert (not torch.allclose(layer(y)[:, 44], out[:, 44])) == sees, t


def test_causal_with_unbounded_memory_is_causal_softmax_attention():
    """Transformer-XL's identity: if the memory holds every earlier input, nothing is compressed and
    segment-wise attention is full causal attention."""
    layer, x = make(causal=True, mem_len=48), inputs()
    q, k, v = (t.unflatten(-1, (2, 8)).transpose(1, 2) for t in layer.to_qkv(x).chunk(3, dim=-1))
    ref = layer.to_out(softmax_attention(q, k, v, causal=True).transpose(1, 2).flatten(2))
    torch.testing.assert_close(layer(x), ref, rtol=1e-10, atol=1e-12)


def test_compression_rate_must_divide_segment_and_memory():
    with pytest.raises(ValueError, match="compression_rate=3 must divide segment_len=8"):
        make(compression_rate=3)
