"""ETC: the four attention pieces read off the layer are the paper's (three unrestricted, long-to-long
within the radius); the output equals the reference (softmax on that pattern); two hops connect everything."""

import pytest
import torch

import zoo
from tests.oracles import assert_equals_at_real_tokens, qkv
from zoo import probe
from zoo.core.softmax import softmax_attention
from zoo.entries.etc import etc_attention, etc_attention_reference


def paper_pattern(n, g, r):
    """g2g, g2l, l2g: every pair; l2l: |i - j| <= r."""
    allowed = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            allowed[i, j] = i < g or j < g or abs(i - j) <= r
    return allowed


CASES = [(1, 1), (2, 3), (3, 5), (4, 8)]


@pytest.mark.parametrize("g, r", CASES, ids=[f"g{g}-r{r}" for g, r in CASES])
def test_support_of_attention_matrix_is_global_local(g, r):
    layer = zoo.create("etc", dim=32, heads=2, global_tokens=g, radius=r).double()
    a = probe.attention_matrix(layer, n=37)  # 37 - g long tokens: not a multiple of r
    for head in a:
        assert torch.equal(head != 0, paper_pattern(37, g, r))


@pytest.mark.parametrize("g, r", CASES, ids=[f"g{g}-r{r}" for g, r in CASES])
def test_output_and_gradients_equal_the_reference(g, r):
    q, k, v = (t.requires_grad_() for t in qkv())
    mask = torch.ones(2, 37, dtype=torch.bool)
    mask[1, 30:] = False
    mask[1, [0, 12]] = False  # a padded global token too
    out = etc_attention(q, k, v, mask, global_tokens=g, radius=r)
    ref = etc_attention_reference(q, k, v, mask, global_tokens=g, radius=r)
    assert_equals_at_real_tokens(out, ref, (q, k, v), mask)


def test_long_tokens_reach_each_other_through_the_global_tokens():
    """The paper's motivation: a restricted l2l piece, yet two layers connect every pair."""
    p = (probe.attention_matrix(zoo.create("etc", dim=32, heads=2, global_tokens=1,
                                           radius=2).double(), n=30)[0] != 0).double()
    assert not p.bool().all() and ((p @ p) > 0).all()


@pytest.mark.parametrize("n", [1, 2, 37])
def test_all_global_or_a_covering_radius_is_softmax_attention(n):
    q, k, v = qkv(n=n)
    ref = softmax_attention(q, k, v)
    torch.testing.assert_close(etc_attention(q, k, v, global_tokens=n, radius=1), ref,
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(etc_attention(q, k, v, global_tokens=1, radius=n), ref,
                               rtol=1e-12, atol=1e-12)


def test_largest_intermediate_is_linear_in_the_long_length():
    s = probe.scaling(zoo.entry("etc"), ns=(1024, 4096))
    assert abs(s.memory - 1) <= 0.05 and abs(s.time - 1) <= 0.05
    assert max(s.largest) < 4096 ** 2 / 32  # far from any n x n tensor
