"""Helpers for the decoding tests: seeded float64 tensors, and the decoding oracle (`step` over a
split of the sequence equals the causal forward pass on the whole of it), by catalogue name
(`assert_steps_equal_forward`) or on a layer object (`assert_layer_steps_equal_forward`, `decode`,
`state_elements`)."""

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


def decode(layer, x: torch.Tensor, mask: torch.Tensor | None = None, *, seed: int = 0):
    """The outputs of successive `layer.step` calls over random chunks of `x`, concatenated, and the
    last state."""
    state, outs, start = None, [], 0
    for size in random_splits(x.shape[1], seed):
        chunk_mask = None if mask is None else mask[:, start:start + size]
        out, state = layer.step(x[:, start:start + size], state, mask=chunk_mask)
        outs.append(out)
        start += size
    return torch.cat(outs, dim=1), state


def state_elements(state) -> int:
    """Floating-point elements held by a state (a `DecodeState`'s cache; nested dicts, tuples and
    lists of tensors)."""
    if hasattr(state, "cache"):
        return state_elements(state.cache)
    if isinstance(state, torch.Tensor):
        return state.numel() if state.is_floating_point() else 0
    if isinstance(state, dict):
        return sum(state_elements(v) for v in state.values())
    if isinstance(state, (tuple, list)):
        return sum(state_elements(v) for v in state)
    return 0


def padding(n: int) -> torch.Tensor:
    """A `(2, n)` padding mask: the first row padded at its end, the second every fifth token."""
    mask = torch.ones(2, n, dtype=torch.bool)
    mask[0, n - 4:] = False
    mask[1, 2::5] = False
    return mask


def assert_layer_steps_equal_forward(layer, x: torch.Tensor, mask: torch.Tensor | None = None, *,
                                     seeds: int = 3):
    """`step` over `seeds` random splits of `x` equals `layer(x, mask=mask)` (float64, 1e-10);
    returns the state after the last split."""
    full = layer(x, mask=mask)
    for seed in range(seeds):
        out, state = decode(layer, x, mask, seed=seed)
        torch.testing.assert_close(out, full, rtol=1e-10, atol=1e-10)
    return state
