"""`python -m tests.build_site OUT STATUS`: `mkdocs build --strict` into OUT, then STATUS (JSON:
the return code and the end of stderr) written last, so a test waiting on the build knows it is
finished, in whatever process it runs (tests/conftest.py starts this once per test run)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build(out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
                           str(out)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})


def main(out: str, status: str) -> int:
    try:
        proc = build(Path(out))
        result = {"returncode": proc.returncode, "stderr": proc.stderr[-20_000:]}
    except Exception as err:  # noqa: BLE001 - reported to the waiting tests, not lost
        result = {"returncode": -1, "stderr": f"{type(err).__name__}: {err}"}
    tmp = Path(status + ".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(status)  # atomically: a reader never sees half a file
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
