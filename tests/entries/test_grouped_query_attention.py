"""Grouped-query attention: each query head reads its group's key-value head (against a per-head
loop of softmax attention, outputs and gradients); kv_heads = heads is multi-head attention, and the
paper's checkpoint conversion mean-pools each group; the decoding cache is smaller than multi-head
attention's by the group factor, measured."""

import pytest
import torch

import zoo
from tests.oracles import assert_same_outputs_and_grads
from tests.stepping import assert_layer_steps_equal_forward, decode, padding, state_elements
from zoo.core.softmax import softmax_attention
from zoo.entries.grouped_query_attention import GroupedQueryAttention, grouped_query_attention


def per_head_loop(q, k, v, mask, causal):
    """Query head i attends with key-value head i // (h / g), one head at a time."""
    r = q.shape[1] // k.shape[1]
    return torch.cat([softmax_attention(q[:, i:i + 1], k[:, i // r:i // r + 1], v[:, i // r:i // r + 1],
                                        mask, causal=causal) for i in range(q.shape[1])], dim=1)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("kv_heads", [1, 2, 3, 6], ids=lambda g: f"kv{g}")
def test_each_query_head_reads_its_groups_key_value_head(kv_heads, causal):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 6, 37, 8, generator=g, dtype=torch.float64).requires_grad_()
    k, v = (torch.randn(2, kv_heads, 37, 8, generator=g, dtype=torch.float64).requires_grad_()
            for _ in range(2))
    mask = padding(37)
    out = grouped_query_attention(q, k, v, mask, causal=causal)
    ref = per_head_loop(q, k, v, mask, causal)
    real = mask[:, None, :, None].expand_as(out)
    assert_same_outputs_and_grads(out[real], ref[real], (q, k, v), rtol=1e-12, atol=1e-12)


def test_a_head_count_that_does_not_divide_is_refused():
    with pytest.raises(ValueError, match="must divide"):
        zoo.create("grouped-query-attention", dim=32, heads=4, kv_heads=3)
    q, k = torch.randn(1, 4, 5, 8), torch.randn(1, 3, 5, 8)
    with pytest.raises(ValueError, match="g dividing h"):
        grouped_query_attention(q, k, k)


def test_kv_heads_equal_to_heads_is_the_multi_head_layer():
    gqa = zoo.create("grouped-query-attention", dim=32, heads=4, kv_heads=4, causal=True).double()
    mha = zoo.create("softmax-attention", dim=32, heads=4, causal=True).double()
    mha.load_state_dict(gqa.state_dict())  # same layout: q, k, v rows of one projection
    x = torch.randn(2, 37, 32, dtype=torch.float64)
    torch.testing.assert_close(gqa(x), mha(x), rtol=1e-12, atol=1e-12)


def test_conversion_mean_pools_the_key_and_value_heads_of_each_group():
    mha = zoo.create("softmax-attention", dim=32, heads=4).double()
    gqa = GroupedQueryAttention.from_multi_head(mha, kv_heads=2)
    w_q, w_k, w_v = mha.to_qkv.weight.detach().split(32)  # 4 heads of 8 rows each
    want_k = torch.cat([(w_k[0:8] + w_k[8:16]) / 2, (w_k[16:24] + w_k[24:32]) / 2])
    want_v = torch.cat([(w_v[0:8] + w_v[8:16]) / 2, (w_v[16:24] + w_v[24:32]) / 2])
    torch.testing.assert_close(gqa.to_qkv.weight, torch.cat([w_q, want_k, want_v]), rtol=0, atol=0)
    x = torch.randn(2, 37, 32, dtype=torch.float64)
    same = GroupedQueryAttention.from_multi_head(mha, kv_heads=4)  # no pooling: the same layer
    torch.testing.assert_close(same(x), mha(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kv_heads", [1, 2], ids=["multi-query", "kv2"])
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
def test_step_over_random_splits_equals_the_causal_forward(kv_heads, masked):
    layer = zoo.create("grouped-query-attention", dim=32, heads=4, kv_heads=kv_heads,
                       causal=True).double()
    x = torch.randn(2, 23, 32, dtype=torch.float64)
    mask = padding(23) if masked else None
    assert_layer_steps_equal_forward(layer, x, mask)


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_cache_is_smaller_than_multi_head_attentions_by_the_group_factor(kv_heads):
    x = torch.randn(1, 29, 32, dtype=torch.float64)
    sizes = {}
    for g in (kv_heads, 4):  # 4 = heads: multi-head attention
        layer = zoo.create("grouped-query-attention", dim=32, heads=4, kv_heads=g, causal=True).double()
        sizes[g] = state_elements(decode(layer, x)[1])
    assert sizes[kv_heads] == 2 * kv_heads * 8 * 29  # keys and values: kv_heads x dim_head per token
    assert sizes[4] == sizes[kv_heads] * (4 // kv_heads)
