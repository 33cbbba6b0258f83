"""SLiM: the sliced causal form equals the plain prefix-sum form in outputs and gradients, with
smaller intermediates in the forward pass and less kept for the backward pass."""

import pytest
import torch

import zoo
from zoo import probe
from zoo.core.features import favor_plus_features, gaussian_projection
from zoo.core.linear import kernel_attention_recurrent, prefix_sum
from zoo.entries.slim_performer import SlimPerformer, SlimPrefixSum, slim_attention, slim_attention_reference
from zoo.verify.contract import factory


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def projections(m, d, heads):
    return torch.stack([gaussian_projection(m, d, generator=torch.Generator().manual_seed(h))
                        for h in range(heads)])


class PlainPrefixPerformer(SlimPerformer):
    def attend(self, q, k, v, mask=None):
        return slim_attention_reference(q, k, v, self.projection, mask, causal=self.causal)


@pytest.mark.parametrize("chunk", [1, 6, 64])
def test_sliced_form_equals_plain_prefix_sums_outputs_and_gradients(chunk):
    inputs = [randn(2, 3, 37, s, seed=i).requires_grad_() for i, s in enumerate((8, 8, 5))]
    w = projections(16, 8, heads=3)
    mask = torch.ones(2, 37, dtype=torch.bool)
    mask[1, 30:] = False
    out = slim_attention(*inputs, w, mask, causal=True, chunk=chunk)
    ref = slim_attention_reference(*inputs, w, mask, causal=True)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    grads = torch.autograd.grad(out.square().sum(), inputs)
    for a, b in zip(grads, torch.autograd.grad(ref.square().sum(), inputs), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_custom_backward_passes_gradcheck():
    phi_q, phi_k, v = (randn(1, 2, 11, s, seed=i).requires_grad_() for i, s in enumerate((4, 4, 3)))
    assert torch.autograd.gradcheck(lambda a, b, c: SlimPrefixSum.apply(a, b, c, 3), (phi_q, phi_k, v))


def test_causal_slim_equals_one_token_at_a_time():
    q, k, v = (randn(2, 2, 23, s, seed=i) for i, s in enumerate((8, 8, 5)))
    w = projections(12, 8, heads=2)
    recurrent = kernel_attention_recurrent(*favor_plus_features(q, k, w), v)
    torch.testing.assert_close(slim_attention(q, k, v, w, causal=True, chunk=5), recurrent,
                               rtol=1e-10, atol=1e-12)


def test_largest_intermediate_below_the_plain_prefix_form():
    e = zoo.entry("slim-performer")
    slim = probe.scaling(e, make=lambda **kw: factory(e)(causal=True, **kw))
    plain = probe.scaling(e, make=lambda **kw: factory(e, cls=PlainPrefixPerformer)(causal=True, **kw))
    assert all(s * 4 < p for s, p in zip(slim.largest, plain.largest, strict=True)), (slim, plain)
    assert abs(slim.memory - 1) < 0.1 and abs(slim.time - 1) < 0.1, slim


def saved_bytes(fn, *args):
    """Bytes autograd keeps for the backward pass of `fn(*args)`."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return total


def test_prefix_sums_keep_only_their_inputs_for_the_backward_pass():
    phi_q, phi_k, v = (randn(1, 2, 512, s, seed=i).requires_grad_() for i, s in enumerate((32, 32, 17)))
    inputs = sum(t.numel() * t.element_size() for t in (phi_q, phi_k, v))
    assert saved_bytes(SlimPrefixSum.apply, phi_q, phi_k, v, 8) == inputs
    prefix_sums = phi_k.numel() * v.shape[-1] * v.element_size()  # the (b, h, n, m, e) tensor
    assert saved_bytes(prefix_sum, phi_q, phi_k, v) >= prefix_sums > 5 * inputs


def test_layer_keeps_less_for_the_backward_pass_than_performer_and_plain_form():
    x = randn(1, 512, 32)
    kept = [saved_bytes(factory(zoo.entry("slim-performer"), cls=cls)(causal=True).double(), x)
            for cls in (SlimPerformer, zoo.load("performer"), PlainPrefixPerformer)]
    assert kept[0] < kept[1] < kept[2], kept
