r"""Synthetic tasks that measure what a token mixer can learn: multi-query associative recall.

MQAR (Arora et al., "Zoology: Measuring and Improving Recall in Efficient Language Models",
arXiv 2312.04927) as the paper and its task code define it: a sequence opens with `pairs`
key-value pairs (keys drawn from the first half of the vocabulary, values from the second, no key
or value repeated within an example); every key is then queried once, at a distance after the
pairs drawn from a power law (`power_a = 0.01`: short gaps are likely), and the model must emit the
value paired with the queried key at the query's position. Loss and accuracy count the query
positions only.

One change from Zoology, so that causal and bidirectional mixers solve the same problem: the
position after a query holds the blank token 0 instead of a random token, so the answer never
appears in the input (a bidirectional mixer could otherwise read a value that the filler happened
to repeat). Every other position after the pairs holds a random filler token from the whole
vocabulary, as Zoology's `random_non_queries`.

    >>> batch = mqar(4, n=64, pairs=8, vocab=1024, seed=0)
    >>> batch.tokens.shape, batch.targets.shape
    (torch.Size([4, 64]), torch.Size([4, 64]))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BLANK = 0
IGNORE = -100  # the target of every position that is not a query (torch's cross-entropy default)


@dataclass(frozen=True)
class Batch:
    """`tokens` `(b, n)` int64 inputs; `targets` `(b, n)`: the answer at query positions, else -100."""

    tokens: torch.Tensor
    targets: torch.Tensor

    @property
    def queries(self) -> torch.Tensor:
        """`(b, n)` bool, True at the query positions (where `targets` holds an answer)."""
        return self.targets != IGNORE


def check_mqar(n: int, pairs: int, vocab: int) -> None:
    """Raise ValueError unless `(n, pairs, vocab)` make a well-posed MQAR instance."""
    for name, value in (("n", n), ("pairs", pairs), ("vocab", vocab)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"mqar: {name} must be a positive int, got {value!r}")
    if 4 * pairs > n:
        raise ValueError(f"mqar: {pairs} pairs need at least {4 * pairs} positions (2 per pair, "
                         f"then a query and its blank per pair), got n={n}")
    # keys come from [1, vocab/2) and values from [vocab/2, vocab), each drawn without repetition
    if vocab // 2 - 1 < pairs:
        raise ValueError(f"mqar: vocab={vocab} is too small for {pairs} distinct keys "
                         f"(keys come from 1 .. vocab/2 - 1); use vocab >= {2 * pairs + 2}")
    if vocab <= n:
        raise ValueError(f"mqar: vocab={vocab} must exceed the length n={n} (Zoology's condition)")


def power_law(space: int, power_a: float = 0.01) -> torch.Tensor:
    """Zoology's gap distribution over `space` slots: `p(g) ∝ a g^(a - 1)`, g = 1 .. space."""
    g = torch.arange(1, space + 1, dtype=torch.float64)
    p = power_a * g ** (power_a - 1)
    return p / p.sum()


def mqar(b: int, *, n: int, pairs: int, vocab: int, seed: int, power_a: float = 0.01) -> Batch:
    """`b` MQAR examples, a pure function of its arguments (same seed, same batch).

    Layout of one example: `k_1 v_1 ... k_P v_P`, then `n - 2P` positions in `(n - 2P) // 2` slots
    of two; slot `g` (one per key, drawn without replacement from the power law) holds the query
    `k` and then the blank, and every other position a random filler.

    Raises:
        ValueError: when the vocabulary is too small or the sequence too short for `pairs`.
    """
    check_mqar(n, pairs, vocab)
    if not isinstance(b, int) or b < 0:
        raise ValueError(f"mqar: b must be a non-negative int, got {b!r}")
    g = torch.Generator().manual_seed(int(seed))
    half = vocab // 2
    # P distinct keys from [1, half) and P distinct values from [half, vocab) per example
    keys = torch.rand(b, half - 1, generator=g).argsort(dim=1)[:, :pairs] + 1
    values = torch.rand(b, vocab - half, generator=g).argsort(dim=1)[:, :pairs] + half
    context = 2 * pairs
    space = (n - context) // 2
    weights = power_law(space, power_a).expand(b, space)
    gaps = torch.multinomial(weights, pairs, replacement=False, generator=g)  # (b, P) slots
    tokens = torch.randint(1, vocab, (b, n), generator=g)
    tokens[:, 0:context:2], tokens[:, 1:context:2] = keys, values
    targets = torch.full((b, n), IGNORE, dtype=torch.int64)
    where = context + 2 * gaps  # the query positions
    tokens.scatter_(1, where, keys)
    tokens.scatter_(1, where + 1, BLANK)
    targets.scatter_(1, where, values)
    return Batch(tokens, targets)


@dataclass(frozen=True)
class Cell:
    """One point of the recall grid: sequence length, key-value pairs and vocabulary."""

    name: str
    n: int
    pairs: int
    vocab: int

    def __post_init__(self):
        check_mqar(self.n, self.pairs, self.vocab)


# The grid: a smoke cell (short, 4 pairs, as Zoology's basic config), then cells that grow in
# length and pairs at one width, in the spirit of Zoology's Figure 2, with a vocabulary above 1,000
# (Zoology: large vocabularies separate architectures).
CELLS = {c.name: c for c in (
    Cell("smoke", n=64, pairs=4, vocab=256),
    Cell("n64-p4", n=64, pairs=4, vocab=1024),
    Cell("n128-p8", n=128, pairs=8, vocab=1024),
    Cell("n256-p16", n=256, pairs=16, vocab=1024),
    Cell("n256-p32", n=256, pairs=32, vocab=1024),
)}
