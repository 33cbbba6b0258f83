"""Memformer: forward == streaming == a slot-by-slot, token-by-token oracle; slots write without
seeing each other; no output sees a later segment; padding stays out of outputs and memory."""

import pytest
import torch
import torch.nn.functional as F

import zoo


def make(**overrides):
    torch.manual_seed(0)
    layer = zoo.create("memformer", dim=12, **{"heads": 2, "segment_len": 5, "num_slots": 3,
                                                **overrides}).double()
    with torch.no_grad():  # a non-zero forgetting bias, so the test sees it
        layer.memory_bias.normal_()
    return layer


def inputs(n=17, b=2, seed=1):
    return torch.randn(b, n, 12, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def heads_attend(q, keys, values, h):
    """Softmax attention of one query vector per batch over a list of key rows, head by head."""
    out = []
    for qh, kh, vh in zip(q.chunk(h, -1), keys.chunk(h, -1), values.chunk(h, -1), strict=True):
        w = (torch.einsum("bd,bjd->bj", qh, kh) * qh.shape[-1] ** -0.5).softmax(-1)
        out.append(torch.einsum("bj,bjd->bd", w, vh))
    return torch.cat(out, -1)


def oracle(layer, x, size):
    wq, wk, wv = layer.to_qkv.weight.chunk(3)
    uk, uv = layer.write_kv.weight.chunk(2)
    memory = layer.initial_memory.expand(x.shape[0], -1, -1)
    outs = []
    for start in range(0, x.shape[1], size):
        seg = x[:, start:start + size]
        ys = []
        for p in range(seg.shape[1]):
            ctx = torch.cat([memory, seg[:, :p + 1] if layer.causal else seg], dim=1)
            ys.append(layer.to_out(heads_attend(seg[:, p] @ wq.T, ctx @ wk.T, ctx @ wv.T, layer.heads)))
        y = torch.stack(ys, dim=1)
        slots = []
        for i in range(memory.shape[1]):
            ctx = torch.cat([memory[:, i:i + 1], y], dim=1)  # slot i and the outputs, no other slot
            new = layer.write_out(heads_attend(memory[:, i] @ layer.write_q.weight.T, ctx @ uk.T,
                                               ctx @ uv.T, layer.heads)) + layer.memory_bias[i]
            slots.append(new / new.norm(dim=-1, keepdim=True))
        memory = torch.stack(slots, dim=1)
        outs.append(y)
    return torch.cat(outs, dim=1), memory


def stream(layer, x, size, mask=None):
    outs, memory = [], None
    for t, seg in enumerate(x.split(size, dim=1)):
        part = None if mask is None else mask[:, t * size:(t + 1) * size]
        out, memory = layer.segment_step(seg, memory, part)
        outs.append(out)
    return torch.cat(outs, dim=1), memory


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional-segment", "causal"])
def test_forward_and_streaming_equal_the_oracle(causal):
    layer, x = make(causal=causal), inputs()
    expected, expected_memory = oracle(layer, x, 5)
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-12)
    out, memory = stream(layer, x, 5)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(memory, expected_memory, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(memory.norm(dim=-1), torch.ones(2, 3, dtype=torch.float64))


def test_gradients_equal_the_oracle():
    layer, x = make(causal=True), inputs(n=12).requires_grad_()
    grads = torch.autograd.grad(layer(x).square().sum(), (x, *layer.parameters()))
    ref = torch.autograd.grad(oracle(layer, x, 5)[0].square().sum(), (x, *layer.parameters()))
    for a, b in zip(grads, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_slots_write_without_seeing_each_other():
    """d(new slot i) / d(old slot j) is zero for i != j: the write is slot-wise."""
    layer, x = make(), inputs(n=5)
    memory = F.normalize(torch.randn(2, 3, 12, dtype=torch.float64), dim=-1)
    y = layer.segment_step(x, memory)[0].detach()
    keep = torch.ones(2, 5, dtype=torch.bool)
    jac = torch.autograd.functional.jacobian(lambda m: layer.write(m, y, keep), memory)
    blocks = jac[0, :, :, 0, :, :].abs().sum(dim=(1, 3))  # (new slot, old slot)
    assert (blocks.diagonal() > 0).all()
    torch.testing.assert_close(blocks - torch.diag(blocks.diagonal()), torch.zeros(3, 3,
                               dtype=torch.float64), rtol=0, atol=0)


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional-segment", "causal"])
def test_no_output_depends_on_a_later_segment(causal):
    layer, x = make(causal=causal), inputs()
    out = layer(x)
    for boundary in (5, 10, 15):
        y = x.clone()
        y[:, boundary:] += 1.0
        changed = layer(y)
        torch.testing.assert_close(changed[:, :boundary], out[:, :boundary], rtol=0, atol=0)
        assert not torch.allclose(changed[:, boundary:], out[:, boundary:])


def test_earlier_segments_reach_later_outputs_only_through_memory():
    layer, x = make(causal=True), inputs()
    out = layer(x)
    y = x.clone()
    y[:, 0] += 1.0
    assert not torch.allclose(layer(y)[:, 16], out[:, 16])  # three segments later
    memory = stream(layer, x[:, :15], 5)[1]
    torch.testing.assert_close(layer.segment_step(x[:, 15:], memory)[0], out[:, 15:], rtol=1e-12, atol=1e-12)


def test_padded_tokens_change_neither_outputs_nor_memory():
    layer, x = make(), inputs()
    mask = torch.ones(2, 17, dtype=torch.bool)
    mask[0, 3:9] = False  # a fully padded second segment for the first sample
    mask[1, ::4] = False
    y = x.masked_fill(~mask[..., None], 7.0)
    out_x, mem_x = stream(layer, x, 5, mask)
    out_y, mem_y = stream(layer, y, 5, mask)
    torch.testing.assert_close(out_y[mask], out_x[mask], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mem_y, mem_x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer(x, mask=mask), out_x, rtol=1e-12, atol=1e-12)
