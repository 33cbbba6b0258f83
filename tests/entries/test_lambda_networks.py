"""LambdaNetworks: the content and position lambdas equal the paper's formulas computed by hand,
in the global and the masked (causal) context, and the layer shares keys and values across heads."""

import pytest
import torch

import zoo
from zoo.entries.lambda_networks import lambda_attention, lambda_attention_reference

FORMS = pytest.mark.parametrize("form", [lambda_attention, lambda_attention_reference],
                                ids=["fast", "reference"])


def inputs(b=2, h=3, n=23, d=4, e=5, r=5, seed=0):
    """Multi-query inputs: h queries per position, one key and one value shared by the heads."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, 1, n, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, 1, n, e, generator=g, dtype=torch.float64)
    emb = torch.randn(r, d, generator=g, dtype=torch.float64)
    return q, k, v, emb


def by_hand(q, k, v, emb, *, causal):
    """y_n = (lambda^c_n + lambda^p_n)^T q_n, position by position, with lambda^c_n = Kbar^T V
    (Kbar: softmax over the context positions of each key channel) and lambda^p_n = E_n^T V,
    where row m of E_n is the embedding of the offset m - n inside the scope and zero outside.
    The context of n is every position, or m <= n when causal."""
    b, h, n, d = q.shape
    r = 0 if emb is None else emb.shape[0]
    left, right = (r - 1, 0) if causal else ((r - 1) // 2, (r - 1) // 2)
    out = torch.zeros(b, h, n, v.shape[-1], dtype=q.dtype)
    for i in range(b):
        keys, values = k[i, 0], v[i, 0]
        for t in range(n):
            ctx = range(t + 1) if causal else range(n)
            weights = torch.exp(keys[list(ctx)])  # (m, d)
            kbar = weights / weights.sum(0)
            lam = kbar.T @ values[list(ctx)]  # lambda^c_t: (d, e)
            e_t = torch.zeros(n, d, dtype=q.dtype)
            for m in ctx:
                if -left <= m - t <= right:
                    e_t[m] = emb[m - t + left]
            lam = lam + e_t.T @ values  # + lambda^p_t
            for head in range(h):
                out[i, head, t] = lam.T @ q[i, head, t]
    return out


@FORMS
@pytest.mark.parametrize("causal", [False, True], ids=["global-context", "masked-context"])
def test_content_lambda_equals_formula_by_hand(causal, form):
    q, k, v, _ = inputs()
    torch.testing.assert_close(form(q, k, v, None, causal=causal),
                               by_hand(q, k, v, None, causal=causal), rtol=1e-12, atol=1e-12)


@FORMS
@pytest.mark.parametrize("causal", [False, True], ids=["global-context", "masked-context"])
def test_content_and_position_lambdas_equal_formula_by_hand(causal, form):
    q, k, v, emb = inputs()
    torch.testing.assert_close(form(q, k, v, emb, causal=causal),
                               by_hand(q, k, v, emb, causal=causal), rtol=1e-12, atol=1e-12)


def test_gradients_match_formula_by_hand():
    q, k, v, emb = (t.requires_grad_() for t in inputs(b=1, h=2, n=7))
    for causal in (False, True):
        grads = torch.autograd.grad(lambda_attention(q, k, v, emb, causal=causal).square().sum(),
                                    (q, k, v, emb))
        ref = torch.autograd.grad(by_hand(q, k, v, emb, causal=causal).square().sum(),
                                  (q, k, v, emb))
        for a, b in zip(grads, ref, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_padding_is_no_part_of_the_context():
    q, k, v, emb = inputs(b=1)
    mask = torch.ones(1, 23, dtype=torch.bool)
    mask[0, 17:] = False
    for causal in (False, True):
        out = lambda_attention(q, k, v, emb, mask, causal=causal)[:, :, :17]
        ref = by_hand(q[:, :, :17], k[:, :, :17], v[:, :, :17], emb, causal=causal)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_multi_query_equals_keys_and_values_repeated_per_head():
    q, k, v, emb = inputs()
    torch.testing.assert_close(lambda_attention(q, k, v, emb),
                               lambda_attention(q, k.expand(-1, 3, -1, -1), v.expand(-1, 3, -1, -1),
                                                emb), rtol=1e-12, atol=1e-12)


def test_layer_uses_one_key_and_value_for_all_heads():
    layer = zoo.create("lambda-networks", dim=12, heads=3, dim_key=4, scope=3).double()
    x = torch.randn(2, 9, 12, dtype=torch.float64)
    w = layer.to_qkv.weight  # rows: 3 queries of 4, then the key (4), then the value (12 // 3)
    q = (x @ w[:12].T).reshape(2, 9, 3, 4).transpose(1, 2)
    k, v = (x @ w[12:16].T)[:, None], (x @ w[16:].T)[:, None]
    y = by_hand(q, k, v, layer.emb.detach(), causal=False)
    expected = layer.to_out(y.transpose(1, 2).reshape(2, 9, 12))
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-12)


def test_scope_must_be_odd_unless_causal():
    with pytest.raises(ValueError, match="scope must be odd unless causal=True"):
        zoo.create("lambda-networks", dim=32, scope=4)
    assert zoo.create("lambda-networks", dim=32, scope=4, causal=True).emb.shape == (4, 16)
    assert zoo.create("lambda-networks", dim=32, scope=0).emb is None
