"""GMAT: who attends to whom against a dense construction (memory to all, tokens to the memory and
their window), the sparse attention against dense masked softmax, and the layer's two stages."""

import pytest
import torch
import torch.nn.functional as F

import zoo
from zoo import probe
from zoo.entries.gmat import gmat_attention, gmat_attention_reference


def tensors(*shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g, dtype=torch.float64) for s in shapes]


def allowed_dense(n, m, window, mask=None):
    """`(b, n, m + n)`: every memory slot, and key j when |i - j| <= window and j is real."""
    real = torch.ones(1, n, dtype=torch.bool) if mask is None else mask
    out = torch.zeros(real.shape[0], n, m + n, dtype=torch.bool)
    for i in range(n):
        out[:, i, :m] = True
        for j in range(max(0, i - window), min(n, i + window + 1)):
            out[:, i, m + j] = real[:, j]
    return out


def dense_oracle(q, k, v, mem_k, mem_v, window, mask=None):
    return gmat_attention_reference(q, k, v, mem_k, mem_v, mask, window=window)


@pytest.mark.parametrize("n, window", [(37, 4), (12, 5), (5, 8), (16, 1)])
def test_sparse_attention_equals_dense_masked_softmax(n, window):
    q, k, v, mem_k, mem_v = tensors((2, 3, n, 8), (2, 3, n, 8), (2, 3, n, 6), (2, 3, 4, 8),
                                    (2, 3, 4, 6))
    torch.testing.assert_close(gmat_attention(q, k, v, mem_k, mem_v, window=window),
                               dense_oracle(q, k, v, mem_k, mem_v, window), rtol=1e-10, atol=1e-12)


def test_sparse_attention_with_padding_equals_dense_masked_softmax():
    q, k, v, mem_k, mem_v = tensors((2, 3, 37, 8), (2, 3, 37, 8), (2, 3, 37, 6), (2, 3, 4, 8),
                                    (2, 3, 4, 6))
    mask = torch.ones(2, 37, dtype=torch.bool)
    mask[0, 30:] = False
    mask[1, ::3] = False
    torch.testing.assert_close(gmat_attention(q, k, v, mem_k, mem_v, mask, window=4),
                               dense_oracle(q, k, v, mem_k, mem_v, 4, mask), rtol=1e-10, atol=1e-12)


def test_who_attends_to_whom():
    """Read the map off with identity values: nonzero exactly on the memory columns and the band."""
    n, m, window = 20, 3, 3
    q, k, mem_k = tensors((1, 2, n, 8), (1, 2, n, 8), (1, 2, m, 8))
    eye_seq = torch.eye(n, dtype=torch.float64).expand(1, 2, n, n)
    eye_mem = torch.eye(m, dtype=torch.float64).expand(1, 2, m, m)
    to_seq = gmat_attention(q, k, eye_seq, mem_k, torch.zeros(1, 2, m, n, dtype=torch.float64),
                            window=window)
    to_mem = gmat_attention(q, k, torch.zeros(1, 2, n, m, dtype=torch.float64), mem_k, eye_mem,
                            window=window)
    pattern = torch.cat([to_mem, to_seq], dim=-1)[0] > 0  # (h i m + j)
    assert torch.equal(pattern, allowed_dense(n, m, window).expand(2, n, m + n))


def make(**overrides):
    torch.manual_seed(0)
    return zoo.create("gmat", dim=16, **{"heads": 2, "memory": 3, "window": 2, **overrides}
                      ).double().eval()


def layer_oracle(layer, x, mask=None):
    """Stage 1: the memory attends densely to memory and sequence (plus residual); stage 2: each
    token attends to the updated memory and its window. Dense masks throughout."""
    b, n, _ = x.shape
    m = layer.memory_size
    heads = layer.heads

    def qkv(t):
        return [u.reshape(b, t.shape[1], heads, -1).transpose(1, 2) for u in
                (t @ layer.to_qkv.weight.T).chunk(3, -1)]

    def out(o):
        return o.transpose(1, 2).reshape(b, o.shape[2], -1) @ layer.to_out.weight.T + layer.to_out.bias

    mem = layer.memory.expand(b, m, -1)
    q, k, v = qkv(x)
    q_m, k_m, v_m = qkv(mem)
    real = torch.ones(b, n, dtype=torch.bool) if mask is None else mask
    keys = torch.cat([torch.ones(b, m, dtype=torch.bool), real], 1)
    read = F.scaled_dot_product_attention(q_m, torch.cat([k_m, k], 2), torch.cat([v_m, v], 2),
                                          attn_mask=keys[:, None, None, :])
    mem = mem + out(read)
    _, k_m, v_m = qkv(mem)
    return out(dense_oracle(q, k, v, k_m, v_m, layer.window, mask))


def test_layer_equals_the_two_stage_oracle():
    layer = make()
    (x,) = tensors((2, 13, 16), seed=3)
    mask = torch.ones(2, 13, dtype=torch.bool)
    mask[1, 9:] = False
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer_oracle(layer, x), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(layer(x, mask=mask)[mask], layer_oracle(layer, x, mask)[mask],
                                   rtol=1e-10, atol=1e-12)


def test_gradients_match_the_two_stage_oracle():
    layer = make()
    x = tensors((1, 9, 16), seed=4)[0].requires_grad_()
    params = list(layer.parameters())
    grads = torch.autograd.grad(layer(x).square().sum(), [x, *params])
    ref = torch.autograd.grad(layer_oracle(layer, x).square().sum(), [x, *params])
    for a, b in zip(grads, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_memory_gives_every_token_a_global_view():
    """With window 1, each output still depends on every input, through the memory."""
    inf = probe.influence(make(window=1), tensors((1, 12, 16), seed=5)[0])
    assert (inf > 1e-10 * inf.max()).all()
