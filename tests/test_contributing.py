"""The Contributing page's walkthrough, executed step by step in a temporary copy of the repo:
`zoo new` scaffolds, `zoo check` flags the placeholders, the page's files fill them, and the new
entry passes the battery and the claims and gets its page on the built site."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "contributing.md"


def blocks(text: str) -> list[tuple[str, str | None, str]]:
    """(language, title, body) of every fenced block, in page order."""
    pattern = re.compile(r'```(\w+)(?: title="([^"]+)")?\n(.*?)```', re.S)
    return [(m.group(1), m.group(2), m.group(3)) for m in pattern.finditer(text)]


def copy_repo(dest: Path) -> Path:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split("\n")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


@pytest.mark.slow
def test_walkthrough_adds_a_working_entry(site, tmp_path):  # `site`: the shared cache is warm
    repo = copy_repo(tmp_path / "repo")
    env = {**os.environ, "PYTHONPATH": str(repo), "ZOO_CACHE": str(ROOT / ".cache"),
           "NO_MKDOCS_2_WARNING": "1"}

    def sh(command: str, expect: int = 0) -> str:
        args = command.split()
        if args[0] == "zoo":
            args = [sys.executable, "-m", "zoo", *args[1:]]
        elif args[0] == "python":
            args = [sys.executable, *args[1:]]
        args = [a.strip('"') for a in re.findall(r'"[^"]*"|\S+', " ".join(args))]
        proc = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True)
        assert proc.returncode == expect, f"{command}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc.stdout + proc.stderr

    steps = blocks(PAGE.read_text())
    assert [lang for lang, _, _ in steps] == ["bash", "yaml", "python", "python", "bash"]
    scaffold, record, entry_file, test_file, finish = steps

    new, first_check = scaffold[2].strip().splitlines()
    sh(new)
    flagged = sh(first_check, expect=1)  # before filling: every placeholder named with its line
    assert "catalog.yaml:" in flagged and "still holds the TODO placeholder" in flagged
    assert "sigmoid_attention.py:" in flagged and "placeholder left" in flagged

    catalog = repo / "catalog.yaml"
    text = catalog.read_text()
    catalog.write_text(text[: text.index("- id: sigmoid-attention")] + record[2])
    for _, title, body in (entry_file, test_file):
        (repo / title).write_text(body)

    for command in finish[2].strip().splitlines():
        out = sh(command)
    assert "passed" in out and "failed" not in out
    assert "ok   sigmoid-attention" in sh("zoo check sigmoid-attention")

    site = tmp_path / "site"
    sh(f"python -m mkdocs build --strict --site-dir {site}")
    page = (site / "entries" / "sigmoid-attention" / "index.html").read_text()
    assert "Sigmoid Self-Attention" in page
    assert '<span class="nf">sigmoid_attention</span>' in page  # the included source
