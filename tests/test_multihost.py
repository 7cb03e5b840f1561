"""docs/scaling.md's "Several hosts" program, run as written by two processes on 127.0.0.1 (JAX's own
distributed runtime, gloo CPU collectives, 2 forced host devices each): the gathered J equals one process's
J, and when one process fails the other ends within a bound instead of waiting forever."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.conftest import TEXT
from tests.test_readme import fenced_block

SCALING = (Path(__file__).resolve().parents[1] / "docs" / "scaling.md").read_text(encoding="utf-8")
RECIPE = fenced_block("## Several hosts", "python", SCALING)
CHECKS = """
import json, re
import numpy as np
from eqlin.linear_maps import detached_jacobian
from eqlin.sharding import _sharded_rows

one = detached_jacobian(eqlin.load(path), text, fold=False)  # this process alone, on one device
model = eqlin.load(path, mesh=mesh)
hlo = _sharded_rows.lower(model.params, model.config, lin.inputs, mesh=mesh, chunk=None).compile().as_text()
print(json.dumps({
    "rows": [[d.process_index for d in row] for row in mesh.devices],
    "replica_groups": sorted(set(re.findall(r"all-reduce(?:-start)?\\(.*?replica_groups=(\\S+?),\\s", hlo))),
    "shape": list(J.shape),
    "max_abs_diff": float(np.max(np.abs(J - np.asarray(one.jacobian)))),
    "max_abs": float(np.max(np.abs(np.asarray(one.jacobian)))),
    "relative_error": float(lin.relative_error),
}))
"""
BOUND = 120  # seconds for both processes, start to end; then they are killed
FAILURE_BOUND = 60  # a failure must end both well within BOUND: the recipe's heartbeat timeout is 10 s


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_processes(paths: list[str], program: str) -> tuple[list[subprocess.CompletedProcess], float]:
    """Run `program` as process 0 and 1 (argv: address, 2, index, path, TEXT); both are killed at BOUND s.
    Their output goes to files, not pipes: a process blocked on a full pipe would block the other too."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    address = f"127.0.0.1:{free_port()}"
    start = time.monotonic()
    with contextlib.ExitStack() as stack:
        logs = [[stack.enter_context(tempfile.TemporaryFile("w+")) for _ in "oe"] for _ in paths]
        procs = [subprocess.Popen([sys.executable, "-c", program, address, "2", str(i), path, TEXT], env=env,
                                  stdout=out, stderr=err, text=True) for i, (path, (out, err)) in
                 enumerate(zip(paths, logs))]
        try:
            for p in procs:
                p.wait(timeout=max(1.0, BOUND - (time.monotonic() - start)))
        finally:
            for p in procs:  # on a timeout (or any error) nothing is left running
                if p.poll() is None:
                    p.kill()
                    p.wait()
        seconds = time.monotonic() - start
        for f in (f for pair in logs for f in pair):
            f.seek(0)
        texts = [[f.read() for f in pair] for pair in logs]
    return [subprocess.CompletedProcess(p.args, p.returncode, out, err) for p, (out, err) in zip(procs, texts)], seconds


def test_two_processes_gather_the_one_process_jacobian(checkpoint):
    folder = str(checkpoint("llama_gqa"))
    done, _ = run_two_processes([folder, folder], RECIPE + CHECKS)
    for p in done:
        assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads(done[0].stdout.strip().splitlines()[-1])
    assert result["rows"] == [[0, 0], [1, 1]], result  # tensor parallel inside a process, basis across
    assert result["replica_groups"] in (["[2,2]<=[4]"], ["{{0,1},{2,3}}"]), result  # {0, 1}, {2, 3}: in a process
    assert result["shape"][0] == result["shape"][2] and result["shape"][1] > 1, result
    assert result["max_abs_diff"] <= 1e-13 * result["max_abs"], result  # measured 1.3e-15 of the largest
    assert result["relative_error"] <= 1e-13, result  # measured 1.3e-15
    assert json.loads(done[1].stdout.strip().splitlines()[-1]) == result  # process 1 gathered the same J


def test_a_failing_process_ends_the_other_within_the_timeouts(checkpoint, tmp_path):
    """A bad path on process 1: it prints its error and leaves at once, and process 0 (blocked in a
    collective) is ended by JAX's coordination service after the recipe's heartbeat timeout."""
    missing = str(tmp_path / "missing")
    done, seconds = run_two_processes([str(checkpoint("llama_gqa")), missing], RECIPE)
    assert done[1].returncode == 1 and f"{missing} does not exist" in done[1].stderr, done[1].stderr[-3000:]
    assert done[0].returncode != 0 and seconds < FAILURE_BOUND, (seconds, done[0].stderr[-3000:])
    assert "The following tasks are unhealthy (stopped sending heartbeats)" in done[0].stderr
    assert "Terminating process because the JAX distributed service detected fatal errors" in done[0].stderr
    assert "another task died" in done[0].stderr
