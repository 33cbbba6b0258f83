"""Progress on long work (claims, benchmarks): a tqdm bar on a terminal; elsewhere (a log file,
CI) one line per finished step, with the count and the time so far."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def progress_bar(total: int, desc: str) -> Iterator[Callable[[str], None]]:
    """Yields `step(label)`: advance the bar by one and show `label`. Writes to stderr."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit="entry", file=sys.stderr, leave=False,
               disable=not sys.stderr.isatty())
    start, done = time.perf_counter(), [0]

    def step(label: str) -> None:
        bar.set_postfix_str(label, refresh=False)
        bar.update(1)
        done[0] += 1
        if bar.disable:
            print(f"{desc}: {done[0]}/{total} done ({label}), {time.perf_counter() - start:.0f} s",
                  file=sys.stderr, flush=True)

    try:
        yield step
    finally:
        bar.close()
