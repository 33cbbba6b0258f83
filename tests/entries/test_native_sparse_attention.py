"""Native sparse attention: the three gated branches equal a query-by-query loop over the paper's
key sets (compressed blocks that have ended, the top-n selection blocks ranked by the paper's
overlap sum of compressed weights with the first and two most recent forced in, the last w
tokens), in outputs and gradients; the overlap sum is the paper's double sum; decoding with cached
compressed blocks equals the causal forward."""

import math

import pytest
import torch

import zoo
from tests.oracles import assert_same_outputs_and_grads
from tests.stepping import assert_layer_steps_equal_forward, padding
from zoo import probe
from zoo.entries.native_sparse_attention import selection_scores

HP = dict(block=4, stride=2, select_block=4, topk=3, window=3)


def layer_and_input(causal=True, n=19, heads=2, **hp):
    layer = zoo.create("native-sparse-attention", dim=32, heads=heads, causal=causal,
                       **{**HP, **hp}).double()
    return layer, torch.randn(2, n, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))


def softmax_over(q, keys, values):
    """The output and the weights of one query over a list of keys (0 and no weights for none)."""
    if not keys:
        return torch.zeros_like(q), []
    k, v = torch.stack(keys), torch.stack(values)
    weights = torch.softmax(k @ q / math.sqrt(q.shape[-1]), 0)
    return weights @ v, weights


def loop_oracle(layer, x, mask):
    """Causal NSA, one batch element, head and query at a time."""
    l, d, ls, top, w = layer.block, layer.stride, layer.select_block, layer.topk, layer.window
    h, e, n = layer.heads, layer.dim_head, x.shape[1]
    x = x.masked_fill(~mask.unsqueeze(-1), 0.0)
    q, k_c, v_c, k_s, v_s, k_w, v_w = (t.unflatten(-1, (h, e)) for t in layer.to_qkv(x).chunk(7, -1))
    gates = layer.to_gates(x).sigmoid().unflatten(-1, (h, 3))
    out = torch.zeros(x.shape[0], n, h, e, dtype=x.dtype)
    for b in range(x.shape[0]):
        for hh in range(h):
            for t in range(n):
                qt = q[b, t, hh]
                # compressed blocks whose last token is at or before t, not all padding
                starts = [i * d for i in range(n) if i * d + l - 1 <= t and mask[b, i * d:i * d + l].any()]
                ck = [layer.phi_k(k_c[b, s:s + l, hh].flatten()) for s in starts]
                cv = [layer.phi_v(v_c[b, s:s + l, hh].flatten()) for s in starts]
                o_cmp, p_cmp = softmax_over(qt, ck, cv)
                # selection block j: the compressed blocks overlapping it, each counted as the double sum
                score = {}
                for j in range(t // ls + 1):
                    score[j] = sum(p_cmp[idx] * sum(1 for m in range(ls // d) for nn in range(l // d)
                                                    if (ls // d) * j + m - nn == starts[idx] // d)
                                   for idx in range(len(starts)))
                forced = {0, t // ls, t // ls - 1} & set(score)
                weight = {j: float(torch.as_tensor(p).detach()) for j, p in score.items()}
                ranked = sorted(score, key=lambda j: (j not in forced, -weight[j], j))[:top]
                toks = [s for s in range(t + 1) if s // ls in ranked and mask[b, s]]
                o_slc = softmax_over(qt, [k_s[b, s, hh] for s in toks], [v_s[b, s, hh] for s in toks])[0]
                near = [s for s in range(max(0, t - w + 1), t + 1) if mask[b, s]]
                o_win = softmax_over(qt, [k_w[b, s, hh] for s in near], [v_w[b, s, hh] for s in near])[0]
                g = gates[b, t, hh]
                out[b, t, hh] = g[0] * o_cmp + g[1] * o_slc + g[2] * o_win
    return layer.to_out(out.flatten(-2))


@pytest.mark.parametrize("hp", [HP, dict(block=4, stride=2, select_block=8, topk=3, window=5),
                                dict(block=2, stride=2, select_block=2, topk=4, window=2)],
                         ids=["l4-d2-ls4", "l4-d2-ls8", "l=d=ls"])
def test_branches_equal_a_query_by_query_loop_outputs_and_gradients(hp):
    layer, x = layer_and_input(n=17, **hp)
    mask = padding(17)
    out, ref = layer(x, mask=mask), loop_oracle(layer, x, mask)
    assert_same_outputs_and_grads(out[mask], ref[mask], list(layer.parameters()))


def test_selection_scores_are_the_papers_double_sum():
    p = torch.rand(1, 1, 1, 9, dtype=torch.float64)
    a, c = 3, 2  # l' / d and l / d
    got = selection_scores(p, 4, block=2 * c, stride=2, select_block=2 * a)
    want = [sum(float(p[..., a * j + m - nn]) for m in range(a) for nn in range(c)
                if 0 <= a * j + m - nn < 9) for j in range(4)]
    torch.testing.assert_close(got.flatten(), torch.tensor(want, dtype=torch.float64), rtol=1e-14, atol=0)
    same = selection_scores(p, 9, block=2, stride=2, select_block=2)  # l = d = l': p_slc = p_cmp
    torch.testing.assert_close(same, p, rtol=0, atol=0)


@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
def test_step_over_random_splits_equals_the_causal_forward(masked):
    layer, x = layer_and_input(n=23)
    mask = padding(23) if masked else None
    state = assert_layer_steps_equal_forward(layer, x, mask)
    assert state.cache["c_k"].shape[2] == (23 - 4) // 2 + 1  # every completed compressed block, once


def test_selected_tokens_are_at_most_topk_blocks():
    """At n = 64 the last query's selected branch reads topk = 5 blocks of l' = 4 tokens: the first
    block, its own and the previous one (forced), and two chosen by the compressed weights."""
    layer, x = layer_and_input(n=64, heads=1, topk=5)
    with torch.no_grad():
        # gates exactly 0, 1, 0 in float64: only the selected branch is left
        layer.to_gates.bias.copy_(torch.tensor([-1000.0, 1000.0, -1000.0]))
        layer.to_gates.weight.zero_()
    inf = probe.influence(layer, x)
    blocks = set(((inf[63] > 0).nonzero().flatten() // 4).tolist())
    assert (inf[63] > 0).sum() == 5 * 4 and len(blocks) == 5 and {0, 14, 15} < blocks


def test_stride_must_divide_the_blocks():
    with pytest.raises(ValueError, match="stride"):
        zoo.create("native-sparse-attention", dim=32, block=6, stride=4)
