"""The robustness battery: what a user meets in the first hour of training, as executable checks.

Like `zoo.verify.contract`, each check takes a catalogue `Entry` and a `make(**overrides)` factory
(`contract.factory`) and raises `ContractError` with a plain reason. `CHECKS` lists them with the
entries they apply to; `tests/test_robust.py` runs them over the whole catalogue. The sizes are
small (dim 32, n 37, batch 2) so the battery stays fast.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import cast

import torch
from torch import nn

from zoo.catalog import Entry
from zoo.verify.contract import ContractError, Make, _close, _expect, sample

N = 37
# What the battery puts at masked positions: every one must change nothing that is not masked.
GARBAGE = (math.nan, math.inf, -math.inf, 1e30)
# Hyper-parameter keywords the battery knows how to break, with the values that must be refused.
# An entry is checked for every keyword its layer class takes (found by its signature).
BAD_HPARAMS: dict[str, tuple[float, ...]] = {
    "eps": (math.nan, -1.0, math.inf),
    "smooth": (-1.0, math.nan, math.inf),
    "lam": (-1.0, math.nan, math.inf),
    "momentum": (-0.1, 1.5, math.nan),
    "inner_dim": (0, -1),
    "dim_head": (0, -1),
    "dim_key": (0, -1),
}


def _padded_mask(fully: bool = False) -> torch.Tensor:
    """`(2, N)`: sample 0 padded at its end and at every third position; sample 1 all real, or
    (with `fully`) all padded."""
    mask = torch.ones(2, N, dtype=torch.bool)
    mask[0, 30:] = False
    mask[0, ::3] = False
    if fully:
        mask[1] = False
    return mask


def _modes(entry: Entry) -> list[dict]:
    return [{}, {"causal": True}] if entry.autoregressive else [{}]


def _float_params(layer: nn.Module) -> list[torch.Tensor]:
    return [p for p in layer.parameters() if p.is_floating_point()]


# --- the checks ---------------------------------------------------------------------------

def check_train_backward(entry: Entry, make: Make) -> None:
    """In training mode, forward and backward give finite gradients for the input and every
    trainable parameter; with masking, also when one sample of the batch is fully padded."""
    # (mask, dtype): a fully padded sample in float32 too, where 1 / tiny overflows soonest
    runs = [(None, torch.float64)] + ([(_padded_mask(fully=True), dtype) for dtype in
                                       (torch.float64, torch.float32)] if entry.masking else [])
    for mode in _modes(entry):
        for mask, dtype in runs:
            layer = make(**mode).to(dtype).train()
            x = sample(entry, dtype=dtype).requires_grad_()
            what = f"train mode, {dtype}{', causal' if mode else ''}" + (
                ", one sample fully padded" if mask is not None else "")
            try:
                out = layer(x) if mask is None else layer(x, mask=mask)
                (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum() \
                    .backward()
            except Exception as err:  # noqa: BLE001 - any crash in training is the finding
                raise ContractError(f"{what}: raised {type(err).__name__}: {err}") from err
            _expect(bool(torch.isfinite(out).all()), f"{what}: output has NaN or inf")
            _expect(x.grad is not None and bool(torch.isfinite(x.grad).all()),
                    f"{what}: the input's gradient is missing or not finite")
            for name, p in layer.named_parameters():
                if not p.requires_grad:
                    continue
                _expect(p.grad is not None, f"{what}: parameter {name} receives no gradient")
                _expect(p.grad is None or bool(torch.isfinite(p.grad).all()),
                        f"{what}: parameter {name}: gradient not finite")


def check_masked_garbage(entry: Entry, make: Make) -> None:
    """NaN, inf or 1e30 at the masked positions of one sample change none of its real outputs and
    nothing of the other sample, against the same batch with zeros there."""
    mask = _padded_mask()
    x = sample(entry).masked_fill(~mask.unsqueeze(-1), 0.0)
    for mode in _modes(entry):
        layer = make(**mode).double()
        clean = layer(x, mask=mask)
        for value in GARBAGE:
            dirty = x.masked_fill(~mask.unsqueeze(-1), value)
            try:
                out = layer(dirty, mask=mask)
            except Exception as err:  # noqa: BLE001 - a crash on masked garbage is the finding
                raise ContractError(f"{value} at masked positions raised {type(err).__name__}: "
                                    f"{err}") from err
            where = f"{value} at masked positions of sample 0{' (causal)' if mode else ''}"
            _expect(bool(torch.isfinite(out[1]).all()), f"{where}: sample 1 is no longer finite")
            _close(out[1], clean[1], f"{where}: sample 1 changed")
            _expect(bool(torch.isfinite(out[0][mask[0]]).all()),
                    f"{where}: real outputs of sample 0 are no longer finite")
            _close(out[0][mask[0]], clean[0][mask[0]], f"{where}: real outputs of sample 0 changed")


def check_empty_batch(entry: Entry, make: Make) -> None:
    """`b = 0` returns an empty output of the input's shape (with an empty mask too)."""
    layer = make().double()
    x = sample(entry, b=0)
    masks = [None] + ([torch.ones(0, N, dtype=torch.bool)] if entry.masking else [])
    for mask in masks:
        try:
            out = layer(x) if mask is None else layer(x, mask=mask)
        except Exception as err:  # noqa: BLE001 - any crash on an empty batch is the finding
            raise ContractError(f"an empty batch {tuple(x.shape)} raised {type(err).__name__}: "
                                f"{err}") from err
        _expect(isinstance(out, torch.Tensor) and out.shape == x.shape,
                f"an empty batch {tuple(x.shape)} gave "
                f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")


def check_dtype_mismatch(entry: Entry, make: Make) -> None:
    """A float64 input to a float32 layer, and the reverse, raise ValueError naming both dtypes."""
    for layer_dtype, x_dtype in ((torch.float32, torch.float64), (torch.float64, torch.float32)):
        layer = make().to(layer_dtype)
        if not _float_params(layer):
            return
        x = sample(entry, dtype=x_dtype)
        try:
            layer(x)
        except ValueError as err:
            _expect(str(x_dtype) in str(err) and str(layer_dtype) in str(err),
                    f"the dtype error does not name both {x_dtype} and {layer_dtype}: {err}")
            continue
        except Exception as err:  # noqa: BLE001 - the point is which kind it is
            raise ContractError(f"a {x_dtype} input to a {layer_dtype} layer raised "
                                f"{type(err).__name__} ({err}), not a ValueError") from err
        raise ContractError(f"a {x_dtype} input to a {layer_dtype} layer was accepted")


def bad_hparams(cls: type) -> list[tuple[str, float]]:
    """The `(keyword, value)` pairs of `BAD_HPARAMS` that `cls`'s constructor takes."""
    params = inspect.signature(cls).parameters
    return [(kw, value) for kw, values in BAD_HPARAMS.items() if kw in params for value in values]


def check_bad_hparams(entry: Entry, make: Make, cls: type | None = None) -> None:
    """Each bad value of a hyper-parameter the layer takes (`BAD_HPARAMS`) raises ValueError
    naming the keyword, at construction."""
    cls = cls or type(make())
    for kw, value in bad_hparams(cls):
        try:
            make(**{kw: value})
        except ValueError as err:
            _expect(kw in str(err), f"the error for {kw}={value} does not name {kw}: {err}")
            continue
        except Exception as err:  # noqa: BLE001 - the point is which kind it is
            raise ContractError(f"{kw}={value} raised {type(err).__name__} ({err}), "
                                "not a ValueError") from err
        raise ContractError(f"{kw}={value} was accepted")


def check_attend_lengths(entry: Entry, make: Make) -> None:
    """A kernel entry's `attend` refuses keys and values of different lengths with a ValueError."""
    layer = make().double()
    g = torch.Generator().manual_seed(3)
    h, d = (cast(int, getattr(layer, name, default)) for name, default in (("heads", 2), ("dim_head", 8)))
    q, k = (torch.randn(2, h, 12, d, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(2, h, 11, d, generator=g, dtype=torch.float64)
    attend: Callable[..., torch.Tensor] = getattr(layer, "attend")  # noqa: B009 - a Module's attribute
    try:
        attend(q, k, v)
    except ValueError as err:
        _expect("length" in str(err) or "shape" in str(err) or "expected" in str(err),
                f"the error for k, v of different lengths does not say so: {err}")
        return
    except Exception as err:  # noqa: BLE001 - the point is which kind it is
        raise ContractError(f"k of length 12 and v of length 11 raised {type(err).__name__} "
                            f"({err}), not a ValueError") from err
    raise ContractError("attend accepted k of length 12 and v of length 11")


def _has_bad_hparams(entry: Entry) -> bool:
    from zoo.registry import load

    return bool(bad_hparams(load(entry.id)))


# name -> (check, applies to entry?)
CHECKS: dict[str, tuple[Callable[[Entry, Make], None], Callable[[Entry], bool]]] = {
    "train-backward": (check_train_backward, lambda e: True),
    "masked-garbage": (check_masked_garbage, lambda e: e.masking),
    "empty-batch": (check_empty_batch, lambda e: True),
    "dtype-mismatch": (check_dtype_mismatch, lambda e: True),
    "bad-hparams": (check_bad_hparams, _has_bad_hparams),
    "attend-lengths": (check_attend_lengths, lambda e: e.kernel),
}
