"""The catalogue: `catalog.yaml` loaded, validated and turned into frozen `Entry` cards.

Loading uses `yaml.SafeLoader` (safe_load semantics) with one addition: every mapping remembers
the line of each key, so every error names the file, the line and the key. PyYAML silently keeps
the last of two equal keys; this loader refuses them.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import os
import re
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

import yaml

FAMILIES = (
    "exact", "fixed-pattern", "combined-pattern", "learnable-pattern", "low-rank", "kernel",
    "memory", "recurrence", "downsampling", "gating", "decay", "kv-sharing",
)
# Where an entry comes from: the awesome-fast-attention table (48 papers, to March 2021), its
# inbox, the exact baselines, or the mechanisms that came after the list stopped.
PROVENANCES = ("awesome-fast-attention", "awesome-fast-attention-inbox", "baseline", "since-2021")
INPUTS = ("sequence", "image")
# The PyTorch features `zoo.verify.compat` checks; an entry's `unsupported` names those it cannot
# support and why (the compatibility tests hold it to that list).
COMPAT_FEATURES = ("train-backward", "compile", "export", "meta", "autocast-bf16", "functional-call",
                   "vmap", "jit-trace", "state-dict", "ddp")
# \Z, not $: `$` also matches before a trailing newline, which would let "x\n" through.
ID_PATTERN = re.compile(r"\A[a-z0-9]+(-[a-z0-9]+)*\Z")
ID_MAX_LENGTH = 64  # ids become file names (test_<id>.py) and page paths
PLACEHOLDER = "TODO"

PACKAGE = Path(__file__).parent
ENTRIES_DIR = PACKAGE / "entries"


class CatalogError(ValueError):
    """A problem in `catalog.yaml`, with the file and line where it is."""

    def __init__(self, path: Path | str, line: int | None, message: str):
        self.path, self.line, self.message = str(path), line, message
        where = f"{path}:{line}" if line else str(path)
        super().__init__(f"{where}: {message}")


def catalog_path() -> Path:
    """`catalog.yaml` at the repository root, or the copy inside an installed wheel."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "catalog.yaml", here / "catalog.yaml"):
        if candidate.is_file():
            return candidate
    raise CatalogError(here / "catalog.yaml", None, f"catalog.yaml not found (looked in {here.parent} "
                       f"and {here})")


def running_from_checkout() -> bool:
    """True in a clone of the repository (catalog.yaml beside the package), False when installed
    from a wheel (catalog.yaml inside the package)."""
    return catalog_path().parent != Path(__file__).resolve().parent


def user_cache_dir() -> Path:
    """The platform's per-user cache folder for the zoo: `$XDG_CACHE_HOME/attention-zoo` (else
    `~/.cache/attention-zoo`) on Linux and other Unixes, `~/Library/Caches/attention-zoo` on macOS,
    `%LOCALAPPDATA%\\attention-zoo\\Cache` on Windows."""
    import sys

    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or str(Path.home() / "AppData" / "Local")
        return Path(base) / "attention-zoo" / "Cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "attention-zoo"
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    # The XDG spec: a relative $XDG_CACHE_HOME is invalid and must be ignored.
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return base / "attention-zoo"


def cache_root() -> Path:
    """Where measurements and pictures are cached: $ZOO_CACHE; else, in a checkout, `.cache/`
    beside the catalogue; else (installed from a wheel) the user's cache folder, never the
    installed package. Entries are keyed by a fingerprint of their content, so a cache may be
    shared between copies."""
    if os.environ.get("ZOO_CACHE"):
        return Path(os.environ["ZOO_CACHE"])
    return catalog_path().parent / ".cache" if running_from_checkout() else user_cache_dir()


def module_file(name: str, root: Path | None = None) -> Path | None:
    """The file of module `name` (`zoo.core.masks`) under `root` (the folder holding the `zoo`
    package), or None when it is not a module of that tree."""
    root = root or PACKAGE.parent
    base = root.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _in_zoo(name: str) -> bool:
    return name == "zoo" or name.startswith("zoo.")


def zoo_imports(path: Path, root: Path | None = None) -> list[Path]:
    """Every file of the `zoo` package that `path` imports, directly or through the files it
    imports (read from the import statements, nothing is executed), sorted; `path` excluded."""
    root = root or PACKAGE.parent
    seen: set[Path] = set()
    todo = [path]
    while todo:
        for file in _direct_imports(todo.pop(), root):
            if file != path and file not in seen:
                seen.add(file)
                todo.append(file)
    return sorted(seen)


def _direct_imports(path: Path, root: Path) -> tuple[Path, ...]:
    """The `zoo` files `path`'s own import statements name; parsed once per version of the file
    (a site build asks for the same files hundreds of times)."""
    stat = path.stat()
    return _parsed_imports(path, root, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4096)
def _parsed_imports(path: Path, root: Path, _mtime_ns: int, _size: int) -> tuple[Path, ...]:
    found: list[Path] = []
    for node in ast.walk(ast.parse(path.read_text())):
        files: list[Path | None] = []
        if isinstance(node, ast.Import):
            files = [module_file(a.name, root) for a in node.names if _in_zoo(a.name)]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            if _in_zoo(node.module):
                # `from zoo.core import masks` imports a module, `from zoo.core.masks import f`
                # a name of one
                files = [module_file(f"{node.module}.{a.name}", root)
                         or module_file(node.module, root) for a in node.names]
        found += [f for f in files if f is not None and f not in found]
    return tuple(found)


def fingerprint(*parts: object) -> str:
    """A cache key that changes whenever the package outside `entries/` (zoo/*.py and its
    core, verify and site folders), torch or any of `parts` changes.
    Paths count by their content, other parts by their repr."""
    h = hashlib.sha256(torch_version().encode())
    root = Path(__file__).parent
    for path in sorted([*root.glob("*.py"), *root.glob("core/*.py"), *root.glob("verify/*.py"),
                        *root.glob("site/*.py")]):
        h.update(path.read_bytes())
    for p in parts:
        h.update(p.read_bytes() if isinstance(p, Path) else repr(p).encode())
    return h.hexdigest()[:20]


def torch_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch")
    except PackageNotFoundError:
        return "unknown"


@dataclasses.dataclass(frozen=True)
class Entry:
    """One catalogue card. Attribute names are the YAML keys."""

    id: str
    title: str
    authors: tuple[str, ...]
    year: int
    venue: str
    arxiv: str | None
    paper: str
    code: str | None
    family: str
    idea: str
    formula: str
    complexity: Mapping[str, str]
    scaling: Mapping[str, Any]
    autoregressive: bool
    masking: bool
    input: str
    kernel: bool
    hparams: Mapping[str, Any]
    citations: Mapping[str, Any] | None
    notes: str
    exact_when: Mapping[str, Any] | None = None
    budget: Mapping[str, Any] | None = None
    pointwise: bool = False
    provenance: str = "awesome-fast-attention"
    decoding: Mapping[str, Any] | None = None
    name: str | None = None
    aliases: tuple[str, ...] = ()
    unsupported: Mapping[str, str] | None = None
    line: int = dataclasses.field(default=0, compare=False)
    key_lines: Mapping[str, int] = dataclasses.field(default_factory=dict, compare=False,
                                                     repr=False)

    @property
    def display_name(self) -> str:
        """The mechanism's name ("Performer"): `name`, else the title's part before a colon when
        that is short ("Linformer: Self-Attention ..." -> "Linformer"), else the id in words."""
        if self.name:
            return self.name
        head, sep, _ = self.title.partition(":")
        if sep and len(head.split()) <= 3:
            return head.strip()
        words = self.id.replace("-", " ")
        return words[:1].upper() + words[1:]

    @property
    def module(self) -> str:
        """Import path of the entry's file: `zoo.entries.<id with underscores>`."""
        return f"zoo.entries.{self.id.replace('-', '_')}"

    @property
    def source(self) -> Path:
        return ENTRIES_DIR / f"{self.id.replace('-', '_')}.py"

    @property
    def sources(self) -> tuple[Path, ...]:
        """The entry's file and every `zoo` file it imports, transitively: what a cache key of
        its measurements or pictures must cover."""
        return (self.source, *zoo_imports(self.source))


# --- schema -------------------------------------------------------------------------------

def _str(v):
    return isinstance(v, str) and v.strip() != ""


def _opt_str(v):
    return v is None or _str(v)


def _bool(v):
    return isinstance(v, bool)


def _number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _dict(v):
    return isinstance(v, dict)


# key: (check, what the check wants, required)
SCHEMA: dict[str, tuple[Any, str, bool]] = {
    "id": (lambda v: isinstance(v, str) and bool(ID_PATTERN.match(v)) and len(v) <= ID_MAX_LENGTH,
           f"a kebab-case string of at most {ID_MAX_LENGTH} characters", True),
    "title": (_str, "a non-empty string", True),
    "authors": (lambda v: isinstance(v, list) and v and all(map(_str, v)),
                "a non-empty list of names", True),
    "year": (lambda v: isinstance(v, int) and not isinstance(v, bool) and 1990 <= v <= 2100,
             "a year (int)", True),
    "venue": (_str, "a non-empty string", True),
    "arxiv": (lambda v: v is None or (isinstance(v, str) and re.match(r"^\d{4}\.\d{4,5}$", v)),
              'a quoted arXiv id like "1812.01243", or null', True),
    "paper": (lambda v: isinstance(v, str) and v.startswith("http"), "a URL", True),
    "code": (lambda v: v is None or (isinstance(v, str) and v.startswith("http")),
             "a URL or null", True),
    "family": (lambda v: v in FAMILIES, "one of " + ", ".join(FAMILIES), True),
    "idea": (_str, "a non-empty string", True),
    "formula": (_str, "a LaTeX string", True),
    "complexity": (lambda v: _dict(v) and set(v) == {"time", "memory"} and all(map(_str, v.values())),
                   "a mapping with exactly time and memory, each a LaTeX string", True),
    "scaling": (lambda v: _dict(v) and {"time", "memory"} <= set(v) <= {"time", "memory", "ns", "why"}
                and _number(v["time"]) and _number(v["memory"])
                and (("ns" not in v and "why" not in v) or (
                    isinstance(v.get("ns"), list) and len(v["ns"]) >= 2
                    and all(isinstance(n, int) and n > 0 for n in v["ns"]) and _str(v.get("why")))),
                "a mapping with time and memory, each a number (exponent of n), and optionally "
                "ns (the lengths to measure at) with why (the reason for that range)", True),
    "autoregressive": (_bool, "true or false", True),
    "masking": (_bool, "true or false", True),
    "input": (lambda v: v in INPUTS, "one of " + ", ".join(INPUTS), True),
    "kernel": (_bool, "true or false", True),
    "hparams": (_dict, "a mapping (may be empty: {})", True),
    "citations": (lambda v: v is None or (_dict(v) and set(v) == {"count", "as_of"}
                                          and isinstance(v["count"], int) and _str(str(v["as_of"]))),
                  "a mapping {count: int, as_of: date} or null", True),
    "notes": (lambda v: isinstance(v, str), "a string (may be empty)", True),
    "exact_when": (lambda v: v is None or _dict(v), "a mapping of hyper-parameters, or null", False),
    "pointwise": (_bool, "true or false (true: each position is processed on its own, no token "
                  "mixing)", False),
    "budget": (lambda v: v is None or (_dict(v) and set(v) == {"param", "values"} and _str(v["param"])
                                       and isinstance(v["values"], list) and len(v["values"]) >= 3
                                       and all(_number(x) for x in v["values"])),
               "a mapping {param: name, values: [at least three numbers]}", False),
    "provenance": (lambda v: v in PROVENANCES, "one of " + ", ".join(PROVENANCES) +
                   " (default awesome-fast-attention)", False),
    "name": (_str, 'the mechanism\'s name, as people say it ("Performer"); default: the title\'s '
             "part before a colon, else the id in words", False),
    "aliases": (lambda v: isinstance(v, list) and all(map(_str, v)),
                "a list of other names search should find it by (FAVOR+, LSH)", False),
    "decoding": (lambda v: v is None or (_dict(v) and {"state", "step"} <= set(v)
                                         <= {"state", "step", "exact", "contexts", "why"}
                                         and _number(v["state"]) and _number(v["step"])
                                         and isinstance(v.get("exact", True), bool)
                                         and (all(isinstance(n, int) and n > 1 for n in v["contexts"])
                                              and len(v["contexts"]) >= 2 and _str(v.get("why"))
                                              if "contexts" in v else True)),
                 "a mapping {state: p, step: q}: the exponent of the context length in the size of "
                 "the decoding state and in the FLOPs of one decoding step; optionally why, "
                 "contexts (the lengths to measure at, with why), and exact: false where an output "
                 "depends on the sequence's total length, so that step can only equal forward on "
                 "the prefix seen so far", False),
    "unsupported": (lambda v: _dict(v) and bool(v) and set(v) <= set(COMPAT_FEATURES)
                    and all(map(_str, v.values())),
                    "a mapping {feature: why} of PyTorch features the entry cannot support, the "
                    "features among " + ", ".join(COMPAT_FEATURES), False),
}


# --- loading ------------------------------------------------------------------------------

class _Located(dict):
    """A mapping that remembers its own line and the line of each key (1-based)."""

    line: int = 0
    key_lines: dict


class _Loader(yaml.SafeLoader):
    path = "catalog.yaml"


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> _Located:
    loader.flatten_mapping(node)
    lines: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        try:
            hash(key)
        except TypeError:
            kind = "list" if isinstance(key, list) else "mapping" if isinstance(key, dict) else \
                type(key).__name__
            raise CatalogError(loader.path, line, f"a {kind} used as a key "
                               "(keys must be plain names)") from None
        if key in lines:
            raise CatalogError(loader.path, line,
                               f"duplicate key {key!r} (first given at line {lines[key]})")
        lines[key] = line
    out = _Located(loader.construct_mapping(node, deep=True))
    out.line, out.key_lines = node.start_mark.line + 1, lines
    return out


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def parse(text: str, path: Path | str = "catalog.yaml") -> list[_Located]:
    """YAML text -> list of raw records (safe_load semantics, duplicate keys refused)."""
    loader = None
    try:
        loader = _Loader(text)  # the reader refuses forbidden characters here already
        loader.path = str(path)
        data = loader.get_single_data()
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line = mark.line + 1 if mark else None
        hint = " (YAML forbids tabs for indentation: use spaces)" if "\t" in text and \
            "found character '\\t'" in str(err) else ""
        raise CatalogError(path, line, f"not valid YAML: {err.problem or err}{hint}") from None
    except yaml.reader.ReaderError as err:  # a character YAML forbids (NUL, other controls)
        line = text.count("\n", 0, err.position) + 1
        what = "a NUL byte" if err.character == 0 else f"character U+{err.character:04X}"
        raise CatalogError(path, line, f"not valid YAML: {what} (control characters are not "
                           "allowed in YAML text)") from None
    except yaml.YAMLError as err:
        raise CatalogError(path, None, f"not valid YAML: {' '.join(str(err).split())}") from None
    except RecursionError:
        raise CatalogError(path, _deepest_line(text), "nested too deeply (a catalogue is a list "
                           "of mappings of scalars, lists and small mappings)") from None
    finally:
        if loader is not None:
            loader.dispose()
    if data is None:
        return []
    if not isinstance(data, list):
        raise CatalogError(path, 1, "the catalogue must be a YAML list of entries (- id: ...)")
    for i, rec in enumerate(data):
        if not isinstance(rec, _Located):
            raise CatalogError(path, None, f"item {i + 1} is not a mapping of keys")
    return data


def _deepest_line(text: str) -> int | None:
    """The line where flow brackets first nest past 100 levels (for the too-deep error), if any."""
    depth = 0
    for i, ch in enumerate(text):
        depth += (ch in "[{") - (ch in "]}")
        if depth > 100:
            return text.count("\n", 0, i) + 1
    return None


def read_text(path: Path) -> str:
    """The file's text as UTF-8, or a one-line CatalogError: missing, a folder, unreadable or
    not UTF-8 (with the line of the first bad byte)."""
    if path.is_dir():
        raise CatalogError(path, None, "is a directory; expected the catalogue file (catalog.yaml)")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CatalogError(path, None, "no such file; expected the catalogue (catalog.yaml)") from None
    except OSError as err:
        raise CatalogError(path, None, f"cannot be read: {err.strerror or err}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        col = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise CatalogError(path, line, f"not UTF-8 text: byte 0x{data[err.start]:02x} at column "
                           f"{col} (save the file as UTF-8)") from None


def validate_record(rec: _Located, path: Path | str) -> Entry:
    """Check one raw record against SCHEMA; return its Entry."""
    name = rec.get("id", f"the entry at line {rec.line}")
    for key in rec:
        if key not in SCHEMA:
            raise CatalogError(path, rec.key_lines[key],
                               f"{name}: unknown key {key!r}; known keys: {', '.join(SCHEMA)}")
    for key, (ok, wanted, required) in SCHEMA.items():
        if key not in rec:
            if required:
                raise CatalogError(path, rec.line, f"{name}: missing key {key!r} ({wanted})")
            continue
        if not ok(rec[key]):
            raise CatalogError(path, rec.key_lines[key],
                               f"{name}: key {key!r} must be {wanted}; got {rec[key]!r}")
    fields: dict[str, Any] = {k: rec[k] for k in SCHEMA if k in rec}
    fields["authors"] = tuple(rec["authors"])
    if "aliases" in fields:
        fields["aliases"] = tuple(fields["aliases"])
    if fields["citations"] is not None:
        fields["citations"] = {"count": rec["citations"]["count"],
                               "as_of": str(rec["citations"]["as_of"])}
    return Entry(**fields, line=rec.line, key_lines=dict(rec.key_lines))


def load_catalog(path: Path | str | None = None, *, entries_dir: Path | None = None) -> dict[str, Entry]:
    """Read, validate and cross-check the catalogue against the entry files.

    Raises:
        CatalogError: naming the file, line and key of the first problem found.
    """
    path = Path(path) if path is not None else catalog_path()
    entries_dir = ENTRIES_DIR if entries_dir is None else entries_dir
    out: dict[str, Entry] = {}
    for rec in parse(read_text(path), path):
        entry = validate_record(rec, path)
        if entry.id in out:
            raise CatalogError(path, rec.key_lines["id"],
                               f"duplicate id {entry.id!r} (first at line {out[entry.id].line})")
        out[entry.id] = entry
    if entries_dir.is_dir():
        files = {p.stem for p in entries_dir.glob("*.py") if p.stem != "__init__"}
        ids = {e.id.replace("-", "_"): e for e in out.values()}
        for stem, e in ids.items():
            if stem not in files:
                raise CatalogError(path, e.line, f"{e.id}: no entry file {entries_dir / (stem + '.py')}"
                                   " (run `zoo new` to write one from the template)")
        for stem in sorted(files - set(ids)):
            raise CatalogError(path, None, f"{entries_dir / (stem + '.py')} has no catalogue entry"
                               f" (add one with id: {stem.replace('_', '-')})")
    return out


@cache
def _default() -> dict[str, Entry]:
    return load_catalog()


def catalog() -> dict[str, Entry]:
    """The package's catalogue, loaded once."""
    return _default()
