"""Memory-compressed and local attention: who attends to whom against explicit constructions,
outputs against window-sum and per-block oracles, and the local kind under the whole contract."""

import pytest
import torch
import torch.nn.functional as F

import zoo
from zoo import probe
from zoo.verify.claims import claim_autoregressive
from zoo.verify.contract import factory, run_contract, sample


def make(**overrides):
    torch.manual_seed(0)
    return zoo.create("memory-compressed-attention", dim=16, heads=2, **overrides).double().eval()


def qkv(layer, n, b=2, seed=0):
    return probe.qkv_for(layer, n, b=b, seed=seed)


def compressed_oracle(layer, q, k, v, mask=None):
    """Slots as explicit window sums b + sum_t W_t x_{sc+t} (tokens past n and padded ones count
    as zero), then softmax over the allowed slots; a row with no allowed slot gives zero."""
    c, (b, h, n, d) = layer.compression, q.shape
    r = -(-n // c)
    real = torch.ones(b, n, dtype=torch.bool) if mask is None else mask

    def slots(t, conv):
        flat = (t * real[:, None, :, None]).transpose(1, 2).reshape(b, n, h * d)
        out = conv.bias.expand(b, r, h * d).clone()
        for s in range(r):
            for t_ in range(c):
                if s * c + t_ < n:
                    out[:, s] = out[:, s] + flat[:, s * c + t_] @ conv.weight[:, :, t_].T
        return out.reshape(b, r, h, d).transpose(1, 2)

    ks, vs = slots(k, layer.compress_k), slots(v, layer.compress_v)
    allowed = torch.zeros(b, n, r, dtype=torch.bool)
    for i in range(n):
        for s in range(r):
            window = real[:, s * c:(s + 1) * c].any(-1)
            complete = s * c + c - 1 <= i
            allowed[:, i, s] = window & (complete or not layer.causal)
    out = F.scaled_dot_product_attention(q, ks, vs, attn_mask=allowed[:, None])
    return out * allowed.any(-1)[:, None, :, None]


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("n", [12, 37])
def test_compressed_attention_equals_window_sum_oracle(causal, n):
    layer = make(causal=causal)
    q, k, v = qkv(layer, n)
    with torch.no_grad():
        torch.testing.assert_close(layer.attend(q, k, v), compressed_oracle(layer, q, k, v),
                                   rtol=1e-10, atol=1e-12)


def test_compressed_attention_with_padding_equals_oracle():
    layer = make()
    q, k, v = qkv(layer, 37)
    mask = torch.ones(2, 37, dtype=torch.bool)
    mask[0, 25:] = False  # slots 9.. hold no real token
    mask[1, 4:9] = False
    with torch.no_grad():
        out = layer.attend(q, k, v, mask)
    torch.testing.assert_close(out, compressed_oracle(layer, q, k, v, mask), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_local_attention_equals_softmax_in_each_block(causal):
    layer = make(kind="local", block=5, causal=causal)
    q, k, v = qkv(layer, 23)
    with torch.no_grad():
        out = layer.attend(q, k, v)
    for start in range(0, 23, 5):
        sl = slice(start, start + 5)
        ref = F.scaled_dot_product_attention(q[:, :, sl], k[:, :, sl], v[:, :, sl], is_causal=causal)
        torch.testing.assert_close(out[:, :, sl], ref, rtol=1e-10, atol=1e-12)


def dependence(layer, n):
    inf = probe.influence(layer, torch.randn(1, n, 16, dtype=torch.float64))
    return inf > 1e-12 * inf.max()


def test_who_attends_to_whom_compressed_causal():
    """Output i depends on token j iff j lies in a slot whose window ends at or before i, or j is
    i itself and i reads at least two slots (with one slot the softmax weight is 1 whatever the
    query)."""
    layer, c, n = make(causal=True), 3, 14
    expected = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        complete = (i + 1) // c  # slots whose window ends at or before i
        for j in range(n):
            slot_end = (j // c) * c + c - 1
            expected[i, j] = slot_end <= i or (j == i and complete >= 2)
    assert torch.equal(dependence(layer, n), expected)


def test_who_attends_to_whom_compressed_bidirectional():
    assert dependence(make(), 14).all()


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_who_attends_to_whom_local(causal):
    layer, block, n = make(kind="local", block=4, causal=causal), 4, 14
    expected = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            expected[i, j] = i // block == j // block and (j <= i or not causal)
    assert torch.equal(dependence(layer, n), expected)


def test_local_kind_keeps_the_whole_contract():
    e = zoo.entry("memory-compressed-attention")
    base = factory(e)

    def local(**overrides):
        return base(kind="local", **overrides)

    assert run_contract(e, local) == []
    claim_autoregressive(e, local)


def test_local_kind_has_no_convolutions():
    names = {n for n, _ in make(kind="local").named_parameters()}
    assert not any(n.startswith("compress") for n in names)


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="kind must be one of 'compressed', 'local'"):
        zoo.create("memory-compressed-attention", dim=16, kind="strided")


def test_first_queries_see_nothing_under_causality():
    layer = make(causal=True)
    x = sample(zoo.entry("memory-compressed-attention"), n=10, dim=16)
    with torch.no_grad():
        out = layer(x)
    torch.testing.assert_close(out[:, :2], layer.to_out.bias.expand(2, 2, 16))
