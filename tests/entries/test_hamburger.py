"""Hamburger (NMF ham): the multiplicative updates are Lee and Seung's rules and lower the
reconstruction error monotonically; the block equals its formula; gradients are one-step."""

import torch
import torch.nn.functional as F

import zoo
from zoo.entries.hamburger import nmf_ham, update_bases, update_coef

EPS = 1e-6


def problem(d=6, n=40, r=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, d, n, generator=g, dtype=torch.float64)
    x[x < 0.3] = 0.0  # ReLU features have exact zeros
    bases = F.normalize(torch.rand(1, d, r, generator=g, dtype=torch.float64), dim=1)
    coef = (x.transpose(1, 2) @ bases).softmax(-1)
    return x, bases, coef


def test_updates_are_the_multiplicative_rules_entry_by_entry():
    x, bases, coef = problem()
    X, D, C = x[0], bases[0], coef[0].T  # X (d, n) ~ D (d, r) C (r, n)
    new_c = torch.empty_like(C)
    for a in range(C.shape[0]):
        for j in range(C.shape[1]):
            new_c[a, j] = C[a, j] * ((D.T @ X)[a, j] + EPS) / ((D.T @ D @ C)[a, j] + EPS)
    torch.testing.assert_close(update_coef(x, bases, coef)[0].T, new_c, rtol=1e-14, atol=0)
    new_d = torch.empty_like(D)
    for i in range(D.shape[0]):
        for a in range(D.shape[1]):
            new_d[i, a] = D[i, a] * ((X @ new_c.T)[i, a] + EPS) / ((D @ new_c @ new_c.T)[i, a] + EPS)
    torch.testing.assert_close(update_bases(x, bases, new_c.T[None])[0], new_d, rtol=1e-14, atol=0)


def error(x, bases, coef):
    return (x - bases @ coef.transpose(1, 2)).norm().item()


def test_every_update_lowers_the_reconstruction_error():
    for seed in range(5):
        x, bases, coef = problem(seed=seed)
        errors = [error(x, bases, coef)]
        for _ in range(50):
            coef = update_coef(x, bases, coef, EPS)
            errors.append(error(x, bases, coef))
            bases = update_bases(x, bases, coef, EPS)
            errors.append(error(x, bases, coef))
        # monotone up to float64 rounding of the norm itself
        steps = [b - a for a, b in zip(errors, errors[1:], strict=False)]
        assert max(steps) <= 1e-13 * errors[0], (seed, max(steps))
        assert errors[-1] < 0.8 * errors[0]


def test_block_equals_its_formula():
    layer = zoo.create("hamburger", dim=6, rank=3, steps=4).double().eval()
    z = torch.randn(2, 6, 5, 7, dtype=torch.float64)
    expected = torch.empty_like(z)
    for b in range(2):
        X = torch.relu(torch.einsum("oc,cp->op", layer.lower_bread.weight[:, :, 0, 0], z[b].flatten(1))
                       + layer.lower_bread.bias[:, None])
        D = layer.bases.double().clone()
        C = (X.T @ D).softmax(-1).T  # (r, n)
        for _ in range(4):
            C = C * (D.T @ X + EPS) / (D.T @ D @ C + EPS)
            D = D * (X @ C.T + EPS) / (D @ C @ C.T + EPS)
        C = C * (D.T @ X + EPS) / (D.T @ D @ C + EPS)
        expected[b] = z[b] + (layer.upper_bread.weight[:, :, 0, 0] @ D @ C).reshape(6, 5, 7)
    torch.testing.assert_close(layer(z), expected, rtol=1e-10, atol=1e-12)


def test_gradient_flows_through_the_last_coefficient_update_only():
    x, bases, _ = problem()
    x.requires_grad_()
    (grad,) = torch.autograd.grad(nmf_ham(x, bases, steps=3).square().sum(), x)
    with torch.no_grad():  # the iterates, detached
        coef = (x.transpose(1, 2) @ bases).softmax(-1)
        d = bases
        for _ in range(3):
            coef = update_coef(x, d, coef)
            d = update_bases(x, d, coef)
    one_step = d @ (coef * ((x.transpose(1, 2) @ d) + EPS) / (coef @ d.transpose(1, 2) @ d + EPS)
                    ).transpose(1, 2)
    (expected,) = torch.autograd.grad(one_step.square().sum(), x)
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-14)


def test_bases_are_a_seeded_buffer_in_eval_and_redrawn_in_training():
    a, b = (zoo.create("hamburger", dim=8, rank=4, seed=s) for s in (0, 1))
    assert "bases" in dict(a.named_buffers()) and not torch.equal(a.bases, b.bases)
    torch.testing.assert_close(a.bases.norm(dim=0), torch.ones(4))
    z = torch.randn(1, 8, 4, 4)
    assert torch.equal(a.eval()(z), a(z))
    torch.manual_seed(0)
    assert not torch.equal(a.train()(z), a(z))


def test_rank_is_a_keyword_with_a_default():
    assert zoo.create("hamburger", dim=32).rank == 64
