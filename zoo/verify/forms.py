"""Two forms: the fast path of an entry equals its reference, outputs and gradients.

Where an entry's fast path is not a direct transcription of its paper, its module (or a
`zoo.core` module whose function it calls) defines `<function>_reference` beside `<function>`:
same signature, the paper's equations. `check_forms` runs the layer in float64 with a padding
mask (and causally, where the entry is autoregressive) at a length that is no block multiple,
then again with every binding of `<function>` in every loaded `zoo` module replaced by the
reference, and compares the outputs and the gradients with respect to the input and every
parameter, to 1e-10 of the largest output and of the largest gradient. A reference the layer
never reaches is a failure too: the check could not bite.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import importlib
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from unittest import mock

import torch
from torch import nn

from zoo.catalog import Entry, module_file, zoo_imports
from zoo.verify.contract import ContractError, Make, factory, sample

SUFFIX = "_reference"
N = 37  # no block multiple of any catalogue hparams
TOL = 1e-10


@dataclass(frozen=True)
class Pair:
    """A fast function and its reference, both attributes of `module`."""

    module: str
    name: str

    @property
    def reference(self) -> str:
        return self.name + SUFFIX

    def __str__(self) -> str:
        return f"{self.module}.{self.name}"


def module_pairs(module: ModuleType) -> list[Pair]:
    """The `(f, f_reference)` pairs a module defines, both callables of that module."""
    pairs = []
    for name, ref in vars(module).items():
        if not name.endswith(SUFFIX) or not callable(ref):
            continue
        fast = getattr(module, name[: -len(SUFFIX)], None)
        if callable(fast) and getattr(ref, "__module__", None) == module.__name__:
            pairs.append(Pair(module.__name__, name[: -len(SUFFIX)]))
    return sorted(pairs, key=str)


def _names_used(path: Path) -> set[str]:
    """Every name and attribute an entry's source mentions (what it may call)."""
    stat = path.stat()
    return set(_parsed_names(path, stat.st_mtime_ns, stat.st_size))


@functools.lru_cache(maxsize=1024)
def _parsed_names(path: Path, _mtime_ns: int, _size: int) -> frozenset[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, ast.alias):
            names.add(node.asname or node.name)
    return frozenset(names)


def reference_pairs(entry: Entry) -> list[Pair]:
    """The pairs the two-forms check runs for `entry`: those its own module defines, and those of
    the `zoo.core` modules it imports (directly or not) whose fast function its file names."""
    pairs = module_pairs(importlib.import_module(entry.module))
    used = _names_used(entry.source)
    for path in zoo_imports(entry.source):
        parts = path.with_suffix("").parts
        name = ".".join(parts[parts.index("zoo"):])
        if not name.startswith("zoo.core.") or module_file(name) != path:
            continue
        pairs += [p for p in module_pairs(importlib.import_module(name)) if p.name in used]
    return pairs


@contextlib.contextmanager
def replaced(pair: Pair) -> Iterator[list[int]]:
    """Every binding of the fast function in a loaded `zoo` module replaced by the reference.
    Yields a one-element list counting the reference's calls."""
    module = importlib.import_module(pair.module)
    fast, reference = getattr(module, pair.name), getattr(module, pair.reference)
    calls = [0]

    def counted(*args, **kwargs):
        calls[0] += 1
        return reference(*args, **kwargs)

    with contextlib.ExitStack() as stack:
        for mod in list(sys.modules.values()):
            if mod is None or not (mod.__name__ == "zoo" or mod.__name__.startswith("zoo.")):
                continue
            for attr, value in list(vars(mod).items()):
                if value is fast:
                    stack.enter_context(mock.patch.object(mod, attr, counted))
        yield calls


def padding_mask(b: int = 2, n: int = N) -> torch.Tensor:
    """A trailing run of padding in one row, scattered padding in the other; the first token of
    each row real, so that a causal row always has a key."""
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[0, n - 7:] = False
    mask[1, 2::3] = False
    return mask


def outputs_and_grads(layer: nn.Module, x: torch.Tensor, mask: torch.Tensor | None
                      ) -> list[torch.Tensor | None]:
    """The layer's output at real tokens and the gradients of a fixed random projection of it
    with respect to the input and every trainable parameter."""
    x = x.detach().requires_grad_()
    out = layer(x) if mask is None else layer(x, mask=mask)
    real = out if mask is None else out[mask]
    weight = torch.randn(real.shape, generator=torch.Generator().manual_seed(3), dtype=real.dtype)
    params = [p for p in layer.parameters() if p.requires_grad]
    grads = torch.autograd.grad((real * weight).sum(), [x, *params], allow_unused=True)
    return [real.detach(), *grads]


def _scale(t: torch.Tensor | None) -> float:
    return t.abs().max().item() if t is not None and t.numel() else 0.0


def _compare(fast: list, ref: list, what: str, names: list[str]) -> None:
    """Max differences relative to the largest value of their kind: the output's, and all the
    gradients' together (a gradient that is zero in exact arithmetic is judged at the gradients'
    scale, not at its own rounding noise)."""
    grad_scale = max(_scale(b) for b in ref[1:]) if len(ref) > 1 else 0.0
    for index, (name, a, b) in enumerate(zip(names, fast, ref, strict=True)):
        if a is None or b is None:
            if (a is None) != (b is None):
                raise ContractError(f"{what}: {name} gets a gradient in one form only")
            continue
        err = (a - b).abs().max().item() if a.numel() else 0.0
        scale = max(_scale(b) if index == 0 else grad_scale, 1e-300)
        if not err <= TOL * scale:
            raise ContractError(f"{what}: {name} differs by {err:.3g} (relative {err / scale:.3g}, "
                                f"allowed {TOL:g})")


def configurations(entry: Entry) -> list[tuple[str, dict, torch.Tensor | None]]:
    """(label, layer overrides, mask): with a padding mask where the entry takes one (and without,
    since fast paths often branch on it), causal too where the entry is autoregressive."""
    masks: list[tuple[str, torch.Tensor | None]] = [("no mask", None)]
    if entry.masking and entry.input == "sequence":
        masks.insert(0, ("padding mask", padding_mask()))
    modes: list[tuple[str, dict]] = [("bidirectional", {})]
    if entry.autoregressive:
        modes.append(("causal", {"causal": True}))
    return [(f"{mode}, {what}", overrides, mask) for mode, overrides in modes for what, mask in masks]


def awake(layer: nn.Module) -> nn.Module:
    """The layer with every parameter that starts all zero (a position bias, a gate) drawn at
    random instead: a zero there would hide the path it feeds from the comparison."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in layer.parameters():
            if p.numel() and not p.any():
                p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return layer


def check_pair(entry: Entry, pair: Pair, make: Make | None = None) -> None:
    """The entry's layer equals itself with `pair`'s function replaced by its reference."""
    make = make or factory(entry)
    reached = 0
    for label, overrides, mask in configurations(entry):
        layer = awake(make(**overrides).double())
        names = ["output", "grad x", *(f"grad {n}" for n, p in layer.named_parameters()
                                       if p.requires_grad)]
        x = sample(entry, n=N)
        fast = outputs_and_grads(layer, x, mask)
        with replaced(pair) as calls:
            ref = outputs_and_grads(layer, x, mask)
        reached += calls[0]
        _compare(fast, ref, f"{entry.id} ({label}) with {pair.reference}", names)
    if not reached:
        raise ContractError(f"{entry.id}: the layer never calls {pair} through a module-level name, "
                            f"so replacing it by {pair.reference} changes nothing and checks nothing")


def check_forms(entry: Entry, make: Make | None = None) -> list[Pair]:
    """`check_pair` for every reference pair of the entry; returns the pairs checked."""
    pairs = reference_pairs(entry)
    for pair in pairs:
        check_pair(entry, pair, make)
    return pairs


def entries_with_references(entries) -> dict[str, list[str]]:
    """`{id: [module.function, ...]}` for the entries that have at least one reference pair."""
    out = {}
    for e in entries:
        pairs = reference_pairs(e)
        if pairs:
            out[e.id] = [str(p) for p in pairs]
    return out


def reference_of(entry: Entry) -> Callable | None:
    """The first reference function the entry's own module defines, or None."""
    module = importlib.import_module(entry.module)
    pairs = module_pairs(module)
    return getattr(module, pairs[0].reference) if pairs else None
