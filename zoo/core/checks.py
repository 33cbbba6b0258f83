"""Input validation with messages that say what was expected and what was given.

Every layer calls these at the top of `forward`, so a wrong shape fails here with a plain message,
not deep inside torch.
"""

from __future__ import annotations

import math

import torch


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def check_tensor(x, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def check_sequence(x, dim: int, mask=None, *, name: str = "layer",
                   layer: torch.nn.Module | None = None) -> None:
    """`x` must be `(b, n, dim)` with n >= 1; `mask`, if given, a bool `(b, n)`; with `layer`,
    `x` must have the dtype of the layer's parameters (`check_dtype`)."""
    check_tensor(x, "x")
    if x.ndim != 3 or x.shape[-1] != dim or x.shape[1] < 1:
        raise ValueError(
            f"{name}: expected x of shape (batch, length >= 1, {dim}), got {_shape(x)}"
        )
    check_key_mask(mask, x.shape[0], x.shape[1], name=name)
    if layer is not None:
        check_dtype(x, layer, name=name)


def check_dtype(x: torch.Tensor, module: torch.nn.Module, *, name: str = "layer") -> None:
    """`x` must have the dtype of the module's parameters (no silent casts, no deep torch error).

    Under `torch.autocast` mixed dtypes are the point (autocast casts inside each op): no check."""
    p = next(module.parameters(), None)
    if p is not None and p.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
        raise ValueError(f"{name}: x has dtype {x.dtype} but the layer's parameters are "
                         f"{p.dtype}; convert one of them (e.g. layer.to({x.dtype}))")


def check_key_mask(mask, b: int, n: int, *, name: str = "layer") -> None:
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name}: mask must be a bool tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise ValueError(
            f"{name}: mask must have dtype torch.bool (True = real token), got {mask.dtype}"
        )
    if tuple(mask.shape) != (b, n):
        raise ValueError(f"{name}: expected mask of shape ({b}, {n}), got {_shape(mask)}")


def check_image(x, dim: int, *, name: str = "layer", layer: torch.nn.Module | None = None) -> None:
    """`x` must be `(b, dim, y, x)` with both spatial sizes >= 1; with `layer`, of the dtype of
    the layer's parameters (`check_dtype`)."""
    check_tensor(x, "x")
    if x.ndim != 4 or x.shape[1] != dim or min(x.shape[2:]) < 1:
        raise ValueError(
            f"{name}: expected x of shape (batch, {dim}, height, width), got {_shape(x)}"
        )
    if layer is not None:
        check_dtype(x, layer, name=name)


def check_qkv(q, k, v, mask=None, *, name: str = "attention") -> None:
    """q `(b, h, i, d)`, k `(b, h, j, d)`, v `(b, h, j, e)`, mask `(b, j)`."""
    for t, label in ((q, "q"), (k, "k"), (v, "v")):
        check_tensor(t, label)
        if t.ndim != 4:
            raise ValueError(f"{name}: expected {label} of shape (b, h, n, d), got {_shape(t)}")
    if q.shape[:2] != k.shape[:2] or k.shape[:2] != v.shape[:2]:
        raise ValueError(
            f"{name}: q, k, v must agree on (batch, heads), got {_shape(q)}, {_shape(k)}, "
            f"{_shape(v)}"
        )
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"{name}: q and k need the same last dim, got {_shape(q)}, {_shape(k)}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"{name}: k and v need the same length, got {_shape(k)}, {_shape(v)}")
    check_key_mask(mask, k.shape[0], k.shape[2], name=name)


def positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _real(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def nonnegative_float(value, name: str) -> float:
    """A finite number >= 0 (a smoothing term, a scale that may switch something off)."""
    if _real(value, name) < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return float(value)


def positive_float(value, name: str) -> float:
    """A finite number > 0."""
    if _real(value, name) <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return float(value)


def unit_interval(value, name: str) -> float:
    """A finite number in [0, 1] (a momentum, a ratio)."""
    if not 0 <= _real(value, name) <= 1:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return float(value)


def one_of(value, choices, name: str):
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def refuse_causal(name: str, causal: bool) -> None:
    """For entries whose paper has no autoregressive form."""
    if causal:
        raise ValueError(
            f"{name} does not support causal=True: its paper gives no autoregressive form "
            "(catalogue: autoregressive: false)"
        )


def refuse_mask(name: str, mask) -> None:
    """For entries that cannot honour a key-padding mask."""
    if mask is not None:
        raise ValueError(
            f"{name} does not take a padding mask (catalogue: masking: false); pass mask=None"
        )
