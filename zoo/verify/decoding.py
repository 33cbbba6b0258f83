"""The decoding contract: `step` over any split of a sequence equals the causal forward over all of it.

Each check takes an `Entry` and a `make(**overrides)` factory (as `zoo.verify.contract`'s) and
raises `ContractError` with a plain reason. `DECODING_CHECKS` lists them; they apply to every
autoregressive sequence entry, so a new entry is checked with no new test code.

Where an entry's catalogue `decoding` says `exact: false` (an output depends on the sequence's total
length, e.g. a block of `sqrt(n)`), no step can know that length: each chunk's outputs must then
equal the forward over the prefix that ends with the chunk, and the check makes sure the entry
really is such a case (its forward over a prefix differs from the whole forward's rows).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from zoo.catalog import Entry
from zoo.verify.contract import ContractError, Make, sample

STEP_TOLERANCE = 1e-10
STEP_N = 29


def applies(e: Entry) -> bool:
    """Decoding is part of the contract of every autoregressive sequence entry."""
    return e.autoregressive and e.input == "sequence"


def declared_exact(e: Entry) -> bool:
    return bool((e.decoding or {}).get("exact", True))


def splits(n: int, seed: int = 0) -> list[list[int]]:
    """Chunk sizes that add up to `n`: a prompt then single tokens, and a random split (sizes 1 to
    9, starting with a single token)."""
    g = torch.Generator().manual_seed(seed)
    out = [[n // 2 + 1] + [1] * (n - n // 2 - 1)]
    for _ in range(1):
        sizes, left = [1], n - 1
        while left:
            sizes.append(min(int(torch.randint(1, 10, (1,), generator=g)), left))
            left -= sizes[-1]
        out.append(sizes)
    return out


def padding_mask(n: int, b: int = 2, seed: int = 0) -> torch.Tensor:
    """A random padding mask, with the first tokens of the second sample padded (left padding)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, n, generator=g) > 0.3
    mask[1, :3] = False
    return mask


def run_steps(layer: Any, x: torch.Tensor, sizes: list[int], mask: torch.Tensor | None = None):
    """`step` over the chunks of `x` given by `sizes`. Returns the outputs per chunk and the state."""
    outs, state, s = [], None, 0
    step: Callable = layer.step
    for t in sizes:
        try:
            y, state = step(x[:, s:s + t], state, mask=None if mask is None else mask[:, s:s + t])
        except Exception as err:  # noqa: BLE001 - a crash on some split is the finding
            raise ContractError(f"step over chunks {sizes}: the chunk at token {s} raised "
                                f"{type(err).__name__}: {err}") from err
        if not (isinstance(y, torch.Tensor) and y.shape == x[:, s:s + t].shape):
            raise ContractError(f"step on a chunk of {t} tokens returned "
                                f"{tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}, "
                                f"expected {tuple(x[:, s:s + t].shape)}")
        outs.append(y)
        s += t
    return outs, state


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1.0)


def _run(layer: nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return layer(x) if mask is None else layer(x, mask=mask)


def check_step_equals_forward(e: Entry, make: Make, *, n: int = STEP_N) -> float:
    """Successive `step` calls over several splits (a prompt then single tokens, random sizes),
    with and without a padding mask, equal the causal forward over the whole sequence (or, with
    `exact: false`, over the prefix up to each chunk) in float64, at every real token (a padded
    query's output is not part of the contract, as in `check_padding`). Returns the worst error."""
    layer: Any = make(causal=True).double()
    if not callable(getattr(layer, "step", None)):
        raise ContractError(f"{e.id} is autoregressive but its layer has no step(x, state, *, mask)")
    x = sample(e, n=n)
    exact, worst, needed = declared_exact(e), 0.0, 0.0
    with torch.no_grad():
        for mask in [None, padding_mask(n)] if e.masking else [None]:
            full = _run(layer, x, mask)
            for sizes in splits(n):
                outs, _ = run_steps(layer, x, sizes, mask)
                s = 0
                for t, y in zip(sizes, outs, strict=True):
                    whole = ref = full[:, s:s + t]
                    if not exact:
                        ref = _run(layer, x[:, :s + t], None if mask is None else mask[:, :s + t])[:, s:]
                    if mask is not None:  # as the padding check: outputs at real tokens
                        real = mask[:, s:s + t]
                        y, ref, whole = y[real], ref[real], whole[real]
                    if not ref.numel():
                        s += t
                        continue
                    needed = max(needed, _err(ref, whole))
                    err = _err(y, ref)
                    worst = max(worst, err)
                    if not err <= STEP_TOLERANCE:
                        what = "forward over the whole sequence" if exact else \
                            f"forward over the first {s + t} tokens"
                        raise ContractError(
                            f"step over chunks {sizes}{' with a padding mask' if mask is not None else ''}:"
                            f" tokens {s}..{s + t - 1} differ from {what} by {err:.3g} (allowed "
                            f"{STEP_TOLERANCE})")
                    s += t
    if not exact and needed <= STEP_TOLERANCE:  # the declaration must be needed
        raise ContractError(f"{e.id} declares decoding exact: false, yet its forward over every "
                            "prefix equals the whole forward's rows: drop exact: false")
    return worst


def check_step_keeps_state(e: Entry, make: Make) -> None:
    """A state can be read twice (e.g. by two beams): `step` does not change the one it is given."""
    layer: Any = make(causal=True).double()
    x = sample(e, n=12)
    with torch.no_grad():
        _, state = layer.step(x[:, :9])
        first, _ = layer.step(x[:, 9:], state)
        again, _ = layer.step(x[:, 9:], state)
    if _err(again, first) > STEP_TOLERANCE:
        raise ContractError("stepping twice from the same state gave different outputs: step "
                            "changed the state it was given")


def check_step_refuses_bad_use(e: Entry, make: Make) -> None:
    """`step` on a layer built with causal=False, or with a state of another batch size, raises
    ValueError."""
    x = sample(e, n=5)
    try:
        non_causal: Any = make(causal=False).double()
    except ValueError:  # some configurations exist only causally (e.g. a gate defined for it)
        non_causal = None
    if non_causal is not None:
        try:
            non_causal.step(x)
        except ValueError:
            pass
        except Exception as err:  # noqa: BLE001 - the wrong error is the finding
            raise ContractError(f"step on a causal=False layer raised {type(err).__name__}, not "
                                "ValueError") from err
        else:
            raise ContractError("step on a causal=False layer did not raise ValueError")
    layer: Any = make(causal=True).double()
    with torch.no_grad():
        _, state = layer.step(x)
        try:
            layer.step(x[:1], state)
        except ValueError:
            return
        except Exception as err:  # noqa: BLE001
            raise ContractError(f"step with a state of batch size 2 on x of batch size 1 raised "
                                f"{type(err).__name__}, not ValueError") from err
    raise ContractError("step with a state of batch size 2 on x of batch size 1 did not raise")


DECODING_CHECKS: dict[str, Callable[[Entry, Make], object]] = {
    "step_equals_forward": check_step_equals_forward,
    "step_keeps_state": check_step_keeps_state,
    "step_refuses_bad_use": check_step_refuses_bad_use,
}
