"""FAVOR: the trigonometric estimate is unbiased, the causal forms agree with each other and with
the explicit kernel, and the random-feature shell keeps its projections as a seeded buffer."""

import math

import pytest
import torch

import zoo
from zoo import probe
from zoo.core.features import gaussian_projection, trig_features
from zoo.core.linear import causal_sum, kernel_attention_recurrent, prefix_sum
from zoo.entries.performer_favor import favor_attention, favor_attention_reference

RANDOM_FEATURE_ENTRIES = ["performer-favor", "performer", "slim-performer", "random-feature-attention"]


def randn(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def explicit_favor(q, k, v, w, causal):
    """The paper's estimate written out as an n x n map: e^{|q|^2/2 + |k|^2/2} mean_r cos(w_r.(q - k))."""
    q, k = q * q.shape[-1] ** -0.25, k * k.shape[-1] ** -0.25
    diff = q[..., :, None, :] - k[..., None, :, :]  # (b h i j d)
    cosines = torch.einsum("bhijd,hmd->bhijm", diff, w).cos().mean(-1)
    norms = (q.square().sum(-1)[..., :, None] + k.square().sum(-1)[..., None, :]) / 2
    attn = norms.exp() * cosines
    if causal:
        attn = attn.tril()
    return (attn / attn.sum(-1, keepdim=True)) @ v


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_favor_sin_cos_features_give_the_cosine_kernel_of_the_difference(causal):
    """The reference's sin/cos features multiply out to mean_r cos(w_r.(q - k)), the Gaussian
    kernel's estimate (the fast path is held equal to the reference by tests/test_forms.py)."""
    q, k, v = randn(2, 3, 37, 8, seed=1), randn(2, 3, 37, 8, seed=2), randn(2, 3, 37, 5, seed=3)
    w = torch.stack([gaussian_projection(16, 8, generator=torch.Generator().manual_seed(h))
                     for h in range(3)])
    torch.testing.assert_close(favor_attention_reference(q, k, v, w, causal=causal),
                               explicit_favor(q, k, v, w, causal), rtol=1e-9, atol=1e-10)


def test_trig_kernel_estimate_is_unbiased_error_falls_like_inverse_sqrt_draws():
    """Mean of R independent estimates of exp(q.k): the RMS error over 24 groups falls as R^-1/2
    (an estimator with a bias would level off at the bias)."""
    d, groups = 8, 24
    q, k = randn(1, 1, 6, d, seed=1, scale=d ** -0.5), randn(1, 1, 6, d, seed=2, scale=d ** -0.5)
    exact = (q @ k.transpose(-1, -2)).exp()[0, 0]
    g = torch.Generator().manual_seed(3)

    def estimate():
        w = gaussian_projection(d, d, generator=g)[None]
        fq = trig_features(q, w) * (q.square().sum(-1, keepdim=True) / 2).exp()
        fk = trig_features(k, w) * (k.square().sum(-1, keepdim=True) / 2).exp()
        return (fq @ fk.transpose(-1, -2))[0, 0]

    rms = {}
    for draws in (4, 256):
        means = torch.stack([torch.stack([estimate() for _ in range(draws)]).mean(0)
                             for _ in range(groups)])
        rms[draws] = ((means - exact).norm(dim=(-1, -2)) / exact.norm()).square().mean().sqrt()
    slope = math.log(rms[256] / rms[4]) / math.log(256 / 4)
    assert -0.6 < slope < -0.4, (rms, slope)


@pytest.mark.parametrize("chunk", [1, 5, 8, 64])
def test_chunked_causal_sum_equals_prefix_sum_form(chunk):
    phi_q, phi_k, v = randn(2, 3, 37, 6, seed=1), randn(2, 3, 37, 6, seed=2), randn(2, 3, 37, 4, seed=3)
    torch.testing.assert_close(causal_sum(phi_q, phi_k, v, chunk=chunk), prefix_sum(phi_q, phi_k, v),
                               rtol=1e-11, atol=1e-11)


def test_chunked_causal_sum_gradients_equal_prefix_sum_form():
    inputs = [randn(1, 2, 19, 4, seed=s).requires_grad_() for s in range(3)]
    grads = torch.autograd.grad(causal_sum(*inputs, chunk=4).square().sum(), inputs)
    ref = torch.autograd.grad(prefix_sum(*inputs).square().sum(), inputs)
    for a, b in zip(grads, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_causal_favor_equals_one_token_at_a_time():
    """The recurrent form with unshifted features; the layer's shifted, chunked form agrees."""
    q, k, v = randn(2, 2, 23, 8, seed=1), randn(2, 2, 23, 8, seed=2), randn(2, 2, 23, 5, seed=3)
    w = gaussian_projection(12, 8, generator=torch.Generator().manual_seed(0))[None].expand(2, 12, 8)
    qs, ks = q * 8 ** -0.25, k * 8 ** -0.25
    phi_q = trig_features(qs, w) * (qs.square().sum(-1, keepdim=True) / 2).exp()
    phi_k = trig_features(ks, w) * (ks.square().sum(-1, keepdim=True) / 2).exp()
    torch.testing.assert_close(favor_attention(q, k, v, w, causal=True, chunk=4),
                               kernel_attention_recurrent(phi_q, phi_k, v), rtol=1e-9, atol=1e-10)


def test_projection_rows_orthogonal_in_blocks_with_gaussian_lengths():
    w = gaussian_projection(20, 8, generator=torch.Generator().manual_seed(0))
    for block in (w[:8], w[8:16], w[16:]):
        gram = block @ block.T
        torch.testing.assert_close(gram - torch.diag(gram.diagonal()), torch.zeros_like(gram),
                                   rtol=0, atol=1e-12)
    lengths = w.norm(dim=-1)
    assert lengths.std() > 0.1 and abs(lengths.square().mean() - 8) < 4  # chi_8 lengths, not fixed
    iid = gaussian_projection(8, 8, orthogonal=False, generator=torch.Generator().manual_seed(0))
    assert (iid @ iid.T - torch.diag((iid @ iid.T).diagonal())).abs().max() > 0.1


@pytest.mark.parametrize("name", RANDOM_FEATURE_ENTRIES)
def test_random_features_are_a_seeded_buffer_redrawn_only_in_training(name):
    def make(**kw):
        return zoo.create(name, dim=32, heads=2, features=8, **kw).double()

    layer = make()
    assert "projection" in dict(layer.named_buffers())
    assert "projection" in layer.state_dict()
    assert all(p is not layer.projection for p in layer.parameters())
    torch.testing.assert_close(make().projection, layer.projection, rtol=0, atol=0)
    assert not torch.equal(make(seed=1).projection, layer.projection)
    x = randn(2, 9, 32)
    redrawing = make(redraw=True)
    redrawing.load_state_dict(layer.state_dict())
    assert torch.equal(redrawing.eval()(x), layer.eval()(x))  # eval mode: the buffer, every call
    assert not torch.equal(redrawing.train()(x), redrawing(x))  # training mode: a new draw per call
    assert torch.equal(layer.train()(x), layer(x))  # redraw=False: the buffer in training too
    torch.testing.assert_close(redrawing.projection, layer.projection, rtol=0, atol=0)


@pytest.mark.parametrize("name", RANDOM_FEATURE_ENTRIES)
def test_causal_layer_is_linear_in_time_and_memory(name):
    e = zoo.entry(name)
    s = probe.scaling(e, make=lambda **kw: zoo.create(e.id, dim=32, causal=True, **e.hparams, **kw))
    assert abs(s.time - 1) < 0.1 and abs(s.memory - 1) < 0.1, s
