"""Hedgehog: the chunkwise linear form equals the explicit normalised map (outputs and gradients,
the feature maps' too); the features by their definition; the distillation loss is a
cross-entropy (never below softmax's entropy) that training the maps lowers; step == forward."""

import pytest
import torch

from tests.oracles import assert_same_outputs_and_grads
from tests.stepping import assert_steps_equal_forward, padding_mask, randn
from zoo.entries.hedgehog import (
    Hedgehog,
    distillation_loss,
    hedgehog_attention,
    hedgehog_attention_reference,
    hedgehog_features,
)


def maps(h=3, d=8, seed=10):
    return [randn(h, d, d, seed=seed).requires_grad_(), randn(h, d, seed=seed + 1).requires_grad_(),
            randn(h, d, d, seed=seed + 2).requires_grad_(), randn(h, d, seed=seed + 3).requires_grad_()]


def test_features_by_their_definition():
    x, (w, b, _, _) = randn(1, 3, 4, 8, seed=1), maps()
    z = torch.stack([x[0, h] @ w[h] + b[h] for h in range(3)])
    want = torch.cat([z.exp() / z.exp().sum(-1, keepdim=True),
                      (-z).exp() / (-z).exp().sum(-1, keepdim=True)], -1)
    torch.testing.assert_close(hedgehog_features(x, w, b)[0], want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("chunk", [1, 8, 64])
def test_linear_form_equals_explicit_map(causal, chunk):
    q, k, v = (randn(2, 3, 37, 8, seed=s).requires_grad_() for s in range(3))
    m = maps()
    mask = padding_mask(37)
    assert_same_outputs_and_grads(hedgehog_attention(q, k, v, m, mask, causal=causal, chunk=chunk),
                                  hedgehog_attention_reference(q, k, v, m, mask, causal=causal),
                                  (q, k, v, *m))


def test_distillation_loss_is_a_cross_entropy_that_training_lowers():
    q, k = randn(2, 3, 16, 8, seed=1), randn(2, 3, 16, 8, seed=2)
    m = [t.detach().requires_grad_() for t in maps(seed=20)]
    scores = (q @ k.transpose(-1, -2) / 8 ** 0.5).masked_fill(~torch.ones(16, 16, dtype=torch.bool).tril(),
                                                               float("-inf"))
    p = scores.softmax(-1)
    entropy = -(p * p.clamp(min=1e-300).log()).sum(-1).mean()
    loss = distillation_loss(q, k, m, causal=True)
    assert loss > entropy  # cross-entropy = entropy + KL, KL > 0 unless the maps match
    opt = torch.optim.Adam(m, lr=0.05)
    for _ in range(30):
        opt.zero_grad()
        distillation_loss(q, k, m, causal=True).backward()
        opt.step()
    after = distillation_loss(q, k, m, causal=True)
    assert entropy < after < loss - 0.1 * (loss - entropy)


def test_maps_start_at_the_identity():
    layer = Hedgehog(16, heads=2)
    assert torch.equal(layer.w_q, torch.eye(8).expand(2, 8, 8)) and not layer.b_k.any()


def test_step_equals_causal_forward_over_random_splits_and_needs_causal():
    for seed in (0, 1):
        assert_steps_equal_forward("hedgehog", seed=seed)

