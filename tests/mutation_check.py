"""Mutation check: seed known bugs into a scratch copy of eqlin and show that the tests catch each one.

    python tests/mutation_check.py                      # every mutation, the default tests (~15-25 min on 2 cores)
    python tests/mutation_check.py --only branch-swap   # one mutation
    python tests/mutation_check.py --list               # what is seeded where
    python tests/mutation_check.py --tests tests/test_decoder.py   # other tests (pytest arguments)

It copies `eqlin/`, `tests/` and `pyproject.toml` into a temporary folder, runs the tests there once unchanged
(they must pass), then, for each mutation, replaces one snippet of one library file (the snippet must occur
exactly once, so a mutation that no longer applies is reported, not silently skipped), runs the tests on that
copy and restores the file. The repository itself is never touched. It prints, per mutation, the tests that
failed, and exits 1 if any mutation survives (no test failed) or no longer applies.

The default tests are the ones that grade eqlin against an outside reference (PyTorch transformers, closed forms):
tests/test_decoder.py and tests/test_linear_maps.py. The seeded bugs are of the kinds an audit found passing
(issue 21): a model that is wrong but consistent with itself still reconstructs its own output exactly, so each
of these must be caught by a comparison with the reference, not by reconstruction.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_TESTS = ("tests/test_decoder.py", "tests/test_linear_maps.py")


@dataclasses.dataclass(frozen=True)
class Mutation:
    name: str
    path: str  # relative to the repository root
    old: str
    new: str
    what: str


MUTATIONS = (
    Mutation("branch-swap", "eqlin/decoder.py", "    return (h + m, a, m) if tap", "    return (h + m, m, a) if tap",
             "layer_tail returns the MLP branch as the attention branch and vice versa (their sum is unchanged)"),
    Mutation("window-off-by-one", "eqlin/blocks.py", "(t - s < window)", "(t - s <= window)",
             "the sliding-window mask lets one key too many through"),
    Mutation("rmsnorm-eps-outside-root", "eqlin/blocks.py",
             "jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)",
             "(jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True)) + eps)",
             "RMSNorm adds eps after the inverse square root instead of under it"),
    Mutation("rope-rotate-half-sign", "eqlin/blocks.py",
             "rotated = jnp.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)",
             "rotated = jnp.concatenate([rot[..., half:], -rot[..., :half]], axis=-1)",
             "RoPE's half-split rotation turns the wrong way (rotate_half with the sign on the other half)"),
    Mutation("last-row-readout-off-by-one", "eqlin/decoder.py",
             "        return last[0][-1], None\n", "        return last[0][-2], None\n",
             "the final output is read at the second-to-last of the last rows instead of the last position"),
    Mutation("qwen3-max-window-layers-off-by-one", "eqlin/families/qwen3.py",
             "i >= first_sliding", "i > first_sliding",
             "Qwen 3 starts sliding one layer after max_window_layers"),
    # (Unfreezing the MLP gate alone would be an equivalent mutant: the gate reads a frozen copy of x.)
    Mutation("rmsnorm-coefficient-not-frozen", "eqlin/blocks.py",
             "coeff = frozen(jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps), detach)",
             "coeff = jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)",
             "detached RMSNorm lets gradients through its scale rsqrt(mean(x²)+eps): J is no longer the detached one"),
    Mutation("final-softcap-dropped", "eqlin/decoder.py", "    if config.final_logit_softcapping is not None:\n",
             "    if False:\n", "the final logit softcap is never applied"),
)


def run_tests(folder: pathlib.Path, tests: list[str]) -> tuple[int, list[str], str]:
    """(pytest exit code, failed test ids, summary line) of `tests` run in `folder`."""
    env = dict(os.environ, PYTHONPATH=str(folder), PYTHONDONTWRITEBYTECODE="1")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider", *tests],
                         cwd=folder, env=env, capture_output=True, text=True)
    failed = re.findall(r"^FAILED (\S+)", run.stdout, flags=re.M)
    summary = next((line.strip("= ") for line in reversed(run.stdout.splitlines()) if line.startswith("=")
                    or " passed" in line or " failed" in line), run.stdout[-300:])
    return run.returncode, failed, summary


def grouped(failed: list[str]) -> list[str]:
    """Failed test ids grouped by test function: 'tests/x.py::test_y [3 of its cases]'."""
    counts: dict[str, int] = {}
    for test in failed:
        base = test.split("[")[0]
        counts[base] = counts.get(base, 0) + 1
    return [f"{base} [{n} case{'s' if n > 1 else ''}]" for base, n in counts.items()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", action="append", help="run only this mutation (repeatable)")
    parser.add_argument("--tests", nargs="+", default=list(DEFAULT_TESTS), help="pytest arguments")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    if args.list or not chosen:
        for m in MUTATIONS:
            print(f"{m.name:36s} {m.path}: {m.what}")
        return 0 if args.list else 2

    with tempfile.TemporaryDirectory(prefix="eqlin-mutation-") as scratch:
        folder = pathlib.Path(scratch)
        for name in ("eqlin", "tests"):
            shutil.copytree(ROOT / name, folder / name, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(ROOT / "pyproject.toml", folder)
        probe = subprocess.run([sys.executable, "-c", "import eqlin; print(eqlin.__file__)"], cwd=folder,
                               env=dict(os.environ, PYTHONPATH=str(folder)), capture_output=True, text=True)
        if not probe.stdout.startswith(str(folder)):
            print(f"the scratch copy is not the eqlin that gets imported ({probe.stdout.strip()}{probe.stderr})")
            return 2
        print(f"tests: {' '.join(args.tests)}  (scratch copy in {folder})", flush=True)
        start = time.perf_counter()
        code, failed, summary = run_tests(folder, args.tests)
        print(f"unmutated: {summary} ({time.perf_counter() - start:.0f} s)", flush=True)
        if code != 0:
            print("the tests fail without any mutation:", *failed, sep="\n  ")
            return 2
        survived = []
        for m in chosen:
            target = folder / m.path
            original = target.read_text()
            if original.count(m.old) != 1:
                print(f"\n{m.name}: does not apply ({m.old!r} occurs {original.count(m.old)} times in {m.path})")
                survived.append(m.name)
                continue
            target.write_text(original.replace(m.old, m.new))
            try:
                start = time.perf_counter()
                code, failed, summary = run_tests(folder, args.tests)
            finally:
                target.write_text(original)
            verdict = "CAUGHT" if failed else "SURVIVED"
            print(f"\n{m.name} ({m.path}): {m.what}\n  {verdict}: {summary} ({time.perf_counter() - start:.0f} s)")
            for line in grouped(failed):
                print(f"    {line}")
            if not failed:
                survived.append(m.name)
        print(f"\n{len(chosen) - len(survived)} of {len(chosen)} mutations caught"
              + (f"; survived or not applied: {', '.join(survived)}" if survived else ""))
        return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
