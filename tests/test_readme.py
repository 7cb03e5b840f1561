"""README.md's examples come from runs: its library snippet and the output of `eqlin analyze` shown under
"What `eqlin analyze` prints" are run on the embedded Gemma 3 270M, and every printed line is compared with
the README at the precision it prints.

Printed numbers must match digit for digit, with one exception: a number the README shows in e-notation at
or below 1e-13 is a reconstruction error at rounding level, whose digits change with the machine's matrix
kernels and the memory limit's chunking; the run's value then only has to be at or below 1e-13 as well (the
bound every float64 test holds). In the snippet, each `print` line's comment is its output; an explanation
may follow after " — ".

Slow (the layer story of 18 layers, twice: several minutes on 2 CPU cores), so it runs only with
`pytest --run-slow` (README.md's test command, which .ci/run runs); a plain `pytest` reports it as skipped.
The runs pin EQLIN_MEMORY_LIMIT_GB (unless set) so that a busy machine does not kill them for memory.
"""

from __future__ import annotations

import difflib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from eqlin import userdirs

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")
ROUNDING = 1e-13
EXPLANATION = " — "


def fenced_block(heading: str, language: str = "", text: str = README) -> str:
    """The first ```language block after the line `heading` in `text` (default README.md)."""
    after = text[text.index(heading):]
    match = re.search(rf"^```{language}\n(.*?)^```", after, re.M | re.S)
    assert match, f"no ```{language} block after {heading!r}"
    return match.group(1)


def same(printed: str, shown: str) -> bool:
    """Whether a printed line is the README's, number by number at the printed precision (rounding-level
    e-notation values: both at or below 1e-13)."""
    if NUMBER.split(printed) != NUMBER.split(shown):
        return False
    ours, theirs = NUMBER.findall(printed), NUMBER.findall(shown)
    return len(ours) == len(theirs) and all(
        a == b or ("e" in b.lower() and abs(float(b)) <= ROUNDING and abs(float(a)) <= ROUNDING)
        for a, b in zip(ours, theirs))


def differences(printed: list[str], shown: list[str]) -> list[str]:
    """The lines that differ (a unified diff where lines were added or dropped)."""
    if len(printed) != len(shown):
        return [f"{len(printed)} lines printed, the README shows {len(shown)}:",
                *difflib.unified_diff(shown, printed, "README.md", "run", lineterm="")]
    return [f"line {i}: README {b!r}\n        run    {a!r}" for i, (a, b) in enumerate(zip(printed, shown))
            if not same(a, b)]


def run(args: list[str], cwd: Path) -> str:
    """stdout of `python args` in a fresh process importing this checkout, without the tests' XLA flags."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split() if "optimization_level" not in f)
    env.setdefault("EQLIN_MEMORY_LIMIT_GB", "6")
    done = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def as_the_readme_writes_paths(text: str) -> str:
    """The eqlin cache and the home folder written as the README writes them."""
    return text.replace(str(userdirs.cache_dir()), "~/.cache/eqlin").replace(str(Path.home()), "~")


def test_the_library_snippet_prints_what_its_comments_say(tmp_path):
    code = fenced_block("## The library", "python")
    prints = [line for line in code.splitlines() if line.startswith("print(")]
    shown = [line.split("# ", 1)[1].split(EXPLANATION)[0].rstrip() for line in prints]
    assert len(shown) >= 6 and all(shown)
    printed = run(["-c", code], tmp_path).splitlines()
    problems = differences(printed, shown)
    assert not problems, "README.md's library snippet printed otherwise; printed:\n" + "\n".join(
        printed) + "\n\n" + "\n".join(problems)


def test_analyze_prints_what_the_readme_shows(tmp_path):
    command = fenced_block("## Two commands").strip().split(" && ")[-1]
    assert command == '.venv/bin/eqlin analyze "The bridge out of Marin is the"'
    shown = fenced_block("## What `eqlin analyze` prints").splitlines()
    printed = as_the_readme_writes_paths(run(["-m", "eqlin.cli", "analyze", "The bridge out of Marin is the"],
                                             tmp_path)).splitlines()
    assert (tmp_path / "eqlin-report" / "report.html").is_file()
    problems = differences(printed, shown)
    assert not problems, "`eqlin analyze` printed otherwise than README.md shows; printed:\n" + "\n".join(
        printed) + "\n\n" + "\n".join(problems)
