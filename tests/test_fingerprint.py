"""The cache key of an entry's claims row and pictures covers every `zoo` file the entry imports,
directly or not, so a change to an imported module is never served from a stale cache."""

from pathlib import Path

import zoo
from zoo.catalog import fingerprint, zoo_imports


def write(root: Path, name: str, text: str) -> Path:
    path = root.joinpath(*name.split(".")).with_suffix(".py")
    path.parent.mkdir(parents=True, exist_ok=True)
    for folder in (path.parent, *path.parent.parents):
        if folder == root:
            break
        (folder / "__init__.py").touch()
    path.write_text(text)
    return path


def test_imports_are_followed_through_other_files(tmp_path):
    entry = write(tmp_path, "zoo.entries.a", "import torch\nfrom zoo.entries.b import f\n")
    b = write(tmp_path, "zoo.entries.b", "from zoo.core import maths\n")
    maths = write(tmp_path, "zoo.core.maths", "import zoo.core.deep\n")
    deep = write(tmp_path, "zoo.core.deep", "import os\n")
    write(tmp_path, "zoo.core.unused", "")
    assert zoo_imports(entry, root=tmp_path) == sorted([b, maths, deep])
    key = fingerprint("a", entry, *zoo_imports(entry, root=tmp_path))
    deep.write_text("import os\nX = 1\n")
    assert fingerprint("a", entry, *zoo_imports(entry, root=tmp_path)) != key


def test_changing_a_module_an_entry_imports_changes_its_key(monkeypatch):
    e = zoo.entry("performer")
    imported = [p for p in e.sources if p != e.source]
    assert any(p.parent.name == "core" and p.stem == "linear" for p in imported), imported
    key = fingerprint(e, *e.sources)
    original = Path.read_bytes
    for target in imported:
        def edited(self, target=target):
            return original(self) + (b"\n# edited\n" if self == target else b"")

        monkeypatch.setattr(Path, "read_bytes", edited)
        assert fingerprint(e, *e.sources) != key, target
    monkeypatch.setattr(Path, "read_bytes", original)
    assert fingerprint(e, *e.sources) == key
