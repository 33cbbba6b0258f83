"""An Attention Free Transformer: every variant equals the paper's equation computed position by
position, and the causal variants equal one-token-at-a-time decoding."""

import pytest
import torch

import zoo

N, WINDOW = 23, 4


def make(variant, causal=False, heads=2, max_len=32, seed=0):
    """A layer with random position biases (they start at zero)."""
    layer = zoo.create("attention-free-transformer", dim=12, heads=heads, variant=variant,
                       window=WINDOW, max_len=max_len, causal=causal).double()
    if layer.w is not None:
        g = torch.Generator().manual_seed(seed)
        layer.w.data = torch.randn(layer.w.shape, generator=g, dtype=torch.float64)
    return layer


def dense_biases(layer, n):
    """w[h, t, t'] as the paper writes it: AFT-full's learned matrix; AFT-local's learned values
    where |t - t'| < s and zero elsewhere; AFT-simple all zero."""
    w = torch.zeros(layer.heads, n, n, dtype=torch.float64)
    if layer.variant == "full":
        w = layer.w.detach()[:, :n, :n].clone()
    elif layer.variant == "local":
        left = WINDOW - 1
        for t in range(n):
            for s in range(max(t - left, 0), min(t + WINDOW, n)):
                if not layer.causal or s <= t:
                    w[:, t, s] = layer.w.detach()[:, t, s - t + left]
    return w


def qkv(layer, n=N, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, layer.heads, n, layer.dim_head, generator=g, dtype=torch.float64)
            for _ in range(3)]


def per_position(q, k, v, w, causal, mask=None):
    """Y_t = sigmoid(Q_t) * sum_t' exp(K_t' + w_tt') V_t' / sum_t' exp(K_t' + w_tt'), one t at
    a time, over t' <= t when causal and over real tokens only."""
    b, h, n, d = q.shape
    out = torch.zeros_like(q)
    for i in range(b):
        for head in range(h):
            for t in range(n):
                ts = [s for s in range(t + 1 if causal else n) if mask is None or mask[i, s]]
                if not ts:
                    continue
                weight = torch.exp(k[i, head, ts] + w[head, t, ts, None])  # (t', d)
                avg = (weight * v[i, head, ts]).sum(0) / weight.sum(0)
                out[i, head, t] = torch.sigmoid(q[i, head, t]) * avg
    return out


def decode(q, k, v, w, variant):
    """Causal AFT one token at a time. AFT-simple keeps two running sums; AFT-local keeps them
    plus the last s tokens (the only ones whose weight differs from exp(K)); AFT-full keeps every
    past token, since each pair has its own bias."""
    b, h, n, d = q.shape
    num, den, past, outs = 0.0, 0.0, [], []
    for t in range(n):
        ek = torch.exp(k[:, :, t])
        num, den = num + ek * v[:, :, t], den + ek
        past.append((t, ek, v[:, :, t]))
        if variant == "local":
            past = past[-WINDOW:]
        if variant == "simple":
            n_t, d_t = num, den
        elif variant == "local":
            n_t, d_t = num, den
            for s, e, val in past:
                extra = torch.expm1(w[:, t, s])[None, :, None] * e
                n_t, d_t = n_t + extra * val, d_t + extra
        else:
            scale = [torch.exp(w[:, t, s])[None, :, None] * e for s, e, _ in past]
            n_t = sum(c * val for c, (_, _, val) in zip(scale, past, strict=True))
            d_t = sum(scale)
        outs.append(torch.sigmoid(q[:, :, t]) * n_t / d_t)
    return torch.stack(outs, dim=2)


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("variant", ["full", "local", "simple"])
def test_equals_paper_equation_position_by_position(variant, causal):
    layer = make(variant, causal)
    q, k, v = qkv(layer)
    torch.testing.assert_close(layer.attend(q, k, v),
                               per_position(q, k, v, dense_biases(layer, N), causal),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("variant", ["full", "local", "simple"])
def test_causal_parallel_form_equals_decoding_one_token_at_a_time(variant):
    layer = make(variant, causal=True)
    q, k, v = qkv(layer)
    torch.testing.assert_close(layer.attend(q, k, v), decode(q, k, v, dense_biases(layer, N), variant),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("variant", ["full", "local", "simple"])
def test_padded_tokens_are_left_out_of_every_sum(variant):
    layer = make(variant)
    q, k, v = qkv(layer)
    mask = torch.ones(2, N, dtype=torch.bool)
    mask[0, 15:] = False
    mask[1, ::4] = False
    out = layer.attend(q, k, v, mask)
    ref = per_position(q, k, v, dense_biases(layer, N), False, mask)
    keep = mask[:, None, :, None].expand_as(out)
    torch.testing.assert_close(out[keep], ref[keep], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("variant", ["full", "local"])
def test_gradients_match_paper_equation(variant):
    layer = make(variant, causal=True)
    q, k, v = (t.requires_grad_() for t in qkv(layer, n=9))
    out = layer.attend(q, k, v)
    ref = per_position(q, k, v, dense_biases(layer, 9), True)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    expected = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for a, b in zip(grads, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_simple_is_local_with_zero_biases_and_full_with_zero_biases():
    local, full, simple = make("local", seed=3), make("full", seed=3), make("simple")
    local.w.data.zero_()
    full.w.data.zero_()
    q, k, v = qkv(simple)
    expected = simple.attend(q, k, v)
    for layer in (local, full):
        torch.testing.assert_close(layer.attend(q, k, v), expected, rtol=1e-12, atol=1e-12)


def test_longer_than_max_len_is_refused_and_simple_needs_no_max_len():
    x = torch.randn(1, 40, 12)
    for variant in ("full", "local"):
        with pytest.raises(ValueError, match="sequence length 40 exceeds max_len=32"):
            make(variant)(x.double())
    assert make("simple")(x.double()).shape == x.shape


def test_local_biases_are_stored_as_their_band():
    assert make("local").w.shape == (2, 32, 2 * WINDOW - 1)
    assert make("local", causal=True).w.shape == (2, 32, WINDOW)
    assert make("full").w.shape == (2, 32, 32)
