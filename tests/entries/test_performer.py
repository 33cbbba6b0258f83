"""FAVOR+: unbiased positive features, orthogonal beats i.i.d., error falls with the feature
count, and the causal forms agree with the explicit kernel and the recurrent form."""

import math

import pytest
import torch

from zoo.core.features import gaussian_projection, positive_features, trig_features
from zoo.core.linear import kernel_attention_recurrent
from zoo.core.softmax import softmax_attention
from zoo.entries.performer import favor_plus_attention

D = 8


def with_grads(out, inputs):
    """The output and the gradients of a fixed scalar function of it."""
    return (out, *torch.autograd.grad(out.square().sum(), inputs))


def randn(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def projections(m, d, heads):
    return torch.stack([gaussian_projection(m, d, generator=torch.Generator().manual_seed(h))
                        for h in range(heads)])


def small_qk(n=6, seed=0):
    """Queries and keys of length about 1: moderate variance, so trends show at few draws."""
    return randn(1, 1, n, D, seed=seed, scale=D ** -0.5), randn(1, 1, n, D, seed=seed + 1, scale=D ** -0.5)


def kernel_estimate(q, k, w):
    return (positive_features(q, w[None]) @ positive_features(k, w[None]).transpose(-1, -2))[0, 0]


def test_positive_features_are_unbiased_error_falls_like_inverse_sqrt_draws():
    """The mean of R independent estimates of exp(q.k): the RMS error over 24 groups of draws
    falls as R^-1/2, and the attention built from the mean converges to softmax attention."""
    q, k = small_qk()
    exact = (q @ k.transpose(-1, -2)).exp()[0, 0]
    v = randn(1, 1, 6, 3, seed=9)
    g = torch.Generator().manual_seed(3)
    rms, attn_err = {}, {}
    for draws in (4, 256):
        means = torch.stack([torch.stack([kernel_estimate(q, k, gaussian_projection(D, D, generator=g))
                                          for _ in range(draws)]).mean(0) for _ in range(24)])
        rms[draws] = ((means - exact).norm(dim=(-1, -2)) / exact.norm()).square().mean().sqrt()
        out = (means / means.sum(-1, keepdim=True)) @ v[0, 0]
        ref = softmax_attention(q, k, v, scale=1.0)[0, 0]
        attn_err[draws] = ((out - ref).norm(dim=(-1, -2)) / ref.norm()).mean()
    slope = math.log(rms[256] / rms[4]) / math.log(256 / 4)
    assert -0.6 < slope < -0.4, (rms, slope)
    assert attn_err[256] < attn_err[4] / 4, attn_err


def test_orthogonal_features_have_lower_error_than_iid():
    """Same feature count (one block of d = 16), 512 draws for each of three inputs: the mean
    squared error of the kernel estimate is lower with orthogonal projections."""
    d, mse = 16, {True: 0.0, False: 0.0}
    for seed in range(3):
        q, k = (randn(1, 1, 6, d, seed=seed + i, scale=0.5 * d ** -0.5) for i in (0, 10))
        exact = (q @ k.transpose(-1, -2)).exp()[0, 0]
        for orthogonal in (True, False):
            g = torch.Generator().manual_seed(100 + seed)
            for _ in range(512):
                est = kernel_estimate(q, k, gaussian_projection(d, d, orthogonal=orthogonal, generator=g))
                mse[orthogonal] += ((est - exact).norm() / exact.norm()).square().item()
    assert mse[True] < 0.92 * mse[False], mse


def test_attention_error_falls_as_features_grow():
    q, k = small_qk(n=16)
    v = randn(1, 1, 16, 4, seed=5)
    ref = softmax_attention(q, k, v, scale=1.0)
    q, k = q * D ** 0.25, k * D ** 0.25  # the layer's d^-1/4 scaling then gives q.k unscaled
    errors = []
    for m in (4, 16, 64, 256, 1024):
        g = torch.Generator().manual_seed(m)
        errs = [(favor_plus_attention(q, k, v, gaussian_projection(m, D, generator=g)[None]) - ref).norm()
                / ref.norm() for _ in range(16)]
        errors.append(torch.stack(errs).mean().item())
    assert all(big < small for small, big in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] < errors[0] / 5, errors


def explicit_favor_plus(q, k, v, w, causal):
    """The estimate as an n x n map, each entry mean_r exp(w_r.q' - |q'|^2/2 + w_r.k' - |k'|^2/2)."""
    q, k = q * q.shape[-1] ** -0.25, k * k.shape[-1] ** -0.25
    wq, wk = torch.einsum("bhid,hmd->bhim", q, w), torch.einsum("bhjd,hmd->bhjm", k, w)
    terms = (wq[..., :, None, :] + wk[..., None, :, :] - q.square().sum(-1)[..., :, None, None] / 2
             - k.square().sum(-1)[..., None, :, None] / 2)
    attn = terms.exp().mean(-1)
    if causal:
        attn = attn.tril()
    return (attn / attn.sum(-1, keepdim=True)) @ v


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_favor_plus_equals_explicit_kernel_outputs_and_gradients(causal):
    inputs = [randn(2, 3, 29, s, seed=i).requires_grad_() for i, s in enumerate((8, 8, 5))]
    q, k, v = inputs
    w = projections(16, 8, heads=3)
    out = favor_plus_attention(q, k, v, w, causal=causal, chunk=8)
    ref = explicit_favor_plus(q, k, v, w, causal)
    torch.testing.assert_close(with_grads(out, inputs), with_grads(ref, inputs), rtol=1e-9, atol=1e-11)


def test_causal_favor_plus_equals_one_token_at_a_time():
    q, k, v = randn(2, 2, 23, 8, seed=1), randn(2, 2, 23, 8, seed=2), randn(2, 2, 23, 5, seed=3)
    w = projections(12, 8, heads=2)
    phi_q, phi_k = positive_features(q * 8 ** -0.25, w), positive_features(k * 8 ** -0.25, w)
    torch.testing.assert_close(favor_plus_attention(q, k, v, w, causal=True, chunk=4),
                               kernel_attention_recurrent(phi_q, phi_k, v), rtol=1e-10, atol=1e-12)


def test_positive_weights_where_trigonometric_ones_turn_negative():
    """The reason for FAVOR+: small softmax weights estimated by cosines go negative."""
    q, k = randn(1, 1, 32, D, seed=1), randn(1, 1, 32, D, seed=2)
    w = gaussian_projection(16, D, generator=torch.Generator().manual_seed(0))[None]
    trig = trig_features(q, w) @ trig_features(k, w).transpose(-1, -2)
    positive = positive_features(q, w) @ positive_features(k, w).transpose(-1, -2)
    assert (trig < 0).any() and (positive > 0).all()


def test_large_inputs_stay_finite_causal_and_masked():
    q, k, v = randn(2, 2, 40, 8, seed=1, scale=100), randn(2, 2, 40, 8, seed=2, scale=100), randn(2, 2, 40, 3)
    w = gaussian_projection(16, 8, generator=torch.Generator().manual_seed(0))[None].expand(2, 16, 8)
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[1] = False
    for dtype in (torch.float32, torch.float64):
        out = favor_plus_attention(*(t.to(dtype) for t in (q, k, v, w)), mask, causal=True, chunk=8)
        assert torch.isfinite(out).all()
