"""`zoo new`: the catalogue stub, entry file and test file of a new entry, from templates.

Every placeholder says TODO, and `zoo check` lists each one left (file and line) until it is
filled. The entry is picked up at once by the contract battery, the claim tests and the site.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
from pathlib import Path

from zoo.catalog import FAMILIES, ID_MAX_LENGTH, ID_PATTERN, PLACEHOLDER

ENTRY_TEMPLATE = '''r"""{title}

{todo}: one paragraph, the idea in your own words.

$$ O = {todo}(Q, K, V) $$

Deviations from the paper: {todo} (bullets, or "none").
"""

import torch

from zoo.core.checks import check_qkv
from zoo.core.shell import MultiHead


def {func}(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
{pad}mask: torch.Tensor | None = None, *, causal: bool = False) -> torch.Tensor:
    r"""{title_short}.

    Args:
        q, k: `(b, h, n, d)`. v: `(b, h, n, e)`. mask: `(b, n)`, True = real token.
        causal: position `i` sees only positions `j <= i`.

    Returns:
        `(b, h, n, e)`.
    """
    check_qkv(q, k, v, mask, name="{func}")
    raise NotImplementedError("{todo}: write the mechanism of {id} here")


class {cls}(MultiHead):
    """Multi-head {id}. `(b, n, dim) -> (b, n, dim)`."""

    def __init__(self, dim: int, *, heads: int = 8, dim_head: int | None = None,
                 causal: bool = False):
        super().__init__(dim, heads=heads, dim_head=dim_head, causal=causal)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        return {func}(q, k, v, mask, causal=self.causal)
'''

TEST_TEMPLATE = '''"""{id}: the paper's own checks. The contract battery and the claim tests already cover the
layer; here goes what is special to this paper, each against an independent oracle (see
tests/entries/ for examples)."""

import pytest


def test_{func}_equals_an_independent_oracle():
    pytest.fail("{todo}: compare {func} with an oracle written in this test (float64)")
'''

CATALOG_TEMPLATE = '''
- id: {id}
  title: {title_yaml}
  authors: [{todo}]
  year: {year}
  venue: {todo}
  arxiv: {arxiv}
  paper: {paper}
  code: null
  family: {family}
  idea: {todo} one to three sentences, in your own words.
  formula: {todo}
  complexity:
    time: '{todo}'
    memory: '{todo}'
  scaling: {{time: 2, memory: 2}}
  autoregressive: false
  masking: true
  input: sequence
  kernel: true
  hparams: {{heads: 2}}
  citations: null
  notes: "{todo}: where the reference deviates from the paper, or none."
'''


def class_name(entry_id: str) -> str:
    return "".join(part.capitalize() for part in entry_id.split("-"))


def new_entry(root: Path, entry_id: str, *, title: str, arxiv: str | None = None,
              family: str = "kernel") -> list[Path]:
    """Write the stub, the entry file and the test file; return the paths written or changed.

    Raises:
        ValueError: for a malformed id, arXiv id or family, or an id that exists already.
    """
    if not ID_PATTERN.match(entry_id):
        raise ValueError(f"the id must be kebab-case (lower-case letters and digits, words joined "
                         f"by '-', nothing else: no spaces or newlines), got {entry_id!r}")
    if len(entry_id) > ID_MAX_LENGTH:
        raise ValueError(f"the id must be at most {ID_MAX_LENGTH} characters, got {len(entry_id)} "
                         f"({entry_id[:20]}...)")
    if arxiv is not None and not re.match(r"^\d{4}\.\d{4,5}$", arxiv):
        raise ValueError(f"--arxiv must look like 1812.01243, got {arxiv!r}")
    if family not in FAMILIES:
        raise ValueError(f"--family must be one of {', '.join(FAMILIES)}; got {family!r}")
    bad = [c for c in title if not c.isprintable()]
    if not title.strip() or bad or '"""' in title:
        raise ValueError(f"--title must be the paper's title on one line: printable characters, "
                         f"no triple quotes; got {title!r}")
    stem = entry_id.replace("-", "_")
    source = root / "zoo" / "entries" / f"{stem}.py"
    test = root / "tests" / "entries" / f"test_{stem}.py"
    catalog = root / "catalog.yaml"
    text = catalog.read_text(encoding="utf-8")
    if re.search(rf"^- id: {re.escape(entry_id)}\s*$", text, flags=re.M) or source.exists():
        raise ValueError(f"{entry_id!r} exists already (in catalog.yaml or as {source})")
    func = f"{stem}_attention" if not stem.endswith("attention") else stem
    # JSON's string syntax is YAML's double-quoted scalar: quotes and backslashes come out escaped.
    fields = dict(id=entry_id, title=title.strip(), title_yaml=json.dumps(title.strip(),
                                                                          ensure_ascii=False),
                  todo=PLACEHOLDER, func=func,
                  cls=class_name(entry_id), pad=" " * (len(func) + 5),
                  title_short=title.strip().split(":")[0], family=family,
                  year=_dt.date.today().year,
                  arxiv=f'"{arxiv}"' if arxiv else "null",
                  paper=f"https://arxiv.org/abs/{arxiv}" if arxiv else f"https://{PLACEHOLDER}")
    source.write_text(ENTRY_TEMPLATE.format(**fields), encoding="utf-8")
    test.parent.mkdir(parents=True, exist_ok=True)
    test.write_text(TEST_TEMPLATE.format(**fields), encoding="utf-8")
    catalog.write_text(text.rstrip("\n") + "\n" + CATALOG_TEMPLATE.format(**fields), encoding="utf-8")
    return [catalog, source, test]


def suggested_test_command(entry_id: str) -> str:
    """The pytest command that selects the entry's own tests (tests/entries/test_<stem>.py, whose
    names use underscores) and the catalogue-wide tests parametrised by its id (with hyphens).
    One `-k` with `or`: several `-k` options do not add up (the last one wins)."""
    stem = entry_id.replace("-", "_")
    expr = stem if stem == entry_id else f"{stem} or {entry_id}"
    return f'pytest -k "{expr}"'


def placeholders(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every line of `path` that still holds the placeholder."""
    if not path.is_file():
        return []
    return [(i, line.strip()) for i, line in enumerate(path.read_text().splitlines(), 1)
            if PLACEHOLDER in line]
