"""The repository keeps its promises: CI runs exactly the README's test commands."""

from __future__ import annotations

import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert "pytest" in ci
    assert f"\n{ci}\n" in (ROOT / "README.md").read_text()


def test_every_test_command_of_ci_is_in_the_readme():
    commands = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if "pytest" in line
                and not line.lstrip().startswith("#")]
    readme = (ROOT / "README.md").read_text()
    assert len(commands) >= 2 and all(f"\n{line}\n" in readme for line in commands)
