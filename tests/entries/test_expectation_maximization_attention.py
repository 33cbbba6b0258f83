"""EM attention: the E- and M-steps against explicit loops, the EM objective falling at every
iteration, unit bases, and the moving average of the initial bases (training mode only)."""

import pytest
import torch

import zoo
from zoo.entries.expectation_maximization_attention import em_attention


def data(b=2, n=30, c=6, r=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, c, generator=g, dtype=torch.float64) + 1.5 * torch.randn(
        b, 1, c, generator=g, dtype=torch.float64)
    mu = torch.randn(b, r, c, generator=g, dtype=torch.float64)
    return x, mu / mu.norm(dim=-1, keepdim=True)


def em_loop(x, mu, iterations, lam):
    """The paper's steps for one image, sum by sum: z_nk = exp(lam x_n.mu_k) / sum_j ...;
    mu_k = sum_n z_nk x_n / sum_n z_nk, then mu_k / |mu_k|; finally x~_n = sum_k z_nk mu_k."""
    n, r = x.shape[0], mu.shape[0]
    for _ in range(iterations):
        z = torch.empty(n, r, dtype=x.dtype)
        for i in range(n):
            e = torch.stack([torch.exp(lam * (x[i] @ mu[k])) for k in range(r)])
            z[i] = e / e.sum()
        new = []
        for k in range(r):
            m = sum(z[i, k] * x[i] for i in range(n)) / z[:, k].sum()
            new.append(m / m.norm())
        mu = torch.stack(new)
    recon = torch.stack([sum(z[i, k] * mu[k] for k in range(r)) for i in range(n)])
    return recon, z, mu


@pytest.mark.parametrize("iterations, lam", [(1, 1.0), (3, 1.0), (3, 2.5)])
def test_steps_equal_explicit_loops(iterations, lam):
    x, mu = data()
    recon, z, mu_t = em_attention(x, mu, iterations=iterations, lam=lam)
    for b in range(x.shape[0]):
        r_ref, z_ref, mu_ref = em_loop(x[b], mu[b], iterations, lam)
        # the 1e-6 guard on the M-step's denominator cancels in the normalisation
        torch.testing.assert_close(z[b], z_ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(mu_t[b], mu_ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(recon[b], r_ref, rtol=1e-12, atol=1e-12)


def log_likelihood(x, mu, lam):
    """sum_n log sum_k exp(lam x_n . mu_k): the mixture likelihood (equal weights, von
    Mises-Fisher components of concentration lam) whose EM steps are the paper's E-step and its
    M-step followed by L2Norm. EM never lowers it."""
    scores = lam * torch.einsum("bnc,brc->bnr", x, mu)
    return torch.logsumexp(scores, dim=-1).sum(dim=-1)


@pytest.mark.parametrize("lam", [0.5, 1.0, 3.0])
def test_iterations_raise_the_em_objective_monotonically(lam):
    x, mu0 = data(n=60, c=8, r=5, seed=3)
    values = [log_likelihood(x, mu0, lam)]
    for t in range(1, 9):
        _, _, mu_t = em_attention(x, mu0, iterations=t, lam=lam)
        values.append(log_likelihood(x, mu_t, lam))
    values = torch.stack(values)  # (t, b)
    steps = values[1:] - values[:-1]
    assert bool((steps >= -1e-10 * values.abs().max()).all()), steps
    assert bool((values[-1] > values[0]).all())


def test_bases_stay_normalised():
    x, mu = data()
    for t in (1, 2, 5):
        _, _, mu_t = em_attention(x * 40, mu, iterations=t)
        torch.testing.assert_close(mu_t.norm(dim=-1), torch.ones(mu_t.shape[:2], dtype=x.dtype))
    layer = zoo.create("expectation-maximization-attention", dim=8, bases=5)
    torch.testing.assert_close(layer.mu.norm(dim=-1), torch.ones(5))


def test_layer_equals_its_formula():
    layer = zoo.create("expectation-maximization-attention", dim=6, bases=4, iterations=2,
                       lam=1.5).double().eval()
    x = torch.randn(2, 6, 3, 5, dtype=torch.float64)
    w_in, b_in = layer.conv_in.weight[:, :, 0, 0], layer.conv_in.bias
    w_out, b_out = layer.conv_out.weight[:, :, 0, 0], layer.conv_out.bias
    for b in range(2):
        pixels = x[b].flatten(1).T @ w_in.T + b_in  # (n, c)
        recon, _, _ = em_loop(pixels, layer.mu.double(), 2, 1.5)
        expected = x[b] + (recon @ w_out.T + b_out).T.reshape(6, 3, 5)
        torch.testing.assert_close(layer(x)[b], expected, rtol=1e-12, atol=1e-12)


def test_moving_average_of_initial_bases_only_in_training():
    """As the paper's bases maintenance and the authors' EMAU (github.com/XiaLiPKU/EMANet: a
    (c, k) buffer, Kaiming-normal then L2-normalised, moved in training by momentum 0.9 towards
    the batch mean of the final bases, then L2-normalised): eval calls never move it."""
    layer = zoo.create("expectation-maximization-attention", dim=8, bases=4, iterations=2,
                       momentum=0.7).double()
    x = torch.randn(3, 8, 4, 4, dtype=torch.float64)
    before = layer.mu.clone()
    layer.eval()
    out = layer(x)
    assert torch.equal(layer.mu, before)  # eval: the buffer never moves
    assert torch.equal(layer(x), out)

    layer.train()
    pixels = layer.conv_in(x).flatten(2).transpose(1, 2)
    _, _, mu_t = em_attention(pixels, before.expand(3, 4, 8), iterations=2)
    layer(x)
    expected = 0.7 * before + 0.3 * mu_t.mean(dim=0)
    expected = expected / expected.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(layer.mu, expected, rtol=1e-12, atol=1e-12)
    # the next eval call uses the moved bases, still one image at a time
    layer.eval()
    torch.testing.assert_close(layer(x[1:2]), layer(x)[1:2], rtol=1e-12, atol=1e-12)


def test_seed_draws_the_initial_bases():
    a = zoo.create("expectation-maximization-attention", dim=8, bases=4, seed=1)
    b = zoo.create("expectation-maximization-attention", dim=8, bases=4, seed=1)
    c = zoo.create("expectation-maximization-attention", dim=8, bases=4, seed=2)
    assert torch.equal(a.mu, b.mu) and not torch.equal(a.mu, c.mu)
