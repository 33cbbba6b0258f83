"""ruff is clean on the package, the tests, the hook and hubconf (run by the README's test command)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_clean():
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    paths = ["zoo", "tests", "hubconf.py", "docs/hooks", "benchmarks"]
    proc = subprocess.run([ruff, "check", *paths], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.slow
def test_mypy_clean_on_the_public_modules():
    """The root modules (public API, core, probes, CLI) type-check; entries are out of scope."""
    mypy = shutil.which("mypy") or str(Path(sys.executable).parent / "mypy")
    modules = sorted(str(p.relative_to(ROOT)) for pattern in ("*.py", "core/*.py", "verify/*.py", "site/*.py")
                     for p in (ROOT / "zoo").glob(pattern))
    proc = subprocess.run([mypy, "--ignore-missing-imports", "--no-error-summary",
                           "--cache-dir", "/dev/null", *modules], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def entry_imports(source: str) -> list[str]:
    """The modules of `zoo.entries` a file imports (absolute or relative), from its syntax tree."""
    import ast

    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("zoo.entries")]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # inside zoo/entries, `from . import x` and `from .x import y`
                module = "zoo.entries" + ("." + module if module else "")
            if module == "zoo.entries":
                found += [f"zoo.entries.{a.name}" for a in node.names]
            elif module.startswith("zoo.entries."):
                found.append(module)
    return found


def test_no_entry_imports_another_entry():
    """Shared math lives in zoo/core; an entry file imports no other entry."""
    offenders = {p.name: entry_imports(p.read_text()) for p in sorted((ROOT / "zoo/entries").glob("*.py"))}
    assert not {k: v for k, v in offenders.items() if v}


def test_entry_import_check_catches_planted_imports():
    planted = ("import torch\nfrom zoo.core.masks import neg_fill\n"
               "from zoo.entries.performer import Performer\nimport zoo.entries.bigbird as bb\n"
               "from zoo.entries import smyrf\nfrom . import sac\nfrom .luna import luna_attention\n")
    assert entry_imports(planted) == ["zoo.entries.performer", "zoo.entries.bigbird", "zoo.entries.smyrf",
                                      "zoo.entries.sac", "zoo.entries.luna"]
    assert entry_imports("import zoo\nfrom zoo.core import features\n") == []


def long_files_without_a_reason(paths, limit: int = 250) -> list[str]:
    """Entry files over `limit` lines whose module docstring does not mention the limit (STYLE:
    past 250 lines, the docstring says why)."""
    import ast
    import re

    out = []
    for path in paths:
        text = path.read_text()
        reason = re.search(rf"{limit}\s+lines", ast.get_docstring(ast.parse(text)) or "")
        if len(text.splitlines()) > limit and not reason:
            out.append(path.name)
    return out


def test_entry_files_over_250_lines_say_why(tmp_path):
    assert not long_files_without_a_reason(sorted((ROOT / "zoo/entries").glob("*.py")))
    planted = tmp_path / "long.py"
    planted.write_text('"""A long file."""\n' + "x = 1\n" * 260)
    assert long_files_without_a_reason([planted]) == ["long.py"]
    planted.write_text('"""A long file: longer than 250\nlines because both forms live here."""\n'
                       + "x = 1\n" * 260)
    assert not long_files_without_a_reason([planted])
