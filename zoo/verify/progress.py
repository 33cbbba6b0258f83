"""Progress on long work (claims, benchmarks): a tqdm bar on a terminal, quiet elsewhere."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def progress_bar(total: int, desc: str) -> Iterator[Callable[[str], None]]:
    """Yields `step(label)`: advance the bar by one and show `label`. Writes to stderr."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit="entry", file=sys.stderr, leave=False,
               disable=not sys.stderr.isatty())
    def step(label: str) -> None:
        bar.set_postfix_str(label, refresh=False)
        bar.update(1)

    try:
        yield step
    finally:
        bar.close()
