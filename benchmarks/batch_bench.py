"""Does the vmapped batch path pay for a group of equal-length prompts? Measured for the final detached J.

For each T: B prompts of exactly T tokens (the first T tokens of B different sentences), their detached
Jacobians one at a time (`eqlin.detached_jacobian`, compiled once by a first call) against one vmapped call
(`eqlin.detached_jacobians`, compiled by a first call); seconds are the best of `--repeats` calls, so
compilation is excluded on both sides. Also the plain Jacobian's reconstruction error computed from the
full plain J against one JVP (J·x = Σ_t J_t x_t, `matrix_free_check(detach=False)`), which is what
`eqlin analyze` needs of it.

    python benchmarks/batch_bench.py --model embedded --lengths 8 --batch 4
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import eqlin  # noqa: E402
from eqlin.gguf import default_model_path  # noqa: E402
from eqlin.linear_maps import matrix_free_check  # noqa: E402

SENTENCES = [
    "The Golden Gate Bridge is a suspension bridge spanning the strait between the bay and the ocean",
    "Mount Everest is the highest mountain above sea level, on the border between Nepal and China",
    "The Amazon river carries more water to the sea than any other river in the whole world",
    "A violin has four strings tuned in perfect fifths and is played with a bow made of horsehair",
    "The human heart pumps blood through the body by contracting about seventy times each minute",
    "Paris is the capital and the most populous city of France, on the river Seine in the north",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen inside the leaves",
    "The printing press spread books across Europe within a few decades of its invention in Mainz",
]


def best(call, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(call())
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded", help="'embedded' or a checkpoint folder")
    parser.add_argument("--lengths", type=int, nargs="+", default=[8])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the results")
    args = parser.parse_args()
    source = default_model_path() if args.model == "embedded" else args.model
    model = eqlin.load(source)
    rows = []
    for T in args.lengths:
        prompts = [model.encode(s)[:T] for s in SENTENCES[: args.batch]]
        assert all(len(p) == T for p in prompts), "a sentence is shorter than T tokens"
        for p in prompts[:1]:
            eqlin.detached_jacobian(model, p).jacobian.block_until_ready()  # compile
        single = best(lambda: [eqlin.detached_jacobian(model, p).jacobian for p in prompts], args.repeats)
        eqlin.detached_jacobians(model, prompts).jacobian.block_until_ready()  # compile
        batched = best(lambda: eqlin.detached_jacobians(model, prompts).jacobian, args.repeats)
        eqlin.jacobian(model, prompts[0]).jacobian.block_until_ready()
        plain_full = best(lambda: eqlin.jacobian(model, prompts[0]).relative_error, args.repeats)
        matrix_free_check(model, prompts[0], detach=False).homogeneity_error.block_until_ready()
        plain_jvp = best(lambda: matrix_free_check(model, prompts[0], detach=False).homogeneity_error, args.repeats)
        errors = (float(eqlin.jacobian(model, prompts[0]).relative_error),
                  float(matrix_free_check(model, prompts[0], detach=False).homogeneity_error))
        row = {"T": T, "B": args.batch, "one_at_a_time_s": single, "batched_s": batched,
               "batched_over_one_at_a_time": batched / single, "plain_full_J_s": plain_full,
               "plain_jvp_s": plain_jvp, "plain_error_full_J": errors[0], "plain_error_jvp": errors[1],
               "load_average": os.getloadavg()}
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": str(jax.devices()[0]), "model": str(source), "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
