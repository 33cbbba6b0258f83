"""The shared core: softmax reference against SDPA, masks, padding, input checks, the shell."""

import pytest
import torch
import torch.nn.functional as F

from zoo.core.checks import check_qkv, check_sequence
from zoo.core.masks import block_windows, causal_mask, pad_mask, pad_qkv, pad_to_multiple
from zoo.core.shell import MultiHead
from zoo.core.softmax import softmax_attention


def qkv(b=2, h=3, i=37, j=37, d=8, e=5, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(b, h, i, d, generator=g, dtype=dtype),
            torch.randn(b, h, j, d, generator=g, dtype=dtype),
            torch.randn(b, h, j, e, generator=g, dtype=dtype))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_softmax_attention_equals_sdpa(causal, masked):
    q, k, v = qkv()
    mask = None
    sdpa_mask = None
    if masked:
        mask = torch.rand(2, 37, generator=torch.Generator().manual_seed(3)) > 0.3
        mask[:, 0] = True  # every causal row keeps a key, so SDPA has no all-masked row
        sdpa_mask = mask[:, None, None, :]
        if causal:
            sdpa_mask = sdpa_mask & causal_mask(37, 37)
    ours = softmax_attention(q, k, v, mask, causal=causal)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask,
                                         is_causal=causal and not masked)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


def test_softmax_attention_cross_lengths_and_scale():
    q, k, v = qkv(i=5, j=11)
    ref = F.scaled_dot_product_attention(q, k, v, scale=0.3)
    torch.testing.assert_close(softmax_attention(q, k, v, scale=0.3), ref, rtol=1e-12, atol=1e-12)


def test_fully_padded_row_is_finite():
    q, k, v = qkv()
    mask = torch.zeros(2, 37, dtype=torch.bool)
    assert torch.isfinite(softmax_attention(q, k, v, mask)).all()


def test_causal_mask_is_lower_triangular():
    m = causal_mask(3, 4)
    assert m.tolist() == [[True, False, False, False], [True, True, False, False],
                          [True, True, True, False]]


def test_pad_to_multiple_and_mask():
    t = torch.ones(2, 3, 5, 4)
    padded, pad = pad_to_multiple(t, 4, dim=2)
    assert pad == 3 and padded.shape == (2, 3, 8, 4) and padded[:, :, 5:].abs().sum() == 0
    same, none = pad_to_multiple(t, 5, dim=2)
    assert none == 0 and same is t
    m = pad_mask(None, 2, 5, 3, "cpu")
    assert m.tolist() == [[True] * 5 + [False] * 3] * 2
    assert pad_mask(None, 2, 5, 0, "cpu") is None


@pytest.mark.parametrize("after", [0, 1, 2])
def test_block_windows_hold_the_block_before_and_the_blocks_after(after):
    t = torch.arange(2 * 12 * 3, dtype=torch.float64).reshape(2, 12, 3)  # 4 blocks of 3
    windows = block_windows(t, 3, dim=1, after=after, value=-1.0)  # (2, 4, 3, w)
    assert windows.shape == (2, 4, 3, (2 + after) * 3)
    for m in range(4):
        rows = [t[:, j] if 0 <= j < 12 else torch.full((2, 3), -1.0, dtype=t.dtype)
                for j in range(3 * m - 3, 3 * m + 3 + 3 * after)]
        assert torch.equal(windows[:, m], torch.stack(rows, dim=-1))


@pytest.mark.parametrize("bad, message", [
    (torch.randn(2, 5), r"expected x of shape \(batch, length >= 1, 8\), got \(2, 5\)"),
    (torch.randn(2, 5, 7), r"got \(2, 5, 7\)"),
    (torch.randn(2, 0, 8), r"length >= 1"),
    (torch.ones(2, 5, 8, dtype=torch.long), r"floating-point"),
])
def test_check_sequence_messages(bad, message):
    with pytest.raises(ValueError, match=message):
        check_sequence(bad, 8)


def test_check_sequence_mask_messages():
    x = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match=r"dtype torch.bool"):
        check_sequence(x, 8, torch.ones(2, 5))
    with pytest.raises(ValueError, match=r"expected mask of shape \(2, 5\), got \(2, 4\)"):
        check_sequence(x, 8, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        check_sequence([[1.0]], 8)


def test_check_qkv_messages():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="same last dim"):
        check_qkv(q, k[..., :3], v)
    with pytest.raises(ValueError, match="same length"):
        check_qkv(q, k, v[:, :, :4])
    with pytest.raises(ValueError, match=r"\(batch, heads\)"):
        check_qkv(q, k[:1], v[:1])


def test_shell_rejects_indivisible_heads():
    with pytest.raises(ValueError, match="heads=3 must divide dim=32"):
        MultiHead(32, heads=3)
    assert MultiHead(32, heads=3, dim_head=5).to_qkv.out_features == 45


def test_allowed_pattern_equals_sdpa_with_the_same_bool_mask():
    """`allowed` is SDPA's bool `attn_mask`: True = may attend; it combines with padding."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 7, 4, generator=g, dtype=torch.float64) for _ in range(3))
    allowed = torch.rand(7, 7, generator=g) > 0.5
    allowed |= torch.eye(7, dtype=torch.bool)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 5:] = False
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed & mask[:, None, None, :])
    got = softmax_attention(q, k, v, mask, allowed=allowed)
    assert torch.allclose(got[0], want[0], atol=1e-12)
    assert torch.allclose(got[1, :, :, :], want[1], atol=1e-12)
    with pytest.raises(ValueError, match="allowed must be a bool"):
        softmax_attention(q, k, v, allowed=allowed.double())


def test_pad_qkv_pads_to_the_multiple_and_extends_the_mask():
    q, k, v = torch.randn(2, 3, 10, 4), torch.randn(2, 3, 10, 4), torch.randn(2, 3, 10, 5)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 7:] = False
    pq, pk, pv, real = pad_qkv(q, k, v, mask, 4)
    assert pq.shape == (2, 3, 12, 4) and pv.shape == (2, 3, 12, 5)
    assert torch.equal(pq[:, :, :10], q) and not pk[:, :, 10:].any()
    assert torch.equal(real, torch.cat([mask, torch.zeros(2, 2, dtype=torch.bool)], dim=1))
    *_, real = pad_qkv(q, k, v, None, 5)  # already a multiple, no mask: every position real
    assert real.shape == (2, 10) and real.all()
