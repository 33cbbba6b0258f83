"""SAC: in eval mode every node reads exactly the nodes its pointers pick (deterministic, each edge
once, causally never a later node), and the output is softmax attention restricted to that graph;
training samples each pointer from its distribution; the pointers learn through the surrogate."""

import pytest
import torch

import zoo
from zoo.entries.sac import CHUNK, point
from zoo.probe import attention_matrix, qkv_for


def pointer_logits(layer, q, k):
    """(b, i, s, j) pointer scores, written out from the layer's weights."""
    merge = lambda t: t.transpose(1, 2).reshape(t.shape[0], t.shape[2], -1)  # noqa: E731
    f = layer.pointer_dim
    pointers = (merge(q) @ layer.to_pointers.weight.T).reshape(q.shape[0], q.shape[2], layer.k, f)
    targets = merge(k) @ layer.to_targets.weight.T
    return torch.einsum("bisf,bjf->bisj", pointers, targets) / f ** 0.5


def graph(logits, causal, mask=None):
    """(b, i, j) bool: j is an edge of i when some pointer of i has its highest score at j."""
    b, n, s, _ = logits.shape
    allowed = torch.ones(b, n, n, dtype=torch.bool)
    if causal:
        allowed = allowed & torch.ones(n, n, dtype=torch.bool).tril()
    if mask is not None:
        allowed = allowed & mask[:, None, :]
    picks = logits.masked_fill(~allowed[:, :, None, :], float("-inf")).argmax(-1)  # (b i s)
    edges = torch.zeros(b, n, n, dtype=torch.bool).scatter(-1, picks, True)
    return edges & allowed


def restricted_softmax(q, k, v, edges):
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return scores.masked_fill(~edges[:, None], float("-inf")).softmax(-1) @ v


def make(**kw):
    return zoo.create("sac", dim=32, heads=4, pointer_dim=6, **kw).double().eval()


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("n, k", [(37, 3), (37, 1), (CHUNK + 30, 5)])
def test_eval_reads_exactly_the_pointed_nodes(n, k, causal):
    layer = make(k=k, causal=causal)
    q, kk, v = qkv_for(layer, n, b=2, seed=1)
    edges = graph(pointer_logits(layer, q, kk), causal)
    assert (edges.sum(-1) >= 1).all() and (edges.sum(-1) <= k).all()
    if causal:
        assert not edges.triu(1).any()
    with torch.no_grad():
        out = layer.attend(q, kk, v)
        assert torch.equal(layer.attend(q, kk, v), out)  # the graph is drawn deterministically
    torch.testing.assert_close(out, restricted_softmax(q, kk, v, edges), rtol=1e-12, atol=1e-12)
    amap = attention_matrix(layer, q=q[:1], k=kk[:1])
    assert torch.equal(amap > 0, edges[0].expand(4, n, n))  # all heads share the graph


def test_padded_nodes_are_not_pointed_to():
    layer = make(k=3, causal=True)
    q, kk, v = qkv_for(layer, 37, b=2, seed=2)
    mask = torch.ones(2, 37, dtype=torch.bool)
    mask[0, 30:] = False
    mask[1, 1::3] = False
    edges = graph(pointer_logits(layer, q, kk), True, mask)
    with torch.no_grad():
        out = layer.attend(q, kk, v, mask)
    real = mask[:, None, :].expand(-1, 4, -1)
    expected = restricted_softmax(q, kk, v, edges)
    torch.testing.assert_close(out[real], expected[real], rtol=1e-12, atol=1e-12)


def test_two_pointers_on_the_same_node_make_one_edge():
    layer = make(k=2)
    with torch.no_grad():  # pointer 1 a copy of pointer 0: both always pick the same node
        w = layer.to_pointers.weight.view(2, 6, -1)
        w[1] = w[0]
    q, kk, v = qkv_for(layer, 23, seed=3)
    edges = graph(pointer_logits(layer, q, kk), False)
    assert (edges.sum(-1) == 1).all()
    with torch.no_grad():
        out = layer.attend(q, kk, v)
    torch.testing.assert_close(out, restricted_softmax(q, kk, v, edges), rtol=1e-12, atol=1e-12)


def test_training_samples_each_pointer_from_its_softmax():
    logits = torch.tensor([0.3, -1.0, 1.2, 0.0], dtype=torch.float64).expand(1, 20_000, 1, 4)
    torch.manual_seed(0)
    drawn, idx = point(logits, sample=True)
    freq = torch.bincount(idx.flatten(), minlength=4).double() / idx.numel()
    prob = logits[0, 0, 0].softmax(-1)
    assert ((freq - prob).abs() <= 4 * (prob * (1 - prob) / idx.numel()).sqrt()).all(), (freq, prob)
    torch.testing.assert_close(drawn, logits[0, 0, 0][idx])


def test_training_graph_changes_from_call_to_call():
    layer = make(k=2).train()
    q, kk, _ = qkv_for(layer, 37, seed=4)
    torch.manual_seed(1)
    first, second = (attention_matrix(layer, q=q, k=kk) > 0 for _ in range(2))
    assert torch.equal(first[0], first[1])  # one graph for all heads
    assert not torch.equal(first, second)


def test_pointer_gradient_is_the_score_function_surrogate():
    layer = make(k=3)
    q, kk, v = qkv_for(layer, 31, seed=5)
    upstream = torch.randn(1, 4, 31, 8, dtype=torch.float64)
    loss = (layer.attend(q, kk, v) * upstream).sum()
    got = torch.autograd.grad(loss, [layer.to_pointers.weight, layer.to_targets.weight])

    logits = pointer_logits(layer, q, kk)  # (b i s j)
    edges = graph(logits.detach(), False)
    attn = ((q @ kk.transpose(-1, -2)) * 8 ** -0.5).masked_fill(~edges[:, None], float("-inf"))
    attn = attn.softmax(-1)
    credit = (attn * (upstream @ v.transpose(-1, -2))).sum(1)  # (b i j), over heads
    # each edge's credit goes to the log-probability log pi_{i,s}(j) (REINFORCE) of the first
    # pointer that picked it
    picks = logits.detach().argmax(-1)  # (b i s)
    first = torch.ones_like(picks, dtype=torch.bool)
    for s in range(1, picks.shape[-1]):
        first[..., s] = ~(picks[..., :s] == picks[..., s:s + 1]).any(-1)
    chosen = logits.log_softmax(-1).gather(-1, picks[..., None])[..., 0]  # (b i s)
    surrogate = (credit.gather(-1, picks) * chosen * first).sum()
    want = torch.autograd.grad(surrogate, [layer.to_pointers.weight, layer.to_targets.weight])
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
