"""ruff is clean on the package, the tests, the hook and hubconf (run by the README's test command)."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_clean():
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    paths = ["zoo", "tests", "hubconf.py", "docs/hooks", "benchmarks"]
    proc = subprocess.run([ruff, "check", *paths], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_mypy_clean_on_the_public_modules():
    """The root modules (public API, core, probes, CLI) type-check; entries are out of scope."""
    mypy = shutil.which("mypy") or str(Path(sys.executable).parent / "mypy")
    modules = sorted(str(p.relative_to(ROOT)) for pattern in ("*.py", "core/*.py", "verify/*.py", "site/*.py")
                     for p in (ROOT / "zoo").glob(pattern))
    proc = subprocess.run([mypy, "--ignore-missing-imports", "--no-error-summary",
                           "--cache-dir", "/dev/null", *modules], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
