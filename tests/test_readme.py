"""README.md's examples come from runs: its library snippet and the output of `eqlin analyze` shown under
"What `eqlin analyze` prints" are run on the embedded Gemma 3 270M, and every printed line is compared with
the README at the precision it prints.

Printed numbers must match digit for digit, with one exception: a number the README shows in e-notation at
or below 1e-13 is a reconstruction error at rounding level, whose digits change with the machine's matrix
kernels and the memory limit's chunking; the run's value then has to be of the same order of magnitude
(within a factor of 10; where the README shows 0, at or below 1e-13). A bound the README's prose states for
these runs (`≤ …`) is checked against the run itself. In the snippet, each `print` line's comment is its
output; an explanation may follow after " — ".

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
    return len(ours) == len(theirs) and all(a == b or rounding_alike(float(a), b) for a, b in zip(ours, theirs))


def rounding_alike(value: float, shown: str) -> bool:
    """Whether `value` stands for the README's rounding-level error `shown` (e-notation, at or below 1e-13):
    at or below 1e-13 too, and within a factor of 10 of it (of any size up to 1e-13 where it shows 0)."""
    bound = abs(float(shown))
    if "e" not in shown.lower() or bound > ROUNDING or abs(value) > ROUNDING:
        return False
    return bound == 0 or bound / 10 <= abs(value) <= bound * 10


def stated_bound(claim: str) -> float:
    """The number after `claim … ≤` in README.md's prose (line breaks as spaces)."""
    prose = " ".join(README.split())
    match = re.search(re.escape(claim) + r" ≤ (" + NUMBER.pattern + ")", prose)
    assert match, f"README.md no longer states {claim!r} ≤ …"
    return float(match.group(1))


LAYER_BOUND = "Every one of the 108 layer maps reconstructs its output to"


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
    assert float(printed[-1].split()[-1]) <= stated_bound(LAYER_BOUND)  # the layer story's max relative error
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
    (layers,) = [line for line in printed if line.startswith("layer maps: ")]
    assert float(re.search(r"max relative error (\S+);", layers).group(1)) <= stated_bound(LAYER_BOUND)
    problems = differences(printed, shown)
    assert not problems, "`eqlin analyze` printed otherwise than README.md shows; printed:\n" + "\n".join(
        printed) + "\n\n" + "\n".join(problems)
