"""The package builds as a wheel that carries catalog.yaml and works outside the repository."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_carries_the_catalogue_and_works_outside_the_repo(tmp_path):
    dist = tmp_path / "dist"
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist),
                           str(ROOT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = dist.glob("attention_zoo-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        assert "zoo/catalog.yaml" in names and "zoo/entries/performer.py" in names or \
            "zoo/entries/linear_transformer.py" in names
        assert not any(n.startswith(("tests/", "docs/")) for n in names)
        zf.extractall(tmp_path / "installed")
    script = (
        "import zoo, torch\n"
        f"assert zoo.__file__.startswith({str(tmp_path / 'installed')!r}), zoo.__file__\n"
        "from zoo.catalog import catalog_path\n"
        "assert catalog_path().parent.name == 'zoo', catalog_path()\n"
        "assert len(zoo.names()) >= 4\n"
        "layer = zoo.create('linear-transformer', dim=32, heads=2, causal=True)\n"
        "assert layer(torch.randn(1, 5, 32)).shape == (1, 5, 32)\n"
        "print('ok', len(zoo.names()))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                         text=True, env={"PYTHONPATH": str(tmp_path / "installed"),
                                         "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0 and out.stdout.startswith("ok"), out.stderr[-2000:]
