"""The layer contract as executable checks, shared by the test battery and `zoo check`.

Each check takes a catalogue `Entry` and a `make(**overrides)` factory that builds the layer in
eval mode, and raises `ContractError` (an `AssertionError`) with a plain reason when the layer
breaks the contract. `CHECKS` lists them all with the entries they apply to.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable

import torch
from torch import nn

from zoo.catalog import Entry
from zoo.core import masks
from zoo.registry import load

DIM = 32
Make = Callable[..., nn.Module]


class ContractError(AssertionError):
    """A layer does not do what the contract (or its catalogue entry) says."""


def factory(entry: Entry, cls: type[nn.Module] | None = None, dim: int = DIM) -> Make:
    """`make(**overrides)`: the entry's layer with its catalogue `hparams`, seeded, in eval mode."""

    def make(**overrides) -> nn.Module:
        torch.manual_seed(0)
        layer = (cls or load(entry.id))(**{"dim": dim, **entry.hparams, **overrides})
        return layer.eval()

    return make


def sample(entry: Entry, b: int = 2, n: int = 37, *, dtype=torch.float64, dim: int = DIM,
           seed: int = 1) -> torch.Tensor:
    """A random input: `(b, n, dim)` for sequences, `(b, dim, y, x)` with y x close to n for images."""
    g = torch.Generator().manual_seed(seed)
    if entry.input == "image":
        y = max(int(n ** 0.5), 1)
        return torch.randn(b, dim, y, max(n // y, 1), generator=g, dtype=dtype)
    return torch.randn(b, n, dim, generator=g, dtype=dtype)


def _expect(cond: bool, message: str) -> None:
    if not cond:
        raise ContractError(message)


def _close(a: torch.Tensor, b: torch.Tensor, what: str, tol: float = 1e-9) -> None:
    err = (a - b).abs().max().item() if a.numel() else 0.0
    scale = max(b.abs().max().item() if b.numel() else 0.0, 1.0)
    _expect(err <= tol * scale, f"{what}: max difference {err:.3g} (allowed {tol * scale:.3g})")


def _finite(out: torch.Tensor, what: str) -> None:
    _expect(bool(torch.isfinite(out).all()), f"{what}: output has NaN or inf")


def _run(layer: nn.Module, x: torch.Tensor, mask=None) -> torch.Tensor:
    return layer(x) if mask is None else layer(x, mask=mask)


# --- the checks ---------------------------------------------------------------------------

def check_shape(entry: Entry, make: Make) -> None:
    """Output shape equals input shape, at odd lengths too (n = 1 and 37), and is finite."""
    layer = make().double()
    for n in (1, 37):
        x = sample(entry, n=n)
        try:
            out = layer(x)
        except Exception as err:  # noqa: BLE001 - any crash at an odd length is the finding
            raise ContractError(f"n={n}: raised {type(err).__name__}: {err}") from err
        _expect(isinstance(out, torch.Tensor) and out.shape == x.shape,
                f"n={n}: expected output shape {tuple(x.shape)}, got "
                f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
        _finite(out, f"n={n}")


def check_finite(entry: Entry, make: Make) -> None:
    """Finite output for inputs scaled by 100 and, with masking, for a fully padded row."""
    for dtype in (torch.float32, torch.float64):
        layer = make().to(dtype)
        _finite(layer(sample(entry, dtype=dtype) * 100), f"{dtype}, input x 100")
    if entry.masking:
        layer = make().double()
        mask = torch.ones(2, 37, dtype=torch.bool)
        mask[1] = False
        _finite(layer(sample(entry), mask=mask), "a fully padded row")


def check_gradients(entry: Entry, make: Make) -> None:
    """Every trainable parameter receives a finite gradient."""
    layer = make().double()
    layer(sample(entry)).square().sum().backward()
    for name, p in layer.named_parameters():
        if p.requires_grad:
            grad = p.grad
            _expect(grad is not None, f"parameter {name} receives no gradient")
            _expect(grad is None or bool(torch.isfinite(grad).all()),
                    f"parameter {name}: gradient not finite")


def check_dtypes(entry: Entry, make: Make) -> None:
    """float32, float64 and bfloat16 run and return the input's dtype."""
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        out = make().to(dtype)(sample(entry, dtype=dtype))
        _expect(out.dtype == dtype, f"{dtype} input gave a {out.dtype} output")
        _finite(out, str(dtype))


def check_batch_independence(entry: Entry, make: Make) -> None:
    """Each sample's output is the same alone as in a batch."""
    layer = make().double()
    x = sample(entry, b=3)
    together = layer(x)
    for i in range(3):
        _close(layer(x[i:i + 1])[0], together[i], f"sample {i} alone vs in a batch")


def check_determinism(entry: Entry, make: Make) -> None:
    """In eval mode two calls on the same input give the same output."""
    layer = make().double()
    x = sample(entry)
    _expect(torch.equal(layer(x), layer(x)), "two eval-mode calls differ")


def check_causal(entry: Entry, make: Make) -> None:
    """With causal=True, changing tokens from t on changes no output before t (and some after)."""
    layer = make(causal=True).double()
    x = sample(entry)
    out = layer(x)
    g = torch.Generator().manual_seed(7)
    for t in (1, 18, 36):
        y = x.clone()
        y[:, t:] = torch.randn(y[:, t:].shape, generator=g, dtype=y.dtype)
        out_y = layer(y)
        _close(out_y[:, :t], out[:, :t], f"causal=True: outputs before position {t} changed when "
               f"positions {t}.. changed (a later token leaks)")
        _expect(not torch.allclose(out_y[:, t:], out[:, t:]),
                f"causal=True: outputs from position {t} on ignore their own inputs")


def check_refuses_causal(entry: Entry, make: Make) -> None:
    """An entry that is not autoregressive refuses causal=True with a ValueError (TypeError for
    image layers, which take no such keyword)."""
    allowed = (ValueError, TypeError) if entry.input == "image" else (ValueError,)
    try:
        layer = make(causal=True)
        layer(sample(entry, dtype=torch.float32))
    except allowed as err:
        _expect("causal" in str(err), f"the error for causal=True does not say so: {err}")
        return
    raise ContractError("causal=True was accepted, but the catalogue says autoregressive: false")


@contextlib.contextmanager
def _padded_tokens_unfilled():
    """Every binding of `zoo.core.masks.zero_padded_tokens` in a loaded zoo module replaced by the
    identity: the padded tokens then reach the mechanism as they are."""
    fill = masks.zero_padded_tokens
    bound = [(module, name) for module in list(sys.modules.values())
             if getattr(module, "__name__", "").startswith("zoo")
             for name, obj in list(vars(module).items()) if obj is fill]
    for module, name in bound:
        setattr(module, name, lambda x, mask: x)
    try:
        yield
    finally:
        for module, name in bound:
            setattr(module, name, fill)


def check_padding(entry: Entry, make: Make) -> None:
    """With a padding mask, changing padded tokens changes no output at a real token.

    Layers set padded tokens to zero as they come in (`zero_padded_tokens`), which alone would
    pass this check; so it runs with that fill switched off, and tests the mechanism's own mask."""
    layer = make().double()
    x = sample(entry)
    mask = torch.ones(2, 37, dtype=torch.bool)
    mask[0, 30:] = False
    mask[1, ::3] = False
    y = x.masked_fill(~mask.unsqueeze(-1), 0.0) + 5 * (~mask).unsqueeze(-1)
    with _padded_tokens_unfilled():
        _close(layer(y, mask=mask)[mask], layer(x, mask=mask)[mask],
               "outputs at real tokens changed when padded tokens changed")


def check_refuses_mask(entry: Entry, make: Make) -> None:
    """An entry without masking refuses a mask with a ValueError naming it."""
    if entry.input == "image":
        return
    layer = make()
    try:
        layer(sample(entry, dtype=torch.float32), mask=torch.ones(2, 37, dtype=torch.bool))
    except ValueError as err:
        _expect("mask" in str(err), f"the error for a mask does not say so: {err}")
        return
    raise ContractError("a padding mask was accepted, but the catalogue says masking: false")


def check_bad_shape(entry: Entry, make: Make) -> None:
    """A wrong input shape raises ValueError saying what was expected."""
    layer = make()
    good = sample(entry, dtype=torch.float32)
    wrong_width = good[:, :-1] if entry.input == "image" else good[..., :-1]
    for bad in (wrong_width, good[0]):
        try:
            layer(bad)
        except ValueError as err:
            _expect("expected" in str(err), f"the shape error does not say what was expected: {err}")
            continue
        except Exception as err:  # noqa: BLE001 - the point is which kind it is
            raise ContractError(f"input of shape {tuple(bad.shape)} raised {type(err).__name__} "
                                f"({err}), not a ValueError naming the expected shape") from err
        raise ContractError(f"input of shape {tuple(bad.shape)} was accepted")


# name -> (check, applies to entry?)
CHECKS: dict[str, tuple[Callable[[Entry, Make], None], Callable[[Entry], bool]]] = {
    "shape": (check_shape, lambda e: True),
    "finite": (check_finite, lambda e: True),
    "gradients": (check_gradients, lambda e: True),
    "dtypes": (check_dtypes, lambda e: True),
    "batch-independence": (check_batch_independence, lambda e: True),
    "determinism": (check_determinism, lambda e: True),
    "causal": (check_causal, lambda e: e.autoregressive),
    "refuses-causal": (check_refuses_causal, lambda e: not e.autoregressive),
    "padding": (check_padding, lambda e: e.masking),
    "refuses-mask": (check_refuses_mask, lambda e: not e.masking and e.input == "sequence"),
    "bad-shape": (check_bad_shape, lambda e: True),
}


def run_contract(entry: Entry, make: Make | None = None) -> list[str]:
    """Run every applicable check; return the failures as 'check: reason' lines."""
    make = make or factory(entry)
    problems = []
    for name, (check, applies) in CHECKS.items():
        if not applies(entry):
            continue
        try:
            check(entry, make)
        except ContractError as err:
            problems.append(f"{name}: {err}")
        except Exception as err:  # noqa: BLE001 - a crash is a contract failure too
            problems.append(f"{name}: crashed with {type(err).__name__}: {err}")
    return problems
