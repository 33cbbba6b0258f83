"""FlashAttention: the tiled online softmax equals softmax attention exactly (outputs and gradients,
float64) at any tile sizes, holds no n x n tensor, and decodes chunk by chunk from a key-value cache."""

import pytest
import torch

import zoo
from tests.oracles import assert_same_outputs_and_grads, qkv
from tests.stepping import assert_layer_steps_equal_forward, padding
from zoo import probe
from zoo.core.softmax import softmax_attention
from zoo.entries.flash_attention import flash_attention

TILES = [(8, 8), (5, 7), (64, 3), (1, 37)]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("block_q, block_k", TILES, ids=[f"tiles{r}x{c}" for r, c in TILES])
def test_equals_softmax_attention_outputs_and_gradients(block_q, block_k, causal):
    q, k, v = (t.requires_grad_() for t in qkv())
    mask = padding(37)
    out = flash_attention(q, k, v, mask, causal=causal, block_q=block_q, block_k=block_k)
    ref = softmax_attention(q, k, v, mask, causal=causal)
    real = mask[:, None, :, None].expand_as(out)  # every real query reads at least one real key
    assert_same_outputs_and_grads(out[real], ref[real], (q, k, v), rtol=1e-12, atol=1e-12)


def test_unequal_lengths_put_the_queries_last():
    q, k, v = qkv(n=37)
    out = flash_attention(q[:, :, -5:], k, v, causal=True, block_q=2, block_k=6)
    torch.testing.assert_close(out, softmax_attention(q, k, v, causal=True)[:, :, -5:],
                               rtol=1e-12, atol=1e-12)


def test_no_intermediate_is_quadratic():
    """The probe's largest tensor grows linearly in n, and at n = 2048 is far below n^2."""
    s = probe.scaling("flash-attention")
    assert abs(s.memory - 1) < 0.05 and abs(s.time - 2) < 0.1
    assert max(s.largest) < s.ns[-1] ** 2 / 16


def test_largest_intermediate_of_the_function_is_one_tile_row():
    n, block_k = 512, 16
    q, k, v = (t.float() for t in qkv(n=n, b=1, h=1, d=8))
    biggest = probe._LargestTensor()
    with torch.no_grad(), biggest:
        flash_attention(q, k, v, causal=True, block_q=32, block_k=block_k)
    assert biggest.largest <= n * block_k  # one (n, B_c) tile of scores; softmax would hold n * n


@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
def test_step_over_random_splits_equals_the_causal_forward(masked):
    layer = zoo.create("flash-attention", dim=32, heads=2, block_q=4, block_k=5, causal=True).double()
    x = torch.randn(2, 23, 32, dtype=torch.float64)
    mask = padding(23) if masked else None
    state = assert_layer_steps_equal_forward(layer, x, mask)
    assert state.cache["k"].shape == (2, 2, 23, 16)  # the cache holds every key: state ~ context


def test_step_refuses_a_non_causal_layer():
    layer = zoo.create("flash-attention", dim=32, heads=2)
    with pytest.raises(ValueError, match="causal=True"):
        layer.step(torch.randn(1, 3, 32))


def test_nan_behind_the_mask_reaches_no_real_output():
    layer = zoo.create("flash-attention", dim=32, heads=2, block_q=4, block_k=4).double()
    x, mask = torch.randn(2, 13, 32, dtype=torch.float64), padding(13)
    dirty = x.masked_fill(~mask.unsqueeze(-1), float("nan"))
    out = layer(dirty, mask=mask)
    torch.testing.assert_close(out[mask], layer(x, mask=mask)[mask], rtol=0, atol=0)
    assert torch.isfinite(out).all()


def test_a_state_serves_twice_and_not_another_batch_size():
    layer = zoo.create("flash-attention", dim=32, heads=2, causal=True).double()
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    _, state = layer.step(x[:, :6])
    first, _ = layer.step(x[:, 6:], state)
    again, _ = layer.step(x[:, 6:], state)
    assert torch.equal(first, again) and state.length == 6
    assert state.numel() == 2 * (2 * 2 * 6 * 16) + 2 * 6  # keys, values and the padding mask
    with pytest.raises(ValueError, match="batch size"):
        layer.step(x[:1, 6:], state)
