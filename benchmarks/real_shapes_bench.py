"""Time, peak memory and reconstruction error of eqlin's float64 maps on a checkpoint at real shapes
(benchmarks/random_checkpoint.py writes one from benchmarks/real_configs/), per engine and weight placement.

    python benchmarks/real_shapes_bench.py /tmp/llama3b-random --tokens 64 --engines topk --weights stored,cast

Engines: `topk` (`eqlin.top_singular`, matrix-free Lanczos, the CPU case) and `full` (the whole J by
`eqlin.detached_jacobian`, the GPU case). Weights: `stored` / `cast` pass `eqlin.load(path, dtype="float64",
weights=...)` (weights kept at their stored dtype and upcast in the layer body, or cast to float64 at load);
`default` omits the keyword (eqlin's default, for versions without it). Each case runs in its own process:
load seconds, compute seconds (compilation included), the process's peak resident memory (VmHWM, loading
included), the device's peak where it reports one (GPU), the relative reconstruction error. A case whose
weights alone exceed `--memory-gib` (float64: 8 bytes per parameter with `cast`) is recorded as skipped, not
run. `--decode` also decodes the top-k singular vectors into tokens (`eqlin.decode_spectrum`: U through the
unembedding, each token's block of V by cosines with the embeddings), recording its seconds and the peak
before it. `--rss-limit-gib` stops a case whose resident memory goes above it and records the stage it
reached and its peak (where it stops, measured before the machine's OOM killer acts); it is also the
`memory_limit` that `eqlin.load` plans against. The input is `--tokens` random token ids (seeded). The run prints the CPU model and a measured float64
GEMM rate of the CPU (this process never touches a GPU, whose memory JAX would otherwise preallocate), and
writes everything to `--results` (default benchmarks/results/) as JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

ENGINES = ("topk", "full")
WEIGHTS = ("default", "stored", "cast")
STORED_BYTES = 2  # a bf16 checkpoint: benchmarks/random_checkpoint.py writes bf16


def status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (VmHWM: peak resident, VmRSS: resident now) in bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def stop_above(limit: float, stage: dict) -> None:
    """Watch this process's resident memory (every 0.1 s, in a daemon thread); above `limit` bytes, print the
    case's record (`stopped`, the stage reached, VmHWM) as the last line and exit at once (status 3): where a
    case stops is measured without the machine's OOM killer, which would take other processes' memory too."""
    def watch() -> None:
        while status_bytes("VmRSS") <= limit:
            time.sleep(0.1)
        print(json.dumps({**stage, "stopped": f"resident above --rss-limit-gib {limit / 2**30:.1f}",
                          "peak_rss": status_bytes("VmHWM")}), flush=True)
        os._exit(3)

    threading.Thread(target=watch, daemon=True).start()


def run_case(checkpoint: str, engine: str, weights: str, tokens: int, k: int, seed: int, decode: bool = False,
             rss_limit: float | None = None) -> dict:
    """One case in this process (the child): load, compute, measure."""
    stage = {"engine": engine, "weights": weights, "tokens": tokens, "stage": "load"}
    if rss_limit:
        stop_above(rss_limit, stage)
    import jax

    jax.config.update("jax_enable_x64", True)
    import numpy as np

    import eqlin

    start = time.perf_counter()
    model = eqlin.load(checkpoint, dtype="float64", **({} if weights == "default" else {"weights": weights}),
                       **({"memory_limit": int(rss_limit)} if rss_limit else {}))
    jax.block_until_ready(model.params)
    load_s, loaded_rss = time.perf_counter() - start, status_bytes("VmRSS")
    stage.update(stage="compute", load_s=load_s, rss_after_load=loaded_rss)
    ids = np.random.default_rng(seed).integers(0, model.config.vocab_size, tokens)
    start = time.perf_counter()
    if engine == "topk":
        result = eqlin.top_singular(model, ids, k, progress=lambda done, total: stage.update(
            stage=f"compute, {done} of {total} products with J or Jᵀ done", peak_rss_so_far=status_bytes("VmHWM")))
        values = [float(s) for s in result.singular_values]
    else:
        result = eqlin.detached_jacobian(model, ids)
        values = None
        result.jacobian.block_until_ready()
    error = float(result.relative_error)
    compute_s = time.perf_counter() - start
    decoded = {}
    if decode and engine == "topk":
        stage.update(stage="decode")
        before, start = status_bytes("VmHWM"), time.perf_counter()
        result = eqlin.decode_spectrum(model, result)
        decoded = {"decode_s": time.perf_counter() - start, "peak_rss_before_decode": before,
                   "top_tokens": result.left_tokens.ids[:, 0].tolist()}
    device = jax.local_devices()[0]
    stats = (device.memory_stats() or {}) if device.platform != "cpu" else {}
    return {"engine": engine, "weights": weights, "tokens": tokens, "k": k if engine == "topk" else None,
            "model": repr(model), "load_s": load_s, "compute_s": compute_s, "rss_after_load": loaded_rss,
            "peak_rss": status_bytes("VmHWM"), "device": str(device),
            "device_peak": stats.get("peak_bytes_in_use"), "relative_error": error,
            "singular_values": values, **decoded}


def parameter_count(checkpoint: Path) -> int:
    """Parameters of a checkpoint, from its safetensors headers (nothing loaded)."""
    from eqlin.loading import open_weight_files

    files = open_weight_files(checkpoint)
    return sum(math.prod(files[name].header[name][1]) for name in files)


def weight_bytes(params: int, weights: str) -> int:
    """Bytes the loaded weights take: their stored bytes with `stored`, else 8 per parameter (`cast`, and
    `default`, which casts in versions without `weights=`)."""
    return params * (STORED_BYTES if weights == "stored" else 8)


def gib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--k", type=int, default=10, help="singular triplets for the topk engine")
    parser.add_argument("--engines", default="topk", help=f"comma-separated: {', '.join(ENGINES)}")
    parser.add_argument("--weights", default="stored,cast", help=f"comma-separated: {', '.join(WEIGHTS)}")
    parser.add_argument("--memory-gib", type=float, default=None,
                        help="skip a case whose weights alone exceed this (default: 80 %% of physical memory)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per case before it is killed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rss-limit-gib", type=float, default=None,
                        help="stop a case whose resident memory exceeds this, recording where it stopped; also "
                             "eqlin.load's memory_limit (the capacity its load plan checks)")
    parser.add_argument("--decode", action="store_true",
                        help="topk: also decode the singular vectors into tokens (eqlin.decode_spectrum), timed "
                             "and with the peak before it recorded")
    parser.add_argument("--results", type=Path, default=HERE / "results")
    parser.add_argument("--case", nargs=2, metavar=("ENGINE", "WEIGHTS"), help=argparse.SUPPRESS)  # the child
    args = parser.parse_args()
    if args.case:
        limit = args.rss_limit_gib and args.rss_limit_gib * 2**30
        print(json.dumps(run_case(str(args.checkpoint), *args.case, args.tokens, args.k, args.seed, args.decode, limit)))
        return
    engines, weights = args.engines.split(","), args.weights.split(",")
    for value, allowed in ((engines, ENGINES), (weights, WEIGHTS)):
        if not set(value) <= set(allowed):
            parser.error(f"{','.join(value)}: choose from {', '.join(allowed)}")

    child_env = dict(os.environ)
    os.environ["JAX_PLATFORMS"] = "cpu"  # this process measures the CPU's GEMM rate and leaves any GPU to the cases
    from jacobian_bench import cpu_model, gemm_gflops  # imports torch: kept out of the measured children

    from eqlin.outputs import write_json_atomic

    budget = (args.memory_gib * 2**30 if args.memory_gib else
              0.8 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    config = json.loads((args.checkpoint / "config.json").read_text())
    params = parameter_count(args.checkpoint)
    machine = {"cpu": cpu_model(), "cores": os.cpu_count(), "load_average": os.getloadavg(),
               "float64_gemm_gflops": gemm_gflops("float64", config["hidden_size"], config["intermediate_size"])}
    print(f"{machine['cpu']}, {machine['cores']} cores, load {machine['load_average'][0]:.1f}; float64 GEMM "
          f"{machine['float64_gemm_gflops']:.0f} GFLOP/s; {args.checkpoint.name}: {params / 1e9:.2f} B parameters")
    cases = []
    for engine in engines:
        for w in weights:
            need = weight_bytes(params, w)
            if need > budget:
                cases.append({"engine": engine, "weights": w, "tokens": args.tokens,
                              "skipped": f"weights need {gib(need)} GiB, over {gib(budget)} GiB"})
                continue
            command = [sys.executable, __file__, str(args.checkpoint), "--case", engine, w, "--tokens",
                       str(args.tokens), "--k", str(args.k), "--seed", str(args.seed)] + ["--decode"] * args.decode
            command += ["--rss-limit-gib", str(args.rss_limit_gib)] if args.rss_limit_gib else []
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout, env=child_env)
            except subprocess.TimeoutExpired:  # subprocess.run kills the child
                cases.append({"engine": engine, "weights": w, "tokens": args.tokens,
                              "failed": f"killed after {args.timeout:.0f} s"})
                continue
            last = (done.stdout.strip().splitlines() or [""])[-1]
            if done.returncode == 3 and last.startswith("{"):  # stopped above --rss-limit-gib: where, recorded
                cases.append(json.loads(last))
            elif done.returncode:
                cases.append({"engine": engine, "weights": w, "tokens": args.tokens,
                              "failed": f"exit {done.returncode}: {done.stderr.strip()[-2000:]}"})
            else:
                cases.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"{'engine':>6} {'weights':>8} {'T':>4} {'load s':>7} {'compute s':>9} {'peak GiB':>8} {'device GiB':>10} "
          f"{'rel. error':>10}")
    for c in cases:
        if "compute_s" in c:
            print(f"{c['engine']:>6} {c['weights']:>8} {c['tokens']:>4} {c['load_s']:7.1f} {c['compute_s']:9.1f} "
                  f"{gib(c['peak_rss']):>8} {gib(c['device_peak']):>10} {c['relative_error']:10.1e}")
        else:
            why = c.get("skipped") or c.get("failed") or f"{c['stopped']} in {c['stage']}, peak {gib(c['peak_rss'])} GiB"
            print(f"{c['engine']:>6} {c['weights']:>8} {c['tokens']:>4}  {why}")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H%M%S+0000")
    args.results.mkdir(parents=True, exist_ok=True)
    out = args.results / f"{stamp}-real-shapes-{args.checkpoint.name}.json"
    write_json_atomic(out, {"machine": machine, "checkpoint": str(args.checkpoint), "config": config,
                            "parameters": params, "cases": cases})
    print(f"results: {out}")


if __name__ == "__main__":
    main()
