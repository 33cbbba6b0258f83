"""Helpers for the tests of the recurrent entries: seeded float64 tensors, and the decoding oracle
(`step` over a split of the sequence equals the causal forward pass on the whole of it)."""

import pytest
import torch

import zoo
from zoo.verify.contract import factory


def randn(*shape, seed=0):
    """A seeded float64 standard normal tensor."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def padding_mask(n: int = 37) -> torch.Tensor:
    """`(2, n)`: the first row with holes (every fifth token padded), the second a padded tail."""
    mask = torch.ones(2, n, dtype=torch.bool)
    mask[0, ::5] = False
    mask[1, 2 * n // 3:] = False
    return mask


def random_splits(n: int, seed: int = 0) -> list[int]:
    """Chunk lengths summing to `n`, single tokens and longer chunks mixed."""
    g = torch.Generator().manual_seed(seed)
    sizes, left = [], n
    while left:
        size = min(left, int(torch.randint(1, 9, (1,), generator=g)))
        sizes.append(size)
        left -= size
    return sizes


def assert_steps_equal_forward(name: str, *, n: int = 29, seed: int = 0, masked: bool = True,
                               **overrides) -> None:
    """Successive `step` calls (random splits) equal `forward` of a causal layer, float64, 1e-10,
    at every position, with a padding mask (holes and a padded tail) and without; a layer built
    with causal=False refuses to step."""
    make = factory(zoo.entry(name))
    with pytest.raises(ValueError, match="causal=True"):
        make(causal=False, **overrides).step(torch.randn(1, 2, make().dim))
    layer = make(causal=True, **overrides).double()
    x = torch.randn(2, n, layer.dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    masks = [None]
    if masked:
        masks.append(padding_mask(n))
    for mask in masks:
        with torch.no_grad():
            full = layer(x, mask=mask)
            state, outs, at = None, [], 0
            for size in random_splits(n, seed):
                part = None if mask is None else mask[:, at:at + size]
                out, state = layer.step(x[:, at:at + size], state, mask=part)
                outs.append(out)
                at += size
        torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=1e-10, atol=1e-10)


def assert_padded_tokens_vanish(name: str) -> None:
    """A causal layer's outputs at the real tokens of a sequence with holes equal its outputs on the
    sequence with the holes cut out: padded tokens neither write nor decay."""
    layer = factory(zoo.entry(name))(causal=True).double()
    x = randn(1, 12, layer.dim, seed=4)
    mask = torch.ones(1, 12, dtype=torch.bool)
    mask[0, [2, 7, 8]] = False
    with torch.no_grad():
        torch.testing.assert_close(layer(x, mask=mask)[:, mask[0]], layer(x[:, mask[0]]),
                                   rtol=1e-12, atol=1e-12)
