"""Linformer: softmax attention at r = n with identity projections, the explicit low-rank formula
for learned projections, padding, and the max_len limit."""

import pytest
import torch
import torch.nn.functional as F

import zoo
from zoo.entries.linformer import linformer_attention, segment_mean_projection


def qkv(b=2, h=3, n=37, d=8, e=6):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(b, h, n, s, generator=g, dtype=torch.float64) for s in (d, d, e)]


def explicit(q, k, v, proj_k, proj_v):
    """softmax(Q (E K)^T / sqrt(d)) F V, per head, written out."""
    ek = proj_k.unsqueeze(0) @ k  # (b h r d)
    fv = proj_v.unsqueeze(0) @ v
    return torch.softmax(q @ ek.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1) @ fv


def random_projections(h, r, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(h, r, n, generator=g, dtype=torch.float64) / n ** 0.5 for _ in range(2)]


def test_identity_projections_equal_softmax_attention():
    q, k, v = qkv()
    eye = torch.eye(37, dtype=torch.float64).expand(3, 37, 37)
    torch.testing.assert_close(linformer_attention(q, k, v, eye, eye),
                               F.scaled_dot_product_attention(q, k, v), rtol=1e-12, atol=1e-12)


def test_layer_at_r_equal_max_len_equals_softmax_attention_with_padding():
    layer = zoo.create("linformer", dim=32, heads=2, max_len=37, r=37).double()
    q, k, v = qkv(h=2)
    mask = torch.ones(2, 37, dtype=torch.bool)
    mask[1, 20:] = False
    out = layer.attend(q, k, v, mask)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_learned_projections_follow_the_low_rank_formula():
    q, k, v = qkv()
    proj_k, proj_v = random_projections(3, 5, 37)
    torch.testing.assert_close(linformer_attention(q, k, v, proj_k, proj_v),
                               explicit(q, k, v, proj_k, proj_v), rtol=1e-12, atol=1e-12)


def test_gradients_match_the_low_rank_formula():
    q, k, v = (t.requires_grad_() for t in qkv(n=11))
    proj_k, proj_v = (p.requires_grad_() for p in random_projections(3, 4, 11))
    inputs = (q, k, v, proj_k, proj_v)
    grads = torch.autograd.grad(linformer_attention(*inputs).square().sum(), inputs)
    ref = torch.autograd.grad(explicit(*inputs).square().sum(), inputs)
    for a, b in zip(grads, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_padded_tokens_drop_out_of_the_projection():
    """With dense projections, a mask is the same as deleting the padded columns of E and F and
    the padded keys and values."""
    q, k, v = qkv()
    proj_k, proj_v = random_projections(3, 5, 37)
    mask = torch.ones(2, 37, dtype=torch.bool)
    mask[0, 25:] = False
    mask[1, ::4] = False
    out = linformer_attention(q, k, v, proj_k, proj_v, mask)
    for i in range(2):
        keep = mask[i]
        ref = explicit(q[i:i + 1], k[i:i + 1, :, keep], v[i:i + 1, :, keep], proj_k[..., keep],
                       proj_v[..., keep])
        torch.testing.assert_close(out[i:i + 1], ref, rtol=1e-12, atol=1e-12)


def test_segment_mean_start():
    torch.testing.assert_close(segment_mean_projection(6, 6), torch.eye(6, dtype=torch.float64))
    expected = torch.tensor([[0.5, 0.5, 0, 0, 0, 0], [0, 0, 0.5, 0.5, 0, 0], [0, 0, 0, 0, 0.5, 0.5]],
                            dtype=torch.float64)
    torch.testing.assert_close(segment_mean_projection(3, 6), expected)


def test_short_sequence_uses_the_first_columns_and_masks_empty_slots():
    """n = 8 < max_len = 16 with r = 4 segment means: slots 0 and 1 average positions 0-3 and
    4-7; slots 2 and 3 cover only positions past n and take no part."""
    layer = zoo.create("linformer", dim=16, heads=1, max_len=16, r=4).double()
    q, k, v = qkv(b=1, h=1, n=8, d=16, e=16)
    kmeans = torch.stack([k[..., :4, :].mean(-2), k[..., 4:, :].mean(-2)], dim=-2)
    vmeans = torch.stack([v[..., :4, :].mean(-2), v[..., 4:, :].mean(-2)], dim=-2)
    ref = torch.softmax(q @ kmeans.transpose(-1, -2) / 4, dim=-1) @ vmeans
    torch.testing.assert_close(layer.attend(q, k, v), ref, rtol=1e-12, atol=1e-12)


def test_sequence_longer_than_max_len_is_refused():
    layer = zoo.create("linformer", dim=32, heads=2, max_len=16, r=4)
    layer(torch.randn(1, 16, 32))
    with pytest.raises(ValueError, match="sequence length 17 exceeds max_len=16"):
        layer(torch.randn(1, 17, 32))


def test_r_above_max_len_is_refused():
    with pytest.raises(ValueError, match="r=20 must not exceed max_len=16"):
        zoo.create("linformer", dim=32, max_len=16, r=20)
