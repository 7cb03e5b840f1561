"""`eqlin analyze --prompts` against a shell loop of single `eqlin analyze` calls, and its resume.

Takes the first N prompts of a prompt file and, one after another in this session, times
  loop:    one `python -m eqlin.cli analyze TEXT` process per prompt (as a shell loop runs them),
  set:     one `python -m eqlin.cli analyze --prompts FILE` process for all N,
  resume:  the same set command again over the finished set (nothing left to analyse),
all with the same options (default `--layers none`) and JAX's persistent compilation cache on, as a user
has it. Run it after those prompts' lengths are in that cache (e.g. after `eqlin study` on the same file
with the same options), so that neither side compiles and neither is favoured by the other's compiling.
Prints and writes JSON: seconds, prompts per minute, the ratio, the load average before and after.

    python benchmarks/prompt_set_bench.py benchmarks/prompts/phrases100.txt --count 6
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompts", type=Path)
    parser.add_argument("--count", type=int, default=6, help="prompts to time (the file's first N)")
    parser.add_argument("--options", default="--layers none", help="analyze options for both sides")
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the results")
    args = parser.parse_args()
    prompts = [p for p in args.prompts.read_text(encoding="utf-8").splitlines() if p.strip()][: args.count]
    options = args.options.split()
    eqlin = [sys.executable, "-m", "eqlin.cli", "analyze"]
    load = {"start": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        loop = [timed([*eqlin, p, *options, "--out", str(tmp / f"single{i}"), "-q"]) for i, p in enumerate(prompts)]
        load["after_loop"] = os.getloadavg()
        (tmp / "prompts.txt").write_text("\n".join(prompts) + "\n", encoding="utf-8")
        set_cmd = [*eqlin, "--prompts", str(tmp / "prompts.txt"), *options, "--out", str(tmp / "set"), "-q"]
        whole = timed(set_cmd)
        record = json.loads((tmp / "set" / "set.json").read_text())["runs"][-1]
        resume = timed(set_cmd)
        load["end"] = os.getloadavg()
    result = {
        "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "prompts": len(prompts), "options": args.options,
        "loop_s": sum(loop), "loop_each_s": loop, "loop_prompts_per_minute": 60 * len(prompts) / sum(loop),
        "set_s": whole, "set_prompts_per_minute": 60 * len(prompts) / whole,
        "set_model_load_s": record["model_load_s"], "set_analysis_s": record["analysis_s"],
        "loop_over_set": sum(loop) / whole, "resume_s": resume, "resume_over_set": resume / whole,
        "load_average": load,
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
