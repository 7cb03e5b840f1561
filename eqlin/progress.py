"""Progress on stderr for long runs: named stages with elapsed time, and step bars (`tqdm.auto`: a widget in
a notebook, text elsewhere)."""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Iterator

from tqdm.auto import tqdm


@contextlib.contextmanager
def stage(name: str, quiet: bool = False) -> Iterator[None]:
    """Print `name …` before a stage and its duration after it (nothing when quiet)."""
    if not quiet:
        print(f"eqlin: {name} …", file=sys.stderr, flush=True)
    start = time.perf_counter()
    yield
    if not quiet:
        print(f"eqlin: {name}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)


def steps(name: str, total: int, quiet: bool = False, initial: int = 0) -> tqdm:
    """A step progress bar on stderr; use as a context manager and call `.update()` per step. `initial`
    steps count as done already (the time left is estimated from the steps taken in this run)."""
    return tqdm(total=total, initial=initial, desc=f"eqlin: {name}", file=sys.stderr, disable=quiet, leave=True,
                bar_format="{desc}: {n}/{total} {bar} {elapsed}<{remaining}")
