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

    # The licence travels with the wheel (PEP 639 puts it under .dist-info/licenses/).
    licences = [n for n in names if ".dist-info/" in n and n.endswith("/LICENSE")]
    assert licences, names
    with zipfile.ZipFile(wheel) as zf:
        assert "Copyright (c) 2026 the attention-zoo developers" in zf.read(licences[0]).decode()
        metadata = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: MIT" in metadata or "License: MIT" in metadata

    # Installed (not a checkout), `zoo claims` caches in the user's cache folder, never inside the
    # package: $XDG_CACHE_HOME/attention-zoo, else ~/.cache/attention-zoo.
    home, xdg = tmp_path / "home", tmp_path / "xdg"
    home.mkdir()
    env = {"PYTHONPATH": str(tmp_path / "installed"), "PATH": "/usr/bin:/bin", "HOME": str(home),
           "XDG_CACHE_HOME": str(xdg), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "zoo", "claims", "softmax-attention"], cwd=tmp_path,
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (xdg / "attention-zoo" / "claims" / "softmax-attention.json").is_file()
    assert not list((tmp_path / "installed").rglob("*.json")), "a cache was written into the package"
    env.pop("XDG_CACHE_HOME")
    where = subprocess.run([sys.executable, "-c", "from zoo.catalog import cache_root; print(cache_root())"],
                           cwd=tmp_path, capture_output=True, text=True, env=env).stdout.strip()
    assert where == str(home / ".cache" / "attention-zoo")


def test_checkout_caches_beside_the_catalogue(monkeypatch):
    from zoo.catalog import cache_root, running_from_checkout

    monkeypatch.delenv("ZOO_CACHE", raising=False)
    assert running_from_checkout()
    assert cache_root() == ROOT / ".cache"
    monkeypatch.setenv("ZOO_CACHE", "/somewhere/else")
    assert cache_root() == Path("/somewhere/else")


def test_user_cache_dir_follows_the_platform(monkeypatch, tmp_path):
    from zoo.catalog import user_cache_dir

    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert user_cache_dir() == tmp_path / "xdg" / "attention-zoo"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/path")  # invalid by the XDG spec: ignored
    assert user_cache_dir() == tmp_path / ".cache" / "attention-zoo"
    monkeypatch.setattr(sys, "platform", "darwin")
    assert user_cache_dir() == tmp_path / "Library" / "Caches" / "attention-zoo"


@pytest.mark.slow
def test_the_sdist_carries_the_licence(tmp_path):
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License") and "Copyright (c) 2026 the attention-zoo developers" in text
    # pip builds wheels only; the sdist comes from the build backend itself, installed aside.
    backend = tmp_path / "backend"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", str(backend),
                           "hatchling>=1.27"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = subprocess.run([sys.executable, "-c", "import sys; from hatchling.build import build_sdist; "
                           "print(build_sdist(sys.argv[1]))", str(tmp_path / "dist")], cwd=ROOT,
                          capture_output=True, text=True, env={"PYTHONPATH": str(backend),
                                                               "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    import tarfile

    with tarfile.open(tmp_path / "dist" / proc.stdout.strip().splitlines()[-1]) as tf:
        (member,) = [m for m in tf.getnames() if m.endswith("/LICENSE")]
        assert tf.extractfile(member).read().decode() == text
