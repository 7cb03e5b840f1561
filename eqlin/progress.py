"""Progress on stderr for long runs: named stages with elapsed time, and step bars (`tqdm.auto`: a widget in
a notebook, text elsewhere). One mechanism for the CLI and the library.

Whether progress is shown (`shown`): a function's `quiet` argument decides when given (the CLI gives it:
progress unless `-q`); left at None, the environment variable EQLIN_PROGRESS does (`1` on, `0` off), and
without it progress is shown only where someone watches: stderr a terminal, or a Jupyter notebook. Logs and
pipes stay clean."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Iterator

from tqdm.auto import tqdm

from eqlin.errors import InputError

ENV = "EQLIN_PROGRESS"


def _watched() -> bool:
    """stderr is a terminal, or this is a Jupyter kernel (whose stderr is a widget stream, not a tty)."""
    if getattr(sys.stderr, "isatty", None) is not None and sys.stderr.isatty():
        return True
    ipython = sys.modules.get("IPython")  # only if the host imported it: a notebook always has
    shell = ipython.get_ipython() if ipython is not None and hasattr(ipython, "get_ipython") else None
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def shown(quiet: bool | None) -> bool:
    """Whether to show progress: `not quiet` when given, else EQLIN_PROGRESS (1/0), else `_watched()`."""
    if quiet is not None:
        return not quiet
    setting = os.environ.get(ENV)
    if setting is None or setting == "":
        return _watched()
    if setting.strip() not in ("0", "1"):
        raise InputError(f"{ENV}={setting!r} must be 1 (show progress on stderr) or 0 (none); unset it to show "
                          "progress only on a terminal or in a notebook")
    return setting.strip() == "1"


@contextlib.contextmanager
def stage(name: str, quiet: bool | None = None) -> Iterator[None]:
    """Print `name …` before a stage and its duration after it, if progress is `shown(quiet)`."""
    show = shown(quiet)
    if show:
        print(f"eqlin: {name} …", file=sys.stderr, flush=True)
    start = time.perf_counter()
    yield
    if show:
        print(f"eqlin: {name}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)


def steps(name: str, total: int | None, quiet: bool | None = None, initial: int = 0) -> tqdm:
    """A step progress bar on stderr, if progress is `shown(quiet)`; use as a context manager and call
    `.update()` per step (`total` None: not known yet, set `.total` later). `initial` steps count as done already (the time left is estimated from the steps
    taken in this run)."""
    return tqdm(total=total, initial=initial, desc=f"eqlin: {name}", file=sys.stderr, disable=not shown(quiet),
                leave=True, bar_format="{desc}: {n}/{total_fmt} {bar} {elapsed}<{remaining}")
