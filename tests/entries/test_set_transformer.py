"""Set Transformer (ISAB): permutation equivariance, the block written out from the paper's
equations, and a padded set acting as the set of its real elements."""

import torch
import torch.nn.functional as F

import zoo
from zoo import probe


def make(**overrides):
    torch.manual_seed(0)
    return zoo.create("set-transformer", dim=16, **{"heads": 2, "inducing": 3, **overrides}
                      ).double().eval()


def elements(b=2, n=11, seed=1):
    return torch.randn(b, n, 16, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def mab_oracle(block, x, y, heads, mask=None):
    """MAB(X, Y) = LN(H + relu(rFF(H))), H = LN(X + Multihead(X, Y, Y)), one head at a time."""
    inner = block.to_q.weight.shape[0]
    dh = inner // heads
    wq, (wk, wv) = block.to_q.weight, block.to_kv.weight.chunk(2)
    outs = []
    for h in range(heads):
        rows = slice(h * dh, (h + 1) * dh)
        q, k, v = x @ wq[rows].T, y @ wk[rows].T, y @ wv[rows].T
        scores = q @ k.transpose(-1, -2) / dh ** 0.5
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
        outs.append(torch.softmax(scores, -1) @ v)
    attn = torch.cat(outs, -1) @ block.to_out.weight.T + block.to_out.bias
    dim = x.shape[-1]
    hidden = F.layer_norm(x + attn, (dim,), block.norm_attn.weight, block.norm_attn.bias)
    rff = F.relu(hidden @ block.rff.weight.T + block.rff.bias)
    return F.layer_norm(hidden + rff, (dim,), block.norm_rff.weight, block.norm_rff.bias)


def isab_oracle(layer, x, mask=None):
    points = layer.inducing_points.expand(x.shape[0], -1, -1)
    summary = mab_oracle(layer.summarise, points, x, layer.heads, mask)  # H = MAB(I, X)
    return mab_oracle(layer.broadcast, x, summary, layer.heads)  # ISAB = MAB(X, H)


def test_isab_equals_the_papers_equations():
    layer, x = make(), elements()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), isab_oracle(layer, x), rtol=1e-10, atol=1e-12)


def test_isab_with_padding_equals_the_papers_equations():
    layer, x = make(), elements()
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[0, 7:] = False
    mask[1, ::2] = False
    with torch.no_grad():
        torch.testing.assert_close(layer(x, mask=mask), isab_oracle(layer, x, mask),
                                   rtol=1e-10, atol=1e-12)


def test_gradients_match_the_papers_equations():
    layer = make()
    x = elements(n=6).requires_grad_()
    params = list(layer.parameters())
    grads = torch.autograd.grad(layer(x).square().sum(), [x, *params])
    ref = torch.autograd.grad(isab_oracle(layer, x).square().sum(), [x, *params])
    for a, b in zip(grads, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_permuting_the_elements_permutes_the_output():
    layer, x = make(), elements(n=13)
    perm = torch.randperm(13, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(layer(x[:, perm]), layer(x)[:, perm], rtol=1e-10, atol=1e-12)


def test_permuting_a_padded_set_permutes_the_output():
    layer, x = make(), elements(n=13)
    mask = torch.rand(2, 13, generator=torch.Generator().manual_seed(2)) > 0.3
    perm = torch.randperm(13, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        out, out_perm = layer(x, mask=mask), layer(x[:, perm], mask=mask[:, perm])
    keep = mask[:, perm]
    torch.testing.assert_close(out_perm[keep], out[:, perm][keep], rtol=1e-10, atol=1e-12)


def test_a_padded_set_is_the_set_of_its_real_elements():
    layer, x = make(), elements(b=1, n=12)
    mask = torch.tensor([[1, 0, 1, 1, 0, 0, 1, 1, 1, 0, 1, 1]], dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(layer(x, mask=mask)[mask], layer(x[:, mask[0]])[0],
                                   rtol=1e-10, atol=1e-12)


def test_every_output_reads_every_element():
    """Through the inducing points each element's output depends on every element."""
    inf = probe.influence(make(), elements(b=1, n=9))
    assert (inf > 1e-8 * inf.max()).all()
