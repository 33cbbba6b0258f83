import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import zoo

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One torch thread per worker: more threads than cores slows the small-op-heavy references
    # many times over (make test sets OMP_NUM_THREADS=1 for the same reason).
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def entry_params(predicate=lambda e: True):
    """pytest params over catalogue entries, with the id as the test id."""
    return [pytest.param(zoo.entry(i), id=i) for i in zoo.names() if predicate(zoo.entry(i))]


ROOT = Path(__file__).resolve().parents[1]


def build_site(out: Path) -> Path:
    """`mkdocs build --strict` into `out` (a temporary folder: nothing is written to the tree)."""
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
                           str(out)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="session")
def site(tmp_path_factory):
    return build_site(tmp_path_factory.mktemp("site"))
