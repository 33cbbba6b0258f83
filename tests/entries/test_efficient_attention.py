"""Efficient attention: the paper's identity, the explicit formula, and the drop-in module."""

import pytest
import torch
from torch import nn

import zoo
from zoo.entries.efficient_attention import EfficientAttention2d, efficient_attention


def qkv(b=2, h=3, n=37, d=8, e=6):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(b, h, n, s, generator=g, dtype=torch.float64) for s in (d, d, e)]


def test_scaling_normalisation_equals_dot_product_attention():
    """The paper's claim: with rho(Y) = Y / sqrt(n) it *is* dot-product attention (QK^T/n) V."""
    q, k, v = qkv()
    n = q.shape[2]
    dot_product = (q @ k.transpose(-1, -2) / n) @ v
    torch.testing.assert_close(efficient_attention(q, k, v, normalization="scaling"), dot_product,
                               rtol=1e-12, atol=1e-12)


def test_scaling_normalisation_with_padding_uses_real_length():
    q, k, v = qkv()
    mask = torch.ones(2, 37, dtype=torch.bool)
    mask[0, 20:] = False
    out = efficient_attention(q, k, v, mask, normalization="scaling")
    ref = (q[0] @ k[0, :, :20].transpose(-1, -2) / 20) @ v[0, :, :20]
    torch.testing.assert_close(out[0], ref, rtol=1e-12, atol=1e-12)


def test_softmax_normalisation_equals_explicit_map():
    """E = softmax_row(Q) softmax_col(K)^T V, computed as an explicit n x n map."""
    q, k, v = qkv()
    attn = q.softmax(-1) @ k.softmax(-2).transpose(-1, -2)
    torch.testing.assert_close(efficient_attention(q, k, v), attn @ v, rtol=1e-12, atol=1e-12)
    # each row of the effective map sums to one: a convex mix of convex key maps
    torch.testing.assert_close(attn.sum(-1), torch.ones_like(attn.sum(-1)))


def test_unknown_normalisation_is_refused():
    with pytest.raises(ValueError, match="normalization must be one of 'softmax', 'scaling'"):
        zoo.create("efficient-attention", dim=32, normalization="l2")


class OriginalEfficientAttention(nn.Module):
    """The authors' module as described in shared/seeds/efficient-attention-notes.md (constructor,
    sub-module names, per-head loop over contiguous channel blocks, two softmaxes, reprojection
    and residual), written in the test as an independent oracle."""

    def __init__(self, in_channels, key_channels, head_count, value_channels):
        super().__init__()
        self.in_channels, self.key_channels = in_channels, key_channels
        self.head_count, self.value_channels = head_count, value_channels
        self.keys = nn.Conv2d(in_channels, key_channels, 1)
        self.queries = nn.Conv2d(in_channels, key_channels, 1)
        self.values = nn.Conv2d(in_channels, value_channels, 1)
        self.reprojection = nn.Conv2d(value_channels, in_channels, 1)

    def forward(self, x):
        b, _, hh, ww = x.shape
        keys = self.keys(x).reshape(b, self.key_channels, hh * ww)
        queries = self.queries(x).reshape(b, self.key_channels, hh * ww)
        values = self.values(x).reshape(b, self.value_channels, hh * ww)
        dk, dv = self.key_channels // self.head_count, self.value_channels // self.head_count
        heads = []
        for i in range(self.head_count):
            key = torch.softmax(keys[:, i * dk:(i + 1) * dk, :], dim=2)
            query = torch.softmax(queries[:, i * dk:(i + 1) * dk, :], dim=1)
            value = values[:, i * dv:(i + 1) * dv, :]
            context = key @ value.transpose(1, 2)
            heads.append((context.transpose(1, 2) @ query).reshape(b, dv, hh, ww))
        return self.reprojection(torch.cat(heads, dim=1)) + x


@pytest.mark.parametrize("config", [(16, 8, 2, 12, 5, 7), (32, 32, 4, 32, 9, 3),
                                    (8, 10, 3, 9, 4, 4), (3, 4, 1, 6, 6, 5)],
                         ids=["16-8-2-12", "32-32-4-32", "keys-not-divisible", "one-head"])
def test_drop_in_loads_original_checkpoint_and_matches(config, tmp_path):
    c, dk, h, dv, y, x = config
    torch.manual_seed(0)
    original = OriginalEfficientAttention(c, dk, h, dv).double()
    torch.save(original.state_dict(), tmp_path / "original.pt")
    ours = EfficientAttention2d(c, dk, h, dv).double()
    assert list(ours.state_dict()) == list(original.state_dict())
    ours.load_state_dict(torch.load(tmp_path / "original.pt"))
    inp = torch.randn(2, c, y, x, dtype=torch.float64)
    torch.testing.assert_close(ours(inp), original(inp), rtol=1e-12, atol=1e-12)


def test_drop_in_refuses_indivisible_value_channels():
    with pytest.raises(ValueError, match="value_channels=8 must be divisible by head_count=3"):
        EfficientAttention2d(8, 8, 3, 8)


def test_drop_in_shape_error():
    with pytest.raises(ValueError, match=r"expected x of shape \(batch, 8, height, width\)"):
        EfficientAttention2d(8, 8, 2, 8)(torch.randn(2, 7, 4, 4))
