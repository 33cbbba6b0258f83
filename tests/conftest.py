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


# The site is built once per test run, in a process of its own started as the session begins, and
# the tests that read it run last (pytest_collection_modifyitems), so the build overlaps the rest
# of the suite instead of holding a worker up. Under xdist every worker shares it: the first to
# start takes a lock and launches the build, and every test that needs the site waits for the
# build's status file. (xdist's --dist loadgroup cannot keep the site tests on one worker on
# pytest 9.2: it renames test ids through an attribute pytest no longer reads.)
SITE_WAIT_S = 1800
_builder: list[subprocess.Popen] = []


def _uses_site(item) -> bool:
    return "site" in getattr(item, "fixturenames", ())


def pytest_collection_modifyitems(config, items):
    """The tests that read the site after all others; within each part, those marked `slow`
    first, so that the two workers end together instead of one waiting on the other's last long
    test. (The sort is stable: the order within each group is kept.)"""
    items.sort(key=lambda item: (_uses_site(item), item.get_closest_marker("slow") is None))


def _shared(tmp_path_factory, worker_id) -> Path:
    root = tmp_path_factory.getbasetemp()
    return root if worker_id == "master" else root.parent  # the folder this run's workers share


@pytest.fixture(scope="session", autouse=True)
def _site_build_started(request, tmp_path_factory, worker_id):
    """Launch the shared site build at the start of the session if any test will read it."""
    if any(_uses_site(item) for item in request.session.items):
        from filelock import FileLock

        root = _shared(tmp_path_factory, worker_id)
        with FileLock(str(root / "site.lock")):
            started = root / "site.started"
            if not started.is_file():
                proc = subprocess.Popen([sys.executable, "-m", "tests.build_site",
                                         str(root / "site"), str(root / "site.status")], cwd=ROOT,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                _builder.append(proc)
                started.write_text(str(proc.pid))
    yield
    for proc in _builder:  # the session ends before the build does only when no test read it
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, finished but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    status = Path(f"/proc/{pid}/status")
    return not status.is_file() or "zombie" not in status.read_text()


@pytest.fixture(scope="session")
def site(tmp_path_factory, worker_id, _site_build_started):
    """The built site (a temporary folder), once the shared build has finished."""
    import json
    import time

    root = _shared(tmp_path_factory, worker_id)
    status, started = root / "site.status", root / "site.started"
    end = time.monotonic() + SITE_WAIT_S
    while not status.is_file():
        for proc in _builder:
            proc.poll()  # reap our own builder, so that a crashed one reads as dead
        if started.is_file() and not _alive(int(started.read_text())) and not status.is_file():
            pytest.fail("the site build stopped without reporting (killed?)")
        if time.monotonic() > end:
            pytest.fail(f"the site build took more than {SITE_WAIT_S} s")
        time.sleep(0.5)
    result = json.loads(status.read_text())
    if result["returncode"] != 0:
        pytest.fail(f"mkdocs build failed ({result['returncode']}):\n{result['stderr']}")
    return root / "site"
