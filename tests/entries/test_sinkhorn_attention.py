"""Sinkhorn attention: the sorting matrix is doubly stochastic, each block attends to its own and
its sorted block (against a block-by-block oracle), one block is softmax attention."""

import pytest
import torch
import torch.nn.functional as F

from zoo.entries.sinkhorn_attention import SinkhornAttention, sinkhorn
from zoo.probe import qkv_for


def layer_and_qkv(n=45, n_blocks=5, causal=False, **kw):
    torch.manual_seed(0)
    layer = SinkhornAttention(32, heads=2, n_blocks=n_blocks, causal=causal, **kw).double().eval()
    return layer, qkv_for(layer, n, b=2, seed=1)


def test_sinkhorn_equals_alternating_row_and_column_normalisation():
    logits = torch.randn(3, 6, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    p = logits.exp()
    for _ in range(5):
        p = p / p.sum(-1, keepdim=True)
        p = p / p.sum(-2, keepdim=True)
    torch.testing.assert_close(sinkhorn(logits, 5), p, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("iters, row_tol", [(8, 1e-4), (50, 1e-12)])
def test_sorting_matrix_is_doubly_stochastic(iters, row_tol):
    layer, (_, k, _) = layer_and_qkv(sinkhorn_iters=iters)
    s = layer.sort_matrix(k)
    assert s.shape == (2, 2, 5, 5) and (s > 0).all()
    assert (s.sum(-2) - 1).abs().max() < 1e-12  # the last step normalises columns
    assert (s.sum(-1) - 1).abs().max() < row_tol


def test_causal_sorting_mixes_only_earlier_blocks():
    layer, (_, k, _) = layer_and_qkv(causal=True)
    s = layer.sort_matrix(k)
    assert (s.triu() == 0).all()
    torch.testing.assert_close(s.sum(-1)[..., 1:], torch.ones(2, 2, 4, dtype=torch.float64))


def block_oracle(q, k, v, s, mask, causal):
    """Token by token: softmax over [sorted block keys; own block keys], written with loops."""
    b, h, n, d = q.shape
    nb = s.shape[-1]
    c = -(-n // nb)
    out = torch.zeros(b, h, n, v.shape[-1], dtype=q.dtype)
    real = mask.to(q.dtype)
    for bi in range(b):
        for hi in range(h):
            for i in range(n):
                blk, keys, vals, ok = i // c, [], [], []
                for t in range(c):  # slot t of the sorted block: a mix of slot t of every block
                    mix_k, mix_v, mix_m = torch.zeros(d, dtype=q.dtype), 0.0, 0.0
                    for j in range(nb):
                        pos = j * c + t
                        if pos < n:
                            mix_k = mix_k + s[bi, hi, blk, j] * k[bi, hi, pos] * real[bi, pos]
                            mix_v = mix_v + s[bi, hi, blk, j] * v[bi, hi, pos] * real[bi, pos]
                            mix_m = mix_m + s[bi, hi, blk, j] * real[bi, pos]
                    keys.append(mix_k), vals.append(mix_v), ok.append(bool(mix_m > 0))
                for pos in range(blk * c, min(blk * c + c, n)):
                    keys.append(k[bi, hi, pos]), vals.append(v[bi, hi, pos])
                    ok.append(bool(mask[bi, pos]) and (pos <= i or not causal))
                scores = torch.stack(keys) @ q[bi, hi, i] * d ** -0.5
                scores[~torch.tensor(ok)] = float("-inf")
                out[bi, hi, i] = scores.softmax(0) @ torch.stack(vals)
    return out


@pytest.mark.parametrize("causal", [False, True])
def test_each_block_attends_to_its_own_and_its_sorted_block(causal):
    layer, (q, k, v) = layer_and_qkv(n=23, n_blocks=4, causal=causal)
    mask = torch.ones(2, 23, dtype=torch.bool)
    mask[1, 3::4] = False
    with torch.no_grad():
        out = layer.attend(q, k, v, mask)
        ref = block_oracle(q, k, v, layer.sort_matrix(k, mask), mask, causal)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)


def test_one_block_is_softmax_attention_with_gradients():
    layer, (q, k, v) = layer_and_qkv(n=19, n_blocks=1, causal=True)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, ref = layer.attend(q, k, v), F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    for a, b in zip(grads, torch.autograd.grad(ref.square().sum(), (q, k, v)), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_gumbel_noise_only_in_training():
    layer, (_, k, _) = layer_and_qkv()
    assert torch.equal(layer.sort_matrix(k), layer.sort_matrix(k))
    layer.train()
    assert not torch.equal(layer.sort_matrix(k), layer.sort_matrix(k))
