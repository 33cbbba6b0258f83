"""Helpers for the new entries' own decoding tests, on layer objects (not catalogue names):
run a layer's `step` over random splits of a sequence."""

import torch


def random_splits(n: int, seed: int = 0) -> list[int]:
    """Chunk lengths >= 1 that add up to `n`, drawn with a seeded generator (single tokens included)."""
    g = torch.Generator().manual_seed(seed)
    sizes, left = [], n
    while left:
        size = min(left, int(torch.randint(1, 9, (), generator=g)))
        sizes.append(size)
        left -= size
    return sizes


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
    """Floating-point elements held by a state (a `StepState`'s cache; nested dicts, tuples and lists
    of tensors)."""
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


def assert_steps_equal_forward(layer, x: torch.Tensor, mask: torch.Tensor | None = None, *,
                               seeds: int = 3):
    """`step` over `seeds` random splits of `x` equals `layer(x, mask=mask)` (float64, 1e-10);
    returns the state after the last split."""
    full = layer(x, mask=mask)
    for seed in range(seeds):
        out, state = decode(layer, x, mask, seed=seed)
        torch.testing.assert_close(out, full, rtol=1e-10, atol=1e-10)
    return state
