"""Matrix-free top-k singular triplets vs the full detached Jacobian + SVD, on the embedded Gemma 3 270M.

For each length T, two cases run in their own subprocess (so each peak resident memory, ru_maxrss, is its
own): "dense" = `detached_jacobian` + `spectrum(per_token=False)`, "matrix-free" = `top_singular`
(Lanczos). Times are one call each, compilation included, model loading excluded; peak memory includes
the float64 model (measured alone in the "load" case). Prints a table and the largest relative
difference between the two top-k spectra.

    python benchmarks/spectral.py --lengths 128 512 --k 10
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

TEXT = (
    "The Golden Gate Bridge is a suspension bridge spanning the Golden Gate, the strait connecting San "
    "Francisco Bay and the Pacific Ocean. It links San Francisco to Marin County, carrying both U.S. Route 101 "
    "and California State Route 1 across the strait. The bridge was completed in 1937 and was, until 1964, "
    "the longest suspension bridge main span in the world. "
)


def run_case(case: str, length: int, k: int) -> dict:
    """In this process: load the model, run one case, report seconds, peak RSS and singular values."""
    import jax

    jax.config.update("jax_enable_x64", True)
    import numpy as np

    import eqlin
    import eqlin.gguf
    from eqlin.linear_maps import detached_jacobian
    from eqlin.spectral import spectrum, top_singular

    model = eqlin.load(eqlin.gguf.default_model_path())
    ids = model.encode(TEXT * (1 + length // 50))[:length]
    if len(ids) < length:
        raise SystemExit(f"the benchmark text gives only {len(ids)} tokens, fewer than {length}")
    start = time.perf_counter()
    if case == "load":
        values = []
    elif case == "dense":
        values = spectrum(detached_jacobian(model, ids), k, per_token=False).singular_values
    else:
        values = top_singular(model, ids, k).singular_values
    values = np.asarray(jax.block_until_ready(values)).tolist()
    seconds = time.perf_counter() - start
    return {"case": case, "T": length, "seconds": seconds, "values": values,
            "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def child(case: str, length: int, k: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--case", case, "--lengths", str(length), "--k", str(k)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--case", choices=["load", "dense", "matrix-free"], help="run one case in this process")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.lengths[0], args.k)))
        return
    base = child("load", args.lengths[0], args.k)
    print(f"model alone: peak {base['peak_gib']:.2f} GiB")
    print(f"{'T':>5} {'case':>12} {'seconds':>9} {'peak GiB':>9}   top-k agreement")
    for length in args.lengths:
        mf = child("matrix-free", length, args.k)
        print(f"{length:>5} {'matrix-free':>12} {mf['seconds']:>9.1f} {mf['peak_gib']:>9.2f}", flush=True)
        dense = child("dense", length, args.k)
        diff = max(abs(a - b) / b for a, b in zip(mf["values"], dense["values"]))
        print(f"{length:>5} {'dense':>12} {dense['seconds']:>9.1f} {dense['peak_gib']:>9.2f}   "
              f"max relative difference {diff:.1e}")
        print(f"{length:>5} {'ratio':>12} {dense['seconds'] / mf['seconds']:>8.1f}x "
              f"{dense['peak_gib'] / mf['peak_gib']:>8.1f}x   (dense / matrix-free; memory above the model: "
              f"{dense['peak_gib'] - base['peak_gib']:.2f} vs {mf['peak_gib'] - base['peak_gib']:.2f} GiB)",
              flush=True)


if __name__ == "__main__":
    main()
