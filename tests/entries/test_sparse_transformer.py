"""Sparse Transformer: both factorised patterns, read off the layer, equal the paper's sets; the
output equals dense softmax restricted to them; two hops reach every earlier position."""

import pytest
import torch

import zoo
from zoo import probe
from zoo.core.softmax import softmax_attention
from zoo.entries.sparse_transformer import (
    sparse_transformer_attention,
    sparse_transformer_attention_reference,
)
from zoo.verify.contract import factory


def paper_pattern(n, pattern, l, c, causal):  # noqa: E741 - the paper's name
    """A_i = A1_i | A2_i, one (i, j) at a time, as Sec. 4.2 defines them."""
    allowed = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            if pattern == "strided":
                a1, a2 = abs(i - j) <= l, (i - j) % l == 0
            else:
                a1, a2 = i // l == j // l, j % l >= l - c
            allowed[i, j] = (a1 or a2) and (j <= i or not causal)
    return allowed


def outputs_and_grads(out, real, inputs):
    """The output at real tokens and the gradients of its squared sum."""
    return [out[real], *torch.autograd.grad((out[real] ** 2).sum(), inputs)]


def qkv(n=37, b=2, h=2, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g, dtype=torch.float64) for _ in range(3)]


CASES = [(p, l, causal) for p in ("strided", "fixed") for l in (5, 8) for causal in (False, True)]


@pytest.mark.parametrize("pattern, stride, causal", CASES,
                         ids=[f"{p}-l{l}-{'causal' if c else 'full'}" for p, l, c in CASES])
def test_support_of_attention_matrix_is_the_papers_pattern(pattern, stride, causal):
    layer = zoo.create("sparse-transformer", dim=32, heads=2, pattern=pattern, stride=stride,
                       summary=2, causal=causal).double()
    a = probe.attention_matrix(layer, n=37)  # 37 is not a multiple of 5 or 8
    expected = paper_pattern(37, pattern, stride, 2, causal)
    for head in a:
        assert torch.equal(head != 0, expected)


@pytest.mark.parametrize("pattern, stride, causal", CASES,
                         ids=[f"{p}-l{l}-{'causal' if c else 'full'}" for p, l, c in CASES])
def test_output_and_gradients_equal_the_reference(pattern, stride, causal):
    q, k, v = (t.requires_grad_() for t in qkv())
    mask = torch.ones(2, 37, dtype=torch.bool)
    mask[1, 30:] = False
    mask[1, 3] = False
    out = sparse_transformer_attention(q, k, v, mask, pattern=pattern, stride=stride, summary=2,
                                       causal=causal)
    ref = sparse_transformer_attention_reference(q, k, v, mask, pattern=pattern, stride=stride,
                                                 summary=2, causal=causal)
    real = mask[:, None, :, None].expand_as(out)
    for got, want in zip(outputs_and_grads(out, real, (q, k, v)),
                         outputs_and_grads(ref, real, (q, k, v)), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("pattern", ["strided", "fixed"])
def test_two_hops_reach_every_earlier_position(pattern):
    """The point of the factorisation (Sec. 4.1): A1 then A2 connects every j <= i."""
    n, l = 40, 6  # noqa: E741
    p = paper_pattern(n, pattern, l, 1, causal=True).double()
    layer = zoo.create("sparse-transformer", dim=32, heads=2, pattern=pattern, stride=l,
                       summary=1, causal=True).double()
    support = (probe.attention_matrix(layer, n=n)[0] != 0).double()
    assert torch.equal(support, p)
    assert torch.equal((support @ support) > 0, torch.ones(n, n, dtype=torch.bool).tril())


def test_default_stride_is_ceil_sqrt_n():
    q, k, v = qkv(n=50)
    for causal in (False, True):
        torch.testing.assert_close(
            sparse_transformer_attention(q, k, v, causal=causal),
            sparse_transformer_attention(q, k, v, stride=8, causal=causal), rtol=0, atol=0)


def test_fixed_pattern_covering_the_sequence_is_softmax_attention():
    q, k, v = qkv()
    for causal in (False, True):
        out = sparse_transformer_attention(q, k, v, pattern="fixed", stride=37, causal=causal)
        ref = softmax_attention(q, k, v, causal=causal)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_fixed_pattern_largest_tensor_grows_as_n_sqrt_n():
    e = zoo.entry("sparse-transformer")
    make = factory(e, dim=32)
    s = probe.scaling(e, ns=(1024, 4096), make=lambda **kw: make(pattern="fixed", **kw))
    assert abs(s.memory - 1.5) <= 0.25 and abs(s.time - 1.5) <= 0.25, s
    assert max(s.largest) < 4096 ** 2 / 8
