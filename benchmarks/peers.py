"""Measure every comparison listed in zoo/site/peers.py and write benchmarks/peers.json.

The comparisons are `tests/peers/pairs.py` (the extra `peers`, and `hf` for transformers); the
site prints the sizes written here, and `tests/peers/test_peers.py` checks them against a fresh run.

    python benchmarks/peers.py --out benchmarks/peers.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from tests.peers import pairs  # noqa: E402
from zoo.site.peers import DIFFERENCES, PAIRS  # noqa: E402


def measure() -> dict:
    torch.set_num_threads(1)
    out: dict = {"torch": torch.__version__.split("+")[0],
                 "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "pairs": {}, "differences": {}}
    for p in PAIRS:
        out["pairs"][p.function] = pairs.rel(*getattr(pairs, p.function)())
    for d in DIFFERENCES:
        shipped, removed = getattr(pairs, d.function)()
        out["differences"][d.function] = {"shipped": shipped, "removed": removed}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "peers.json")
    args = parser.parse_args()
    args.out.write_text(json.dumps(measure(), indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
