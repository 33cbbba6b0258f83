"""The MQAR generator, checked by hand-built cases: each target is the value paired with its
key, no answer appears in the input, keys and values come from their halves, seeds reproduce."""

import pytest
import torch

from zoo.tasks import BLANK, CELLS, IGNORE, mqar, power_law


def pairs_of(tokens, pairs):
    """The example's own key -> value map, read off its first 2 * pairs tokens."""
    return {int(tokens[2 * i]): int(tokens[2 * i + 1]) for i in range(pairs)}


@pytest.mark.parametrize("n, pairs, vocab", [(16, 2, 40), (64, 8, 256), (128, 16, 1024)])
def test_every_target_is_the_value_paired_with_the_queried_key(n, pairs, vocab):
    batch = mqar(32, n=n, pairs=pairs, vocab=vocab, seed=3)
    for tokens, targets in zip(batch.tokens, batch.targets, strict=True):
        table = pairs_of(tokens, pairs)
        assert len(table) == pairs  # keys distinct within an example
        assert len(set(table.values())) == pairs  # values distinct too
        assert all(1 <= k < vocab // 2 for k in table) and all(vocab // 2 <= v < vocab
                                                               for v in table.values())
        where = (targets != IGNORE).nonzero().flatten().tolist()
        assert len(where) == pairs  # each key queried exactly once
        queried = [int(tokens[i]) for i in where]
        assert sorted(queried) == sorted(table)
        for i in where:
            assert i >= 2 * pairs and (i - 2 * pairs) % 2 == 0  # a query opens a slot
            assert int(targets[i]) == table[int(tokens[i])]
            assert int(tokens[i + 1]) == BLANK  # the answer's position holds the blank


def test_no_answer_appears_in_the_input_after_the_pairs():
    """Fillers are random, but the value a query asks for is never where the answer would go,
    and the blank appears only right after queries."""
    batch = mqar(64, n=64, pairs=8, vocab=256, seed=0)
    for tokens, targets in zip(batch.tokens, batch.targets, strict=True):
        where = (targets != IGNORE).nonzero().flatten()
        blanks = (tokens == BLANK).nonzero().flatten()
        assert sorted(blanks.tolist()) == sorted((where + 1).tolist())


def test_a_hand_built_case():
    """n = 8, one pair: `k v` then three slots of two; the query sits at an even offset."""
    batch = mqar(200, n=8, pairs=1, vocab=20, seed=5)
    k, v = batch.tokens[:, 0], batch.tokens[:, 1]
    where = (batch.targets != IGNORE).float().argmax(1)
    assert set(where.tolist()) <= {2, 4, 6}
    assert torch.equal(batch.tokens.gather(1, where[:, None]).flatten(), k)
    assert torch.equal(batch.targets.gather(1, where[:, None]).flatten(), v)
    # the power law makes the shortest gap the likeliest
    counts = torch.bincount(where, minlength=7)
    assert counts[2] > counts[4] > 0


def test_same_seed_same_batch_and_other_seed_other_batch():
    a = mqar(8, n=64, pairs=4, vocab=256, seed=11)
    b = mqar(8, n=64, pairs=4, vocab=256, seed=11)
    c = mqar(8, n=64, pairs=4, vocab=256, seed=12)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.tokens, c.tokens)


def test_power_law_is_zoologys():
    p = power_law(5, 0.01)
    assert torch.isclose(p.sum(), torch.tensor(1.0, dtype=torch.float64))
    want = torch.tensor([g ** (0.01 - 1) for g in range(1, 6)], dtype=torch.float64)
    assert torch.allclose(p, want / want.sum())


@pytest.mark.parametrize("kwargs, message", [
    (dict(n=10, pairs=4, vocab=100), "4 pairs need at least 16 positions"),
    (dict(n=64, pairs=40, vocab=1000), "40 pairs need at least 160"),
    (dict(n=64, pairs=8, vocab=12), "too small for 8 distinct keys"),
    (dict(n=64, pairs=4, vocab=60), "must exceed the length"),
    (dict(n=0, pairs=4, vocab=60), "n must be a positive int"),
])
def test_bad_cells_are_refused_with_the_reason(kwargs, message):
    with pytest.raises(ValueError, match=message):
        mqar(2, seed=0, **kwargs)


def test_the_grid_grows_in_length_and_pairs_with_a_large_vocabulary():
    grid = [c for name, c in CELLS.items() if name != "smoke"]
    assert len(grid) >= 3 and all(c.vocab >= 1000 for c in grid)
    assert [c.pairs for c in grid] == sorted(c.pairs for c in grid)
    assert CELLS["smoke"].pairs == 4
