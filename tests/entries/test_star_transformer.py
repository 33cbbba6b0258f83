"""Star-Transformer: within one update a satellite reads only its ring neighbours, itself, its
embedding and the relay; the relay reads every real satellite; both against contexts listed by
hand, read by the reference's `multi_att`."""

import pytest
import torch
from torch.autograd.functional import jacobian

import zoo
from zoo.entries.star_transformer import (
    StarAttention,
    multi_att,
    relay_update,
    ring_neighbours,
    satellite_update,
)

DIM, HEADS = 12, 3


def tensors(*shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g, dtype=torch.float64) for s in shapes]


def attention(seed=0):
    torch.manual_seed(seed)
    return StarAttention(DIM, HEADS, DIM // HEADS).double()


def brute_multi_att(att, query, items):
    """MultiAtt of one query vector `(dim,)` over a list of item vectors, then LN(ReLU(.)): the
    entry's own `multi_att` (the reference's building block), on a context listed by hand."""
    return multi_att(query[None, None], torch.stack(items)[None, None], None, att)[0, 0]


def real_ring(mask_row):
    """prev and next of each real position, walking round the real positions by hand."""
    real = [i for i, m in enumerate(mask_row.tolist()) if m]
    prev, nxt = {}, {}
    for r, i in enumerate(real):
        prev[i], nxt[i] = real[r - 1], real[(r + 1) % len(real)]
    return prev, nxt


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ring_neighbours_walk_round_the_real_tokens(seed):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(3, 15, generator=g) > 0.35
    mask[2] = True
    prev, nxt = ring_neighbours(mask)
    for b in range(3):
        want_prev, want_next = real_ring(mask[b])
        for i in range(15):
            assert prev[b, i].item() == want_prev.get(i, i)
            assert nxt[b, i].item() == want_next.get(i, i)


def test_satellite_update_equals_brute_force():
    att = attention()
    h, e, s = tensors((2, 9, DIM), (2, 9, DIM), (2, 1, DIM))
    prev, nxt = ring_neighbours(torch.ones(2, 9, dtype=torch.bool))
    with torch.no_grad():
        out = satellite_update(h, e, s, prev, nxt, att)
        for b in range(2):
            for i in range(9):
                items = [h[b, (i - 1) % 9], h[b, i], h[b, (i + 1) % 9], e[b, i], s[b, 0]]
                torch.testing.assert_close(out[b, i], brute_multi_att(att, h[b, i], items),
                                           rtol=1e-10, atol=1e-12)


def test_one_update_reads_only_ring_neighbours_itself_its_embedding_and_the_relay():
    """d h_i^t / d h_j^{t-1} is nonzero exactly for j in {i-1, i, i+1} (round the ring),
    d h_i^t / d e_j exactly for j = i, and every h_i^t depends on the relay."""
    att, n = attention(), 8
    h, e, s = tensors((1, n, DIM), (1, n, DIM), (1, 1, DIM))
    prev, nxt = ring_neighbours(torch.ones(1, n, dtype=torch.bool))
    jh, je, js = jacobian(lambda h_, e_, s_: satellite_update(h_, e_, s_, prev, nxt, att), (h, e, s))
    dep_h = jh[0, :, :, 0].permute(0, 2, 1, 3).flatten(2).norm(dim=-1) > 1e-12  # (i, j)
    dep_e = je[0, :, :, 0].permute(0, 2, 1, 3).flatten(2).norm(dim=-1) > 1e-12
    dep_s = js[0, :, :, 0, 0].norm(dim=(1, 2)) > 1e-12
    ring = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in ((i - 1) % n, i, (i + 1) % n):
            ring[i, j] = True
    assert torch.equal(dep_h, ring)
    assert torch.equal(dep_e, torch.eye(n, dtype=torch.bool))
    assert dep_s.all()


def test_relay_reads_itself_and_every_real_satellite():
    att = attention(1)
    s, h = tensors((2, 1, DIM), (2, 7, DIM), seed=3)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 0, 1, 1, 0, 1, 0]], dtype=torch.bool)
    with torch.no_grad():
        out = relay_update(s, h, mask, att)
        for b in range(2):
            items = [s[b, 0]] + [h[b, j] for j in range(7) if mask[b, j]]
            torch.testing.assert_close(out[b, 0], brute_multi_att(att, s[b, 0], items),
                                       rtol=1e-10, atol=1e-12)
    jac = jacobian(lambda h_: relay_update(s[:1], h_, None, att), h[:1])
    assert (jac[0, 0].norm(dim=0).norm(dim=-1)[0] > 1e-12).all()


def test_layer_is_the_alternating_updates():
    torch.manual_seed(0)
    layer = zoo.create("star-transformer", dim=DIM, heads=HEADS, steps=3).double()
    (x,) = tensors((2, 10, DIM), seed=4)
    with torch.no_grad():
        hs, s = [x[b] for b in range(2)], [x[b].mean(0) for b in range(2)]
        for t in range(3):
            att = layer.satellites[t]
            hs = [torch.stack([brute_multi_att(att, hb[i], [hb[(i - 1) % 10], hb[i], hb[(i + 1) % 10],
                                                             x[b, i], s[b]]) for i in range(10)])
                  for b, hb in enumerate(hs)]
            if t < 2:
                s = [brute_multi_att(layer.relays[t], s[b], [s[b], *hs[b]]) for b in range(2)]
        torch.testing.assert_close(layer(x), torch.stack(hs), rtol=1e-10, atol=1e-12)


def test_padded_sequence_gives_the_outputs_of_the_unpadded_one():
    torch.manual_seed(0)
    layer = zoo.create("star-transformer", dim=DIM, heads=HEADS).double()
    (x,) = tensors((1, 13, DIM), seed=5)
    mask = torch.tensor([[1, 1, 0, 1, 1, 1, 0, 0, 1, 1, 1, 0, 1]], dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(layer(x, mask=mask)[mask], layer(x[:, mask[0]])[0],
                                   rtol=1e-10, atol=1e-12)


def test_last_relay_update_is_not_built():
    layer = zoo.create("star-transformer", dim=DIM, heads=HEADS, steps=3)
    assert len(layer.satellites) == 3 and len(layer.relays) == 2
