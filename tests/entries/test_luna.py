"""Luna: pack-then-unpack equals its formula; the causal form equals packing every prefix
separately, is truly causal, and stays linear in n and in the packed length."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import zoo
from zoo import probe
from zoo.entries.luna import luna_attention, luna_attention_reference
from zoo.verify.contract import factory

B, H, D, L = 2, 2, 4, 3


def tensors(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, n, D, generator=g, dtype=torch.float64) for _ in range(3))
    pq = torch.randn(H, L, D, generator=g, dtype=torch.float64)
    w_unpack = torch.randn(2 * H * D, H * D, generator=g, dtype=torch.float64) / 3
    return q, k, v, pq, w_unpack


def unpack(q_t, packed, w_unpack):
    """q_t `(b, h, d)`, packed `(b, h, l, e)` -> `(b, h, e)`: the unpack attention of one position."""
    merged = packed.transpose(1, 2).flatten(2)  # (b, l, h e)
    pk, pv = (t.unflatten(-1, (H, D)).transpose(1, 2) for t in (merged @ w_unpack.T).chunk(2, -1))
    attn = (torch.einsum("bhd,bhld->bhl", q_t, pk) / D ** 0.5).softmax(-1)
    return torch.einsum("bhl,bhle->bhe", attn, pv)


def test_bidirectional_equals_pack_then_unpack():
    q, k, v, pq, w = tensors(11)
    mask = torch.ones(B, 11, dtype=torch.bool)
    mask[1, 7:] = False
    pack = torch.einsum("hld,bhnd->bhln", pq, k) / D ** 0.5
    pack = pack.masked_fill(~mask[:, None, None], -1e300).softmax(-1)
    packed = pack @ v  # (b h l e): Y_P, the packed context
    expected = torch.stack([unpack(q[:, :, t], packed, w) for t in range(11)], dim=2)
    torch.testing.assert_close(luna_attention(q, k, v, pq, w, mask), expected, rtol=1e-12, atol=1e-12)


def causal_oracle(q, k, v, pq, w, mask=None):
    """Position t unpacks Y_P(t) = mean over real s <= t of (elu(pq . k_s / sqrt d) + 1) v_s: the
    entry's reference, which holds one pack per prefix."""
    return luna_attention_reference(q, k, v, pq, w, mask, causal=True)


@pytest.mark.parametrize("n", [1, 9, 70, 130], ids=lambda n: f"n={n}")
def test_causal_equals_packing_every_prefix(n):
    q, k, v, pq, w = tensors(n)
    torch.testing.assert_close(luna_attention(q, k, v, pq, w, causal=True), causal_oracle(q, k, v, pq, w),
                               rtol=1e-10, atol=1e-12)


def test_causal_with_padding_counts_real_tokens():
    q, k, v, pq, w = tensors(70)
    mask = torch.rand(B, 70, generator=torch.Generator().manual_seed(3)) > 0.3
    torch.testing.assert_close(luna_attention(q, k, v, pq, w, mask, causal=True),
                               causal_oracle(q, k, v, pq, w, mask), rtol=1e-10, atol=1e-12)


def test_causal_gradients_equal_the_oracle():
    q, k, v, pq, w = (t.requires_grad_() for t in tensors(70))
    grads = torch.autograd.grad(luna_attention(q, k, v, pq, w, causal=True).square().sum(), (q, k, v, pq, w))
    ref = torch.autograd.grad(causal_oracle(q, k, v, pq, w).square().sum(), (q, k, v, pq, w))
    for a, b in zip(grads, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_causal_layer_influence_is_lower_triangular_across_chunks():
    layer = zoo.create("luna", dim=8, heads=2, packed_len=3, causal=True).double()
    x = torch.randn(1, 80, 8, dtype=torch.float64)
    inf = probe.influence(layer, x)
    assert inf.triu(1).max() == 0
    assert (inf.diagonal() > 0).all() and (inf[79, :79] > 0).all()


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_linear_in_length_and_packed_length(causal):
    e = zoo.entry("luna")
    make = factory(e, dim=32)
    s = probe.scaling(e, make=lambda **kw: make(causal=causal, **kw))
    assert abs(s.time - 1) < 0.05 and abs(s.memory - 1) < 0.05, s

    def flops(packed_len):
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            make(causal=causal, packed_len=packed_len)(torch.randn(1, 256, 32))
        return counter.get_total_flops()

    f8, f16, f32 = flops(8), flops(16), flops(32)
    assert f16 > f8 and f32 - f16 == 2 * (f16 - f8)  # affine in l: O(l N)


def test_packed_length_is_a_keyword_with_a_default():
    assert zoo.create("luna", dim=32).packed_len == 16
    with pytest.raises(ValueError, match="packed_len must be a positive int"):
        zoo.create("luna", dim=32, packed_len=0)
