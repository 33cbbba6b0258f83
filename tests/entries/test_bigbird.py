"""BigBird: the pattern is the paper's (a hand-written case); the blocked window + global + random
support read off the layer is that pattern; the random blocks are a fixed, seeded draw without
replacement; the fast path equals the reference (dense softmax on the pattern)."""

import pytest
import torch

import zoo
import zoo.entries.bigbird as bigbird
from tests.layer_checks import (
    assert_empty_batch_gives_empty_output,
    assert_masked_garbage_changes_nothing,
    assert_unchanged_with_references,
)
from tests.oracles import assert_same_outputs_and_grads, qkv
from zoo import probe
from zoo.core.softmax import softmax_attention
from zoo.entries.bigbird import (
    bigbird_attention,
    bigbird_attention_reference,
    bigbird_pattern,
    draw_random_blocks,
)


def test_pattern_is_window_global_and_random_blocks_by_hand():
    """Blocks of one token, one global block, R(1) = {4}, R(4) = {2}, no other random block."""
    random = torch.tensor([[[-1], [4], [-1], [-1], [2]]])
    want = torch.tensor([[1, 1, 1, 1, 1],   # global row
                         [1, 1, 1, 0, 1],   # window 0..2, random 4
                         [1, 1, 1, 1, 0],   # window 1..3, global 0
                         [1, 0, 1, 1, 1],   # window 2..4, global 0
                         [1, 0, 1, 1, 1]],  # window 3..4, global 0, random 2
                        dtype=torch.bool)
    assert torch.equal(bigbird_pattern(5, 1, 1, random)[0], want)


CASES = [(4, 1, 2), (5, 2, 1), (3, 1, 3), (8, 2, 2)]


@pytest.mark.parametrize("c, g, r", CASES, ids=[f"block{c}-g{g}-r{r}" for c, g, r in CASES])
def test_support_of_attention_matrix_is_window_global_random(c, g, r):
    layer = zoo.create("bigbird", dim=32, heads=2, block=c, global_blocks=g,
                       random_blocks=r).double()
    a = probe.attention_matrix(layer, n=37)
    assert torch.equal(a != 0, bigbird_pattern(37, c, g, layer.random(37)))


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


@pytest.mark.parametrize("c, g, r", CASES, ids=[f"block{c}-g{g}-r{r}" for c, g, r in CASES])
def test_fast_path_equals_reference_with_gradients(c, g, r):
    q, k, v = (t.requires_grad_() for t in qkv())
    layer = zoo.create("bigbird", dim=32, heads=2, block=c, global_blocks=g, random_blocks=r)
    rand = layer.random(37)
    mask = torch.ones(2, 37, dtype=torch.bool)
    mask[1, 26:] = False
    mask[1, 9] = False
    out = bigbird_attention(q, k, v, mask, block=c, global_blocks=g, random=rand)
    ref = bigbird_attention_reference(q, k, v, mask, block=c, global_blocks=g, random=rand)
    real = mask[:, None, :, None].expand_as(out)
    assert_same_outputs_and_grads(out * real, ref * real, (q, k, v))


@pytest.mark.parametrize("at", ["start", "ends"])
def test_layer_is_unchanged_with_the_reference(monkeypatch, at):
    layer = zoo.create("bigbird", dim=32, heads=2, block=4, global_blocks=2, random_blocks=2,
                       global_at=at)
    assert_unchanged_with_references(monkeypatch, layer, [
        (bigbird, "bigbird_attention", bigbird_attention_reference)])
    masked = zoo.create("bigbird", dim=32, heads=2, block=4, global_blocks=2, random_blocks=2,
                        global_at=at)
    assert_masked_garbage_changes_nothing(masked)


def test_masked_garbage_and_empty_batch():
    layer = zoo.create("bigbird", dim=32, heads=2, block=4, global_blocks=1, random_blocks=2)
    assert_masked_garbage_changes_nothing(layer)
    assert_empty_batch_gives_empty_output(layer)


def test_one_block_covering_the_sequence_is_softmax_attention():
    q, k, v = qkv()
    torch.testing.assert_close(bigbird_attention(q, k, v, block=37, global_blocks=1),
                               softmax_attention(q, k, v), rtol=1e-12, atol=1e-12)


def test_longer_than_max_len_is_refused():
    layer = zoo.create("bigbird", dim=32, heads=2, block=4, max_len=32)
    with pytest.raises(ValueError, match="sequence length 37 exceeds max_len=32"):
        layer(torch.randn(1, 37, 32))


@pytest.mark.parametrize("c, g, r", [(4, 2, 2), (5, 3, 1), (3, 2, 3)], ids=str)
def test_global_at_ends_is_first_and_last_blocks_global(c, g, r):
    """`global_at="ends"`: the support is the pattern with the first g - g // 2 and the last g // 2
    blocks global (built here from block indices, not by rolling), its random blocks those of
    `layer.random` read in the order that puts the last blocks first."""
    n = 37
    layer = zoo.create("bigbird", dim=32, heads=2, block=c, global_blocks=g, random_blocks=r,
                       global_at="ends").double()
    nb, s = -(-n // c), g // 2
    blocks = torch.arange(n) // c
    qb, kb = blocks[:, None], blocks[None, :]
    is_global = (blocks < g - s) | (blocks >= nb - s)
    want = ((qb - kb).abs() <= 1) | is_global[:, None] | is_global[None, :]
    rand = layer.random(n)  # (h, nb, r) in the rolled order: block B of ours is (B + s) % nb
    drawn = torch.zeros(2, nb, nb, dtype=torch.bool)
    for head in range(2):
        for row in range(nb):
            for col in rand[head, row].tolist():
                if col >= 0:
                    drawn[head, (row - s) % nb, (col - s) % nb] = True
    want = want | drawn[:, qb, kb]
    got = probe.attention_matrix(layer, n=n) != 0
    assert torch.equal(got, want)
    assert not torch.equal(want, bigbird_pattern(n, c, g, rand)), "the layout did not change"


def test_global_at_refuses_other_values():
    with pytest.raises(ValueError, match="global_at"):
        zoo.create("bigbird", dim=32, heads=2, global_at="end")
