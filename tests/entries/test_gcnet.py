"""GCNet: the global context block's formula pixel by pixel, and its two stated relations (to the
non-local block and to squeeze-excitation)."""

import torch

import zoo
from zoo.entries.non_local import NonLocal


def paper_gc_block(layer, x):
    """z_i = x_i + W_v2 relu(LN(W_v1 sum_j softmax_j(W_k x_j) x_j)), written per pixel."""
    lin1, ln, lin2 = layer.transform[0], layer.transform[1], layer.transform[3]
    w_k = layer.w_k.weight[0, :, 0, 0]
    out = torch.empty_like(x)
    for b in range(x.shape[0]):
        pixels = x[b].flatten(1).T  # (n, c)
        scores = torch.stack([w_k @ p for p in pixels])
        alpha = torch.exp(scores - scores.max())
        alpha = alpha / alpha.sum()
        context = sum(a * p for a, p in zip(alpha, pixels, strict=True))
        h = lin1.weight @ context + lin1.bias
        h = (h - h.mean()) / torch.sqrt(h.var(unbiased=False) + ln.eps) * ln.weight + ln.bias
        delta = lin2.weight @ torch.relu(h) + lin2.bias
        out[b] = x[b] + delta[:, None, None]
    return out


def test_equals_paper_formula():
    layer = zoo.create("gcnet", dim=8, reduction=2).double()
    x = torch.randn(2, 8, 5, 7, dtype=torch.float64)
    torch.testing.assert_close(layer(x), paper_gc_block(layer, x), rtol=1e-12, atol=1e-12)


def test_gradients_match_paper_formula():
    layer = zoo.create("gcnet", dim=8, reduction=2).double()
    x = torch.randn(1, 8, 3, 4, dtype=torch.float64, requires_grad=True)
    ours = torch.autograd.grad(layer(x).square().sum(), x)[0]
    ref = torch.autograd.grad(paper_gc_block(layer, x).square().sum(), x)[0]
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)


def test_context_is_query_independent_non_local_pooling():
    """Sec. 3: the simplified non-local block. Its pooling equals a non-local block whose query
    embedding is constant (every query sees the same map softmax_j(W_k x_j)) and whose value
    embedding is the identity."""
    layer = zoo.create("gcnet", dim=6, reduction=2).double()
    x = torch.randn(2, 6, 4, 5, dtype=torch.float64)
    nl = NonLocal(6, inner_dim=6).double()
    with torch.no_grad():
        nl.theta.weight.zero_()
        nl.theta.bias.fill_(1.0)  # theta(x_i) = 1 for every i ...
        nl.phi.weight.copy_(layer.w_k.weight.expand(6, 6, 1, 1) / 6)  # ... so theta.phi = W_k x_j
        nl.phi.bias.zero_()
        for conv in (nl.g, nl.w_z):
            conv.weight.copy_(torch.eye(6)[..., None, None])
            conv.bias.zero_()
    pooled = nl(x) - x  # every pixel: sum_j alpha_j x_j
    context = pooled[:, :, 0, 0]
    torch.testing.assert_close(pooled, context[..., None, None].expand_as(pooled))
    expected = x + layer.transform(context)[..., None, None]
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)


def test_zero_key_weights_give_squeeze_excitation_average_pooling():
    """With W_k = 0 every pixel weighs 1/n: the context is global average pooling, as in SE."""
    layer = zoo.create("gcnet", dim=8, reduction=2).double()
    with torch.no_grad():
        layer.w_k.weight.zero_()
    x = torch.randn(2, 8, 5, 3, dtype=torch.float64)
    expected = x + layer.transform(x.mean(dim=(2, 3)))[..., None, None]
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)


def test_adds_one_vector_to_every_pixel_like_the_authors_block():
    """The authors' ContextBlock (github.com/xvjiarui/GCNet, defaults pooling_type='att',
    fusion_types=('channel_add',)) returns x plus a (b, c, 1, 1) term: the same shift at every
    pixel, and a different one per image."""
    layer = zoo.create("gcnet", dim=8).double()
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    shift = layer(x) - x
    torch.testing.assert_close(shift, shift[:, :, :1, :1].expand_as(shift))
    assert not torch.allclose(shift[0], shift[1])
