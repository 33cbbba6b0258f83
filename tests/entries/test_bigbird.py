"""BigBird: the blocked window + global + random pattern read off the layer is the paper's; the
random blocks are a fixed, seeded draw without replacement; the output is dense softmax on it."""

import pytest
import torch

import zoo
from tests.oracles import assert_equals_restricted_softmax, qkv
from zoo import probe
from zoo.core.softmax import softmax_attention
from zoo.entries.bigbird import bigbird_attention, draw_random_blocks


def paper_pattern(n, c, g, random_blocks):
    """(h, n, n): query block B sees key blocks B-1..B+1, 0..g-1 and R(B); global blocks see all."""
    h = random_blocks.shape[0]
    allowed = torch.zeros(h, n, n, dtype=torch.bool)
    for head in range(h):
        for i in range(n):
            for j in range(n):
                qb, kb = i // c, j // c
                allowed[head, i, j] = (qb < g or kb < g or abs(qb - kb) <= 1
                                       or kb in random_blocks[head, qb].tolist())
    return allowed


CASES = [(4, 1, 2), (5, 2, 1), (3, 1, 3), (8, 2, 2)]


@pytest.mark.parametrize("c, g, r", CASES, ids=[f"block{c}-g{g}-r{r}" for c, g, r in CASES])
def test_support_of_attention_matrix_is_window_global_random(c, g, r):
    layer = zoo.create("bigbird", dim=32, heads=2, block=c, global_blocks=g,
                       random_blocks=r).double()
    a = probe.attention_matrix(layer, n=37)
    assert torch.equal(a != 0, paper_pattern(37, c, g, layer.random(37)))


@pytest.mark.parametrize("c, g, r", CASES, ids=[f"block{c}-g{g}-r{r}" for c, g, r in CASES])
def test_random_blocks_are_distinct_and_neither_window_nor_global(c, g, r):
    layer = zoo.create("bigbird", dim=32, heads=2, block=c, global_blocks=g, random_blocks=r)
    for n in (1, 37, 100, 333):
        nb = -(-n // c)
        rand = layer.random(n)
        assert rand.shape == (2, nb, r)
        for head in range(2):
            for qb in range(nb):
                eligible = {kb for kb in range(g, nb) if abs(kb - qb) > 1}
                picked = [kb for kb in rand[head, qb].tolist() if kb >= 0]
                assert len(set(picked)) == len(picked) == min(r, len(eligible))
                assert set(picked) <= eligible


def test_random_draw_is_fixed_by_the_seed_and_the_same_on_every_call():
    make = lambda seed: zoo.create("bigbird", dim=32, heads=2, block=4, seed=seed)  # noqa: E731
    layer = make(0).double()
    first = probe.attention_matrix(layer, n=64)
    layer.train()
    assert torch.equal(probe.attention_matrix(layer, n=64), first)
    assert torch.equal(make(0).random(64), layer.random(64))
    assert not torch.equal(make(1).random(64), layer.random(64))
    assert "draw" in dict(layer.named_buffers()) and not any(
        "draw" in name for name, _ in layer.named_parameters())
    # casting the layer leaves the draw alone
    assert torch.equal(layer.to(torch.bfloat16).random(64), make(0).random(64))


def test_draw_covers_all_blocks_over_many_seeds():
    """Every eligible block is reachable: the draw is not stuck on a few blocks."""
    seen = set()
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        seen |= set(draw_random_blocks(torch.randint(2 ** 62, (1, 12, 2), generator=g), 12,
                                       1)[0, 6].tolist())
    assert seen == {1, 2, 3, 4, 8, 9, 10, 11}


def test_output_and_gradients_equal_dense_softmax_on_the_pattern():
    q, k, v = (t.requires_grad_() for t in qkv())
    layer = zoo.create("bigbird", dim=32, heads=2, block=4, global_blocks=1, random_blocks=2)
    rand = layer.random(37)
    mask = torch.ones(2, 37, dtype=torch.bool)
    mask[1, 26:] = False
    mask[1, 9] = False
    out = bigbird_attention(q, k, v, mask, block=4, global_blocks=1, random=rand)
    keep = paper_pattern(37, 4, 1, rand) & mask[:, None, None, :]
    assert_equals_restricted_softmax(out, q, k, v, keep, mask)


def test_one_block_covering_the_sequence_is_softmax_attention():
    q, k, v = qkv()
    torch.testing.assert_close(bigbird_attention(q, k, v, block=37, global_blocks=1),
                               softmax_attention(q, k, v), rtol=1e-12, atol=1e-12)


def test_longer_than_max_len_is_refused():
    layer = zoo.create("bigbird", dim=32, heads=2, block=4, max_len=32)
    with pytest.raises(ValueError, match="sequence length 37 exceeds max_len=32"):
        layer(torch.randn(1, 37, 32))
