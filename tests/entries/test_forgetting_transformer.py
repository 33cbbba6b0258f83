"""Forgetting Transformer: the scores are lowered by the log of the product of the forget gates
between key and query (against an explicit product of gates, outputs and gradients); gates at 1
give softmax attention and gates near 0 read only the current token; decoding from a cache of keys,
values and cumulative log gates equals the causal forward."""

import pytest
import torch

import zoo
from tests.oracles import assert_same_outputs_and_grads
from tests.stepping import assert_layer_steps_equal_forward, padding


def layer_and_input(causal=True, n=17):
    layer = zoo.create("forgetting-transformer", dim=32, heads=2, causal=causal).double()
    return layer, torch.randn(2, n, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(5))


def product_of_gates_oracle(layer, x, mask, causal):
    """o_i = sum_j w_ij v_j / sum_j w_ij with w_ij = exp(q_i k_j / sqrt d) prod_{l between} f_l."""
    q, k, v = layer.to_qkv(x).chunk(3, dim=-1)
    f = torch.sigmoid(layer.to_forget(x)).masked_fill(~mask.unsqueeze(-1), 1.0)  # (b n h)
    b, n, h, d = x.shape[0], x.shape[1], layer.heads, layer.dim_head
    out = torch.zeros(b, n, h * d, dtype=x.dtype)
    for bi in range(b):
        for hi in range(h):
            cols = slice(hi * d, (hi + 1) * d)
            for i in range(n):
                w = []
                for j in range(n):
                    lo, hi_ = min(i, j), max(i, j)
                    decay = f[bi, lo + 1:hi_ + 1, hi].prod()
                    ok = mask[bi, j] and (j <= i or not causal)
                    w.append((q[bi, i, cols] @ k[bi, j, cols] / d ** 0.5).exp() * decay * ok)
                w = torch.stack(w)
                out[bi, i, cols] = (w / w.sum()) @ v[bi, :, cols]
    return layer.to_out(out)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_scores_are_lowered_by_the_product_of_the_gates_in_between(causal):
    layer, x = layer_and_input(causal, n=9)
    mask = padding(9)
    out, ref = layer(x, mask=mask), product_of_gates_oracle(layer, x, mask, causal)
    assert_same_outputs_and_grads(out[mask], ref[mask], list(layer.parameters()))


def test_open_gates_are_softmax_attention_and_closed_gates_read_only_the_current_token():
    layer, x = layer_and_input()
    exact = zoo.create("softmax-attention", dim=32, heads=2, causal=True).double()
    exact.load_state_dict({k: v for k, v in layer.state_dict().items() if "forget" not in k})
    with torch.no_grad():
        layer.to_forget.weight.zero_()
        layer.to_forget.bias.fill_(60.0)  # f = sigmoid(60): log f = -1e-26
    torch.testing.assert_close(layer(x), exact(x), rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        layer.to_forget.bias.fill_(-60.0)  # f = 1e-26: everything before i is forgotten
    _, _, v = layer.to_qkv(x).chunk(3, dim=-1)
    torch.testing.assert_close(layer(x), layer.to_out(v), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
def test_step_over_random_splits_equals_the_causal_forward(masked):
    layer, x = layer_and_input(n=23)
    mask = padding(23) if masked else None
    state = assert_layer_steps_equal_forward(layer, x, mask)
    assert state.cache["c"].shape == (2, 2, 23)  # one cumulative log gate per cached token and head


def test_forget_gate_must_be_a_bool():
    with pytest.raises(ValueError, match="forget_gate"):
        zoo.create("forgetting-transformer", dim=32, forget_gate=1)
