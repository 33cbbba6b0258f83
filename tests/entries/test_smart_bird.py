"""Smart Bird: in eval mode each query reads the sketch's top-k keys (deterministic), and the output
is softmax attention restricted to exactly those edges; training draws follow the sketch's
probabilities, per head; the sketch learns through the straight-through surrogate."""

import pytest
import torch

import zoo
from zoo.entries.smart_bird import CHUNK, draw_keys
from zoo.probe import attention_matrix, qkv_for


def sketch_logits(layer, q, k):
    """The sketch head's scores, written out: merged heads -> d_s, scaled dot products."""
    merge = lambda t: t.transpose(1, 2).reshape(t.shape[0], t.shape[2], -1)  # noqa: E731
    qs, ks = merge(q) @ layer.sketch_q.weight.T, merge(k) @ layer.sketch_k.weight.T
    return qs @ ks.transpose(-1, -2) / layer.sketch_dim ** 0.5  # (b i j)


def selected(logits, per_query, mask=None):
    """`(b, i, j)` bool: the per_query highest sketch scores of each row (real keys first)."""
    if mask is not None:
        logits = logits.masked_fill(~mask[:, None, :], float("-inf"))
    order = logits.argsort(dim=-1, descending=True)[..., :per_query]
    return torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order, True)


def restricted_softmax(q, k, v, allowed):
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return scores.masked_fill(~allowed[:, None], float("-inf")).softmax(-1) @ v


def make(n_keys=5, **kw):
    return zoo.create("smart-bird", dim=32, heads=4, k=n_keys, sketch_dim=6, **kw).double().eval()


@pytest.mark.parametrize("n, n_keys", [(37, 5), (37, 1), (CHUNK + 45, 7)])
def test_eval_reads_exactly_the_sketch_top_k(n, n_keys):
    layer = make(n_keys)
    q, k, v = qkv_for(layer, n, b=2, seed=1)
    allowed = selected(sketch_logits(layer, q, k), n_keys)
    with torch.no_grad():
        out = layer.attend(q, k, v)
    torch.testing.assert_close(out, restricted_softmax(q, k, v, allowed), rtol=1e-12, atol=1e-12)
    amap = attention_matrix(layer, q=q[:1], k=k[:1])
    assert torch.equal(amap > 0, allowed[0].expand(4, n, n))  # every head, the same edges
    with torch.no_grad():
        assert torch.equal(layer.attend(q, k, v), out)  # drawn deterministically


def test_padded_keys_are_never_drawn_while_real_ones_remain():
    layer = make(6)
    q, k, v = qkv_for(layer, 37, b=2, seed=2)
    mask = torch.ones(2, 37, dtype=torch.bool)
    mask[0, 30:] = False
    mask[1, ::3] = False
    allowed = selected(sketch_logits(layer, q, k), 6, mask)
    assert not (allowed & ~mask[:, None, :]).any()
    with torch.no_grad():
        out = layer.attend(q, k, v, mask)
    torch.testing.assert_close(out, restricted_softmax(q, k, v, allowed), rtol=1e-12, atol=1e-12)


def test_layer_output_is_the_restricted_attention_through_the_shell():
    layer = make(4)
    x = torch.randn(2, 41, 32, dtype=torch.float64)
    q, k, v = layer.to_qkv(x).chunk(3, dim=-1)
    q, k, v = (t.reshape(2, 41, 4, 8).transpose(1, 2) for t in (q, k, v))
    inner = restricted_softmax(q, k, v, selected(sketch_logits(layer, q, k), 4))
    expected = layer.to_out(inner.transpose(1, 2).reshape(2, 41, 32))
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)


def test_training_draws_follow_the_sketch_probabilities():
    """Gumbel-top-1 picks key j with probability softmax(sketch row)_j; top-2 never repeats."""
    logits = torch.tensor([[[1.5, 0.0, -1.0, 0.5, 2.0]]], dtype=torch.float64)
    torch.manual_seed(0)
    draws = 40_000
    idx = draw_keys(logits, 1, draws, sample=True)  # (1, draws, 1, 1): one draw per "head"
    freq = torch.bincount(idx.flatten(), minlength=5).double() / draws
    prob = logits[0, 0].softmax(-1)
    assert ((freq - prob).abs() <= 4 * (prob * (1 - prob) / draws).sqrt()).all(), (freq, prob)
    pairs = draw_keys(logits, 2, 1000, sample=True)
    assert (pairs[..., 0] != pairs[..., 1]).all()


def test_training_draws_differ_between_heads_and_calls():
    layer = make(3).train()
    q, k, v = qkv_for(layer, 37, seed=3)
    torch.manual_seed(1)
    first = attention_matrix(layer, q=q, k=k) > 0
    second = attention_matrix(layer, q=q, k=k) > 0
    assert (first.sum(-1) == 3).all()
    assert not torch.equal(first[0], first[1])  # heads draw their own keys
    assert not torch.equal(first, second)  # fresh draws each call in training mode


def test_sketch_gradient_is_the_score_function_surrogate():
    """d(loss)/d(sketch) = sum over drawn edges of a_ij <g_i, v_j> d log S_ij (REINFORCE's
    gradient of the draw's log-probability, S = softmax of the sketch scores), while v gets exactly
    the restricted softmax's gradient."""
    layer = make(4)
    q, k, v = qkv_for(layer, 29, seed=4)
    v.requires_grad_()
    upstream = torch.randn(1, 4, 29, 8, dtype=torch.float64)
    loss = (layer.attend(q, k, v) * upstream).sum()
    got = torch.autograd.grad(loss, [layer.sketch_q.weight, layer.sketch_k.weight, v])

    logits = sketch_logits(layer, q, k)
    allowed = selected(logits.detach(), 4)
    scores = ((q @ k.transpose(-1, -2)) * 8 ** -0.5).masked_fill(~allowed[:, None], float("-inf"))
    attn = scores.softmax(-1)
    credit = (attn * (upstream @ v.transpose(-1, -2))).detach().sum(1)  # (b i j), over heads
    log_s = logits.log_softmax(-1)
    surrogate = (credit * log_s.masked_fill(~allowed, 0.0)).sum() + ((attn @ v) * upstream).sum()
    want = torch.autograd.grad(surrogate, [layer.sketch_q.weight, layer.sketch_k.weight, v])
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
