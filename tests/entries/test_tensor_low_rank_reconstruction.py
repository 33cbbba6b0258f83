"""Tensor low-rank reconstruction: TGM + TRM against the paper's formulas written out, the CP rank
of the attention tensor, and the size limit of the position generators."""

import pytest
import torch

import zoo


def paper_tgm_trm(layer, x):
    """For one image x (c, y, x): v_c^i = sigmoid(W_c^i mean_{y,x} x + b_c^i), v_h^i[y] =
    sigmoid(sum_z W_h^i[y, z] mean_{c,x} x[:, z] + b_h^i[y]), v_w^i likewise, A = sum_i lam_i
    v_c^i (x) v_h^i (x) v_w^i, Y = A * x; sums written out."""
    c, hh, ww = x.shape
    r = layer.rank
    w_c, b_c = layer.to_c.weight.view(r, c, c), layer.to_c.bias.view(r, c)
    mean_c = x.mean(dim=(1, 2))
    mean_h = torch.stack([x[:, i].mean() for i in range(hh)])
    mean_w = torch.stack([x[:, :, j].mean() for j in range(ww)])
    attn = torch.zeros_like(x)
    for i in range(r):
        v_c = torch.sigmoid(w_c[i] @ mean_c + b_c[i])
        v_h = torch.sigmoid(torch.stack([sum(layer.w_h[i, y, z] * mean_h[z] for z in range(hh))
                                         for y in range(hh)]) + layer.b_h[i, :hh])
        v_w = torch.sigmoid(torch.stack([sum(layer.w_w[i, p, z] * mean_w[z] for z in range(ww))
                                         for p in range(ww)]) + layer.b_w[i, :ww])
        for a in range(c):
            for y in range(hh):
                for p in range(ww):
                    attn[a, y, p] = attn[a, y, p] + layer.lam[i] * v_c[a] * v_h[y] * v_w[p]
    return attn * x


@pytest.mark.parametrize("rank, size", [(1, (3, 4)), (3, (4, 2)), (2, (5, 5))])
def test_equals_paper_formulas(rank, size):
    layer = zoo.create("tensor-low-rank-reconstruction", dim=4, rank=rank, max_size=6).double()
    with torch.no_grad():
        layer.lam.copy_(torch.randn(rank))
    x = torch.randn(2, 4, *size, dtype=torch.float64)
    expected = torch.stack([paper_tgm_trm(layer, xb) for xb in x])
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)


def test_gradients_match_paper_formulas():
    layer = zoo.create("tensor-low-rank-reconstruction", dim=3, rank=2, max_size=4).double()
    x = torch.randn(1, 3, 3, 4, dtype=torch.float64, requires_grad=True)
    ours = torch.autograd.grad(layer(x).square().sum(), x)[0]
    ref = torch.autograd.grad(paper_tgm_trm(layer, x[0]).square().sum(), x)[0]
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_attention_tensor_has_cp_rank_at_most_r(rank):
    """A = Y / X is a sum of r rank-1 tensors, so each of its unfoldings has matrix rank <= r,
    and at random weights exactly r (channels 8, height 7, width 6 all exceed r)."""
    layer = zoo.create("tensor-low-rank-reconstruction", dim=8, rank=rank, max_size=8).double()
    with torch.no_grad():
        layer.lam.copy_(torch.randn(rank))
    x = torch.randn(1, 8, 7, 6, dtype=torch.float64)
    attn = (layer(x) / x)[0]
    for unfolding in (attn.reshape(8, -1), attn.permute(1, 0, 2).reshape(7, -1),
                      attn.permute(2, 0, 1).reshape(6, -1)):
        assert torch.linalg.matrix_rank(unfolding, rtol=1e-9).item() == rank


def test_smaller_image_uses_the_top_left_block():
    """An image smaller than max_size is treated exactly as by a layer built for its size whose
    position maps are the top-left blocks."""
    big = zoo.create("tensor-low-rank-reconstruction", dim=4, rank=2, max_size=9).double()
    small = zoo.create("tensor-low-rank-reconstruction", dim=4, rank=2, max_size=5).double()
    with torch.no_grad():
        small.to_c.load_state_dict(big.to_c.state_dict())
        small.lam.copy_(big.lam)
        for name in ("w_h", "w_w"):
            getattr(small, name).copy_(getattr(big, name)[:, :5, :5])
        for name in ("b_h", "b_w"):
            getattr(small, name).copy_(getattr(big, name)[:, :5])
    x = torch.randn(2, 4, 5, 3, dtype=torch.float64)
    torch.testing.assert_close(big(x), small(x), rtol=1e-12, atol=1e-12)


def test_image_past_max_size_is_refused():
    layer = zoo.create("tensor-low-rank-reconstruction", dim=4, rank=2, max_size=8)
    with pytest.raises(ValueError, match="image of 4 x 9 exceeds max_size=8"):
        layer(torch.randn(1, 4, 4, 9))
