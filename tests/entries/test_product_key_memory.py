"""Product-key memory: the product-key search equals brute-force top-k over all |C|^2 keys; the
layer equals a brute-force memory read; tokens are read independently (trivially causal)."""

import pytest
import torch

import zoo
from zoo import probe
from zoo.entries.product_key_memory import product_key_topk


@pytest.mark.parametrize("c, k", [(8, 3), (16, 16), (32, 7), (64, 16)], ids=lambda v: str(v))
def test_product_key_topk_equals_brute_force_over_all_pairs(c, k):
    g = torch.Generator().manual_seed(c + k)
    q1, q2 = torch.randn(2, 5, 9, 2, 6, generator=g, dtype=torch.float64)  # (..., h, d)
    keys1, keys2 = torch.randn(2, 2, c, 6, generator=g, dtype=torch.float64)  # (h, c, d)
    scores, idx = product_key_topk(q1, q2, keys1, keys2, k)
    for head in range(2):
        full = ((q1[..., head, :] @ keys1[head].T)[..., :, None]
                + (q2[..., head, :] @ keys2[head].T)[..., None, :]).flatten(-2)  # (..., c * c)
        best, where = full.topk(k, dim=-1)
        torch.testing.assert_close(scores[..., head, :], best, rtol=0, atol=1e-14)
        assert torch.equal(idx[..., head, :], where)
        # the index i * c + j names the pair (i, j)
        i, j = idx[..., head, :] // c, idx[..., head, :] % c
        pair = ((q1[..., head, None, :] * keys1[head][i]).sum(-1)
                + (q2[..., head, None, :] * keys2[head][j]).sum(-1))
        torch.testing.assert_close(pair, scores[..., head, :], rtol=0, atol=1e-14)


def brute_force(layer, x):
    """Score every one of the |C|^2 keys per head, keep the best k, mix their values, sum heads."""
    q = layer.to_queries(x).unflatten(-1, (layer.heads, 2, layer.dim_key // 2))
    out = torch.zeros_like(x)
    for head in range(layer.heads):
        s1 = q[..., head, 0, :] @ layer.keys[0, head].T  # (b, n, c)
        s2 = q[..., head, 1, :] @ layer.keys[1, head].T
        full = (s1[..., :, None] + s2[..., None, :]).flatten(-2)
        best, where = full.topk(layer.topk, dim=-1)
        out = out + torch.einsum("bnk,bnkx->bnx", best.softmax(-1), layer.values[where])
    return out


def make():
    torch.manual_seed(0)
    return zoo.create("product-key-memory", dim=12, heads=3, num_keys=10, topk=4).double()


def test_layer_equals_brute_force_memory_read():
    layer, x = make(), torch.randn(2, 13, 12, dtype=torch.float64)
    torch.testing.assert_close(layer(x), brute_force(layer, x), rtol=1e-12, atol=1e-12)


def test_gradients_equal_brute_force():
    layer, x = make(), torch.randn(2, 13, 12, dtype=torch.float64, requires_grad=True)
    grads = torch.autograd.grad(layer(x).square().sum(), (x, *layer.parameters()))
    ref = torch.autograd.grad(brute_force(layer, x).square().sum(), (x, *layer.parameters()))
    for a, b in zip(grads, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_each_token_is_read_on_its_own():
    """Trivially autoregressive: the influence map is diagonal, and causal and padding change
    nothing."""
    layer, x = make(), torch.randn(1, 9, 12, dtype=torch.float64)
    inf = probe.influence(layer, x)
    torch.testing.assert_close(inf - torch.diag(inf.diagonal()), torch.zeros(9, 9, dtype=torch.float64),
                               rtol=0, atol=0)
    assert (inf.diagonal() > 0).all()
    causal = zoo.create("product-key-memory", dim=12, heads=3, num_keys=10, topk=4, causal=True)
    causal.load_state_dict(layer.state_dict())
    mask = torch.tensor([[True] * 6 + [False] * 3])
    assert torch.equal(causal.double()(x), layer(x)) and torch.equal(layer(x, mask=mask), layer(x))


def test_topk_beyond_the_sub_keys_is_refused():
    with pytest.raises(ValueError, match="topk=9 at most num_keys=8"):
        zoo.create("product-key-memory", dim=16, num_keys=8, topk=9)
