"""The repository keeps its promises: CI runs exactly the README's test command (the slow tests included),
tests the declared version floors, and fails loudly rather than skip the browser test when Chromium cannot be
had."""

from __future__ import annotations

import os
import pathlib
import shutil
import re
import subprocess
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert "pytest" in ci and "--run-slow" in ci
    assert f"\n{ci}\n" in (ROOT / "README.md").read_text()


def _name(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.-]+", requirement).group()).lower()


def test_ci_tests_every_declared_floor():
    """Each `>=` floor of the dependencies and the torch, test and flax extras is pinned in .ci/floors.txt at that
    version (and nothing else is, but the torch pin), and CI installs those pins before it runs the suite; the
    torch extra states transformers as a range, and pins torch alone (a range takes PyPI's CUDA build)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    floors = {_name(r): r.split(">=")[1] for r in project["dependencies"] + extras["torch"] + extras["test"]
              + extras["flax"] if ">=" in r}
    assert "transformers" in floors and [r for r in extras["torch"] if "==" in r] == ["torch==2.13.0"]
    floors["torch"] = "2.13.0"
    pins = dict(line.split("==") for line in (ROOT / ".ci" / "floors.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    assert {_name(n): v for n, v in pins.items()} == {n: v + ".0" * (2 - v.count(".")) for n, v in floors.items()}
    assert {"jax", "jaxlib", "numpy"} <= floors.keys()
    assert '-e ".[test]" -c .ci/floors.txt' in (ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize("allow, code, message", [
    ("", 1, "CI: ERROR: chromium is not installed, so report.html cannot be checked in a browser; install it"),
    ("1", 127, "CI: WARNING: chromium is not installed: the report.html browser test will be SKIPPED"),
])
def test_ci_without_chromium_fails_or_warns(allow, code, message, tmp_path):
    """.ci/run on a PATH with neither chromium nor apt-get (nor python3: a copy in a scratch folder, so nothing
    real is installed or removed): it stops with exit 1 and says why, unless told to run without it, which it
    then says before going on (and stopping here, at the missing python3)."""
    (tmp_path / ".ci").mkdir()
    shutil.copy(ROOT / ".ci" / "run", tmp_path / ".ci" / "run")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "dirname").symlink_to(shutil.which("dirname"))
    env = {"PATH": str(bin_dir), "EQLIN_CI_ALLOW_NO_CHROMIUM": allow, "HOME": os.environ.get("HOME", "/")}
    run = subprocess.run([shutil.which("bash"), str(tmp_path / ".ci" / "run")], env=env, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == code, run.stderr
    assert message in run.stderr
