"""Without the optional extra `hf`, zoo works and only `import zoo.hf` fails, naming the extra.

A subprocess stands in for an install without transformers (`sys.modules['transformers'] = None`
makes every import of it fail), so this runs whether or not transformers is installed.
"""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import importlib, pkgutil, sys
sys.modules["transformers"] = None
import torch
import zoo
layer = zoo.create("performer", dim=32, heads=2, causal=True)
assert layer(torch.randn(1, 5, 32)).shape == (1, 5, 32)
skip = ("zoo.hf", "zoo.__main__")  # the one module that needs transformers; the CLI entry point
others = [m.name for m in pkgutil.walk_packages(zoo.__path__, "zoo.") if m.name not in skip]
for name in others:
    importlib.import_module(name)
try:
    import zoo.hf
except ImportError as err:
    print("refused:", err)
else:
    raise SystemExit("zoo.hf imported without transformers")
print("imported", len(others))
"""


def test_zoo_works_without_transformers_and_zoo_hf_names_the_extra():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    refused = next(line for line in proc.stdout.splitlines() if line.startswith("refused:"))
    assert "pip install attention-zoo[hf]" in refused
    assert int(proc.stdout.split("imported")[-1]) > 60  # every other module, entries included
