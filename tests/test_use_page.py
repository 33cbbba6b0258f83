"""The "Use it in your model" page (docs/use.md): its python blocks run, top to bottom, in one
namespace, as a reader would paste them."""

import re
from pathlib import Path

import pytest

PAGE = Path(__file__).resolve().parents[1] / "docs" / "use.md"
HF_ROUTE = "## Route 3: zoo.hf"


def blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_the_page_has_the_three_routes():
    text = PAGE.read_text()
    for heading in ("## Route 1: a layer by name", "## Route 2: zoo.models", HF_ROUTE):
        assert heading in text
    before, after = text.split(HF_ROUTE)
    assert len(blocks(before)) >= 3 and len(blocks(after)) >= 4


def test_the_layer_examples_run():
    namespace: dict = {}
    for code in blocks(PAGE.read_text().split(HF_ROUTE)[0]):
        exec(compile(code, str(PAGE), "exec"), namespace)


def test_every_example_runs():
    pytest.importorskip("transformers", reason="the zoo.hf examples need the optional extra hf")
    namespace: dict = {}
    for code in blocks(PAGE.read_text()):
        exec(compile(code, str(PAGE), "exec"), namespace)
