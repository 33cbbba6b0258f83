"""Look entries up by catalogue name: `names`, `entry`, `load`, `create`."""

from __future__ import annotations

import difflib
import fnmatch
import importlib
import inspect

from torch import nn

from zoo.catalog import Entry, catalog


class UnknownEntry(LookupError):
    """No catalogue entry has that name; the message lists close matches."""


def _resolve(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"an entry name must be a string, got {type(name).__name__}")
    cat = catalog()
    key = name.strip().lower().replace("_", "-")
    if key in cat:
        return key
    close = difflib.get_close_matches(key, list(cat), n=5, cutoff=0.5)
    hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
    raise UnknownEntry(f"no catalogue entry named {name!r}{hint} (zoo.names() lists all "
                       f"{len(cat)})")


def names(pattern: str = "*", *, family: str | None = None,
          autoregressive: bool | None = None) -> list[str]:
    """Sorted ids matching an fnmatch `pattern`, optionally filtered by family and causality."""
    out = []
    for e in catalog().values():
        if not fnmatch.fnmatchcase(e.id, pattern):
            continue
        if family is not None and e.family != family:
            continue
        if autoregressive is not None and e.autoregressive != autoregressive:
            continue
        out.append(e.id)
    return sorted(out)


def entry(name: str) -> Entry:
    """The catalogue card of `name`."""
    return catalog()[_resolve(name)]


def load(name: str) -> type[nn.Module]:
    """The layer class of `name`: the `nn.Module` in its file named like the id.

    The class name is the id without dashes, in any case: `bp-transformer` -> `BPTransformer`.
    """
    e = entry(name)
    module = importlib.import_module(e.module)
    wanted = e.id.replace("-", "").lower()
    for attr, obj in vars(module).items():
        if (attr.lower() == wanted and inspect.isclass(obj) and issubclass(obj, nn.Module)
                and obj.__module__ == module.__name__):
            return obj
    raise ImportError(f"{e.module} defines no nn.Module class named like {e.id!r} "
                      f"(expected a class whose name, lower-cased, is {wanted!r})")


def accepted_keywords(cls: type) -> list[str]:
    params = inspect.signature(cls).parameters
    return [p for p, v in params.items() if v.kind in
            (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]


def create(name: str, /, **kwargs) -> nn.Module:
    """Build the layer of `name`, e.g. `create("performer", dim=64, heads=4, causal=True)`.

    Raises:
        UnknownEntry: for an unknown name.
        TypeError: for a keyword the layer does not take, listing the ones it does.
    """
    cls = load(name)
    accepted = accepted_keywords(cls)
    unknown = [k for k in kwargs if k not in accepted]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, accepted, n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise TypeError(f"{cls.__name__} ({entry(name).id}) takes no keyword "
                        f"{', '.join(hints)}; accepted: {', '.join(accepted)}")
    return cls(**kwargs)
