"""The contributor's loop: with `mkdocs serve` already running, `zoo new x` makes `/entries/x/`
appear without a restart (the hook reads catalog.yaml again on every rebuild).

Runs on a copy of the tree in a temporary folder (the scaffold writes files), sharing the tree's
.cache/ so that only the new entry is measured."""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from tests.conftest import ROOT

pytestmark = [pytest.mark.docs]
NEW = "served-attention"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return 0


def _wait(url: str, want: int, proc, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"mkdocs serve exited with {proc.returncode}")
        if _status(url) == want:
            return True
        time.sleep(2)
    return False


@pytest.mark.slow
def test_new_entry_appears_while_serving(site, tmp_path):  # `site`: the shared cache is warm
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("catalog.yaml", "mkdocs.yml", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, repo / name)
    for name in ("zoo", "docs", "benchmarks"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "tests" / "entries").mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(repo), "ZOO_CACHE": str(ROOT / ".cache"),
           "NO_MKDOCS_2_WARNING": "1", "OMP_NUM_THREADS": "1"}
    port = _free_port()
    base = f"http://127.0.0.1:{port}/"
    proc = subprocess.Popen([sys.executable, "-m", "mkdocs", "serve", "--dev-addr",
                             f"127.0.0.1:{port}"], cwd=repo, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert _wait(base, 200, proc, 600), "mkdocs serve did not come up"
        assert _status(base + f"entries/{NEW}/") == 404
        subprocess.run([sys.executable, "-m", "zoo", "new", NEW, "--title", "Served Attention"],
                       cwd=repo, env=env, check=True, capture_output=True)
        assert _wait(base + f"entries/{NEW}/", 200, proc, 600), \
            f"/entries/{NEW}/ did not appear after zoo new"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
