"""The layer story's cost: `eqlin analyze --layers all` against `--layers none` end to end, and
`eqlin.layer_spectra` (every layer, both scopes, three parts) by engine and length, in one process.

    python benchmarks/layer_story_bench.py --cli                       # embedded model, CLI, T = 8
    python benchmarks/layer_story_bench.py --models gemma270m-random --lengths 8 32 128 --engines fwd rev

The CLI case runs each command twice in fresh processes (the second with JAX's compilation cache warm)
and reads the stage timings from report.json. The library case times a second call (compiled) of
`layer_spectra` on T token ids of the benchmark text (random ids where a model has no tokenizer), after
one warm-up call, and records the flop estimates of both engines (`layer_map_flops`). Results go to
benchmarks/results/<UTC time>-layers.json, rewritten after every measurement.
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

import jax

jax.config.update("jax_enable_x64", True)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.jacobian_bench import RESULTS, cpu_model, gemm_gflops, models, prompt_ids  # noqa: E402
from eqlin.layer_story import layer_map_flops, layer_spectra  # noqa: E402
from eqlin.outputs import write_json_atomic  # noqa: E402
from eqlin.selection import PARTS  # noqa: E402

TEXT = "The bridge out of Marin is the"


def cli_case(layers: str, out: Path) -> dict:
    """Two runs of `eqlin analyze TEXT --layers LAYERS` (cold, then warm compilation cache): wall seconds
    and the report's stage timings of the second."""
    cmd = [sys.executable, "-m", "eqlin.cli", "analyze", TEXT, "--layers", layers, "--out", str(out), "-q"]
    walls = []
    for _ in range(2):
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        walls.append(time.perf_counter() - start)
    report = json.loads((out / "report.json").read_text())
    return {"layers": layers, "cold_s": walls[0], "warm_s": walls[1], "stages_s": report["timings_s"],
            "max_relative_error": report["layer_analysis"]["max_relative_error"]}


def library_case(model, T: int, engine: str) -> dict:
    """Seconds of a compiled `layer_spectra` call (all layers, both scopes) at T tokens with `engine`."""
    ids = prompt_ids(model, T)
    layer_spectra(model, ids, engine=engine, k=5)  # compile and warm up
    start = time.perf_counter()
    story = layer_spectra(model, ids, engine=engine, k=5)
    seconds = time.perf_counter() - start
    flops = layer_map_flops(model.config, T, tuple(range(model.config.num_layers)), len(PARTS))
    return {"T": T, "engine": engine, "seconds": seconds, "stages_s": story.timings_s, "flops": flops,
            "max_relative_error": story.max_relative_error}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cli", action="store_true", help="time the CLI, --layers all vs none (embedded model)")
    parser.add_argument("--models", nargs="*", default=[], choices=["embedded", "tiny", "gemma270m-random"])
    parser.add_argument("--lengths", type=int, nargs="+", default=[8])
    parser.add_argument("--engines", nargs="+", default=["fwd", "rev"], choices=["fwd", "rev"])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "cpu": cpu_model(),
            "cores": os.cpu_count(), "jax_device": jax.devices()[0].device_kind, "jax": jax.__version__,
            "load_average_start": os.getloadavg()}
    result: dict = {"meta": meta, "cli": [], "library": []}
    out = args.out or RESULTS / f"{meta['date'].replace(':', '')}-layers.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        result["meta"]["load_average_end"] = os.getloadavg()
        write_json_atomic(out, result)

    print(f"devices: jax {meta['jax_device']}, cpu {meta['cpu']}", flush=True)
    if args.cli:
        with tempfile.TemporaryDirectory() as tmp:
            for layers in ("none", "all", "none", "all"):  # interleaved: drifts in load hit both
                case = cli_case(layers, Path(tmp))
                result["cli"].append(case)
                save()
                print(f"cli --layers {layers}: cold {case['cold_s']:.1f} s, warm {case['warm_s']:.1f} s, "
                      f"stages {case['stages_s']}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name, (model, _) in models(args.models, "float64", Path(tmp)).items():
            gemm = gemm_gflops("float64", model.config.hidden_size, model.config.intermediate_size)
            for T in args.lengths:
                for engine in args.engines:
                    case = library_case(model, T, engine)
                    case.update(model=name, gemm_gflops=gemm, load_average=os.getloadavg()[0])
                    result["library"].append(case)
                    save()
                    print(f"{name} T={T} {engine}: {case['seconds']:.3g} s, estimated "
                          f"{case['flops'][engine] / 1e12:.2f} TFLOP ({case['flops'][engine] / case['seconds'] / 1e9:.0f}"
                          f" GFLOP/s, GEMM {gemm:.0f}), max error {case['max_relative_error']:.1e}, stages "
                          + ", ".join(f"{k} {v:.3g} s" for k, v in case["stages_s"].items()), flush=True)
    save()
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
