"""eqlin's detached Jacobian vs the PyTorch reference approach, in one process and one run.

For each model, dtype and length T: eqlin's full J (compile time, run time; with the folded MLP as
`fold="auto"` chooses it, and unfolded), the PyTorch approach (`torch.autograd.functional.jacobian(
vectorize=True)`, reverse mode, on transformers' model made detached at run time by
`eqlin.reference.make_detached`: same weights, input and dtype), achieved GFLOP/s and the fraction
of the naive work floor, peak memory, and torch time / eqlin time. Optionally the batched throughput
(`eqlin.batch`) and the warm-cache end-to-end CLI (`eqlin analyze --layers none`).

Models: "embedded" (the Gemma 3 270M GGUF), "tiny" (the tests' 4-layer Gemma 3), "gemma270m-random"
(Gemma 3 270M's architecture, benchmarks/gemma3_270m_config.json, with transformers' random initial
weights: the same work as the embedded model, for machines without it, e.g. a GPU host).
Devices: JAX's default device; PyTorch runs on CUDA when it is available, else on the CPU.

Naive work floor: reverse mode pushes d cotangents through T positions of the linear path only (v, o,
up, down; q, k and gate are frozen): flops = 2 · N_linear · T · d, N_linear = L · d · (kv + q + 2F).
The floor's seconds use a same-dtype GEMM rate (1024×d @ d×F, best of 5) measured just before each
case. The folded MLP does less work than this floor (M_t = D·diag(g_t)·U formed once per position,
then d×d products), so its fraction of the floor can exceed 1.
Peak memory: resident set size sampled every 2 ms during the call, above the level before it (host
memory only; on a GPU it says little).

    python benchmarks/jacobian_bench.py                         # embedded + tiny, T = 8 32, f64 + f32
    python benchmarks/jacobian_bench.py --models embedded --lengths 128 512 --dtypes float64
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import eqlin  # noqa: E402
from eqlin.batch import detached_jacobians  # noqa: E402
from eqlin.linear_maps import jacobian_arrays  # noqa: E402
from eqlin.memory import estimate_jacobian_bytes, fold_pays, memory_limit_bytes, resolve_chunk  # noqa: E402
from eqlin.outputs import write_json_atomic  # noqa: E402
from eqlin import reference as ref  # noqa: E402
from tests.fixtures import make_checkpoint  # noqa: E402

TEXT = ("The Golden Gate Bridge is a suspension bridge spanning the Golden Gate, the strait connecting San "
        "Francisco Bay and the Pacific Ocean. It links San Francisco to Marin County, carrying both U.S. Route "
        "101 and California State Route 1 across the strait. The bridge was completed in 1937. ") * 8
RESULTS = Path(__file__).parent / "results"
GEMMA_270M_CONFIG = Path(__file__).parent / "gemma3_270m_config.json"
TORCH_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class PeakRSS:
    """Context manager: the peak resident set size above the level at entry, in bytes (`.peak`)."""

    def __enter__(self) -> PeakRSS:
        self.base = self.peak_abs = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(0.002):
            self.peak_abs = max(self.peak_abs, _rss())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak_abs, _rss()) - self.base


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def gemm_gflops(dtype: str, d: int, F: int) -> float:
    """Best-of-5 rate of a (1024, d) @ (d, F) product at `dtype`, GFLOP/s."""
    rng = np.random.default_rng(0)
    a, b = (jnp.asarray(rng.standard_normal(s), dtype) for s in ((1024, d), (d, F)))
    mm = jax.jit(lambda a, b: jnp.dot(a, b, precision="highest"))
    mm(a, b).block_until_ready()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        mm(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * 1024 * d * F / best / 1e9


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform.processor() is often empty on Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def best_of(call, budget_s: float = 2.0):
    """(seconds, result) of the fastest of repeated calls: one call if it takes over `budget_s`, else
    up to 5 within about that budget (tiny cases are too short for one timing)."""
    best, result, spent = float("inf"), None, 0.0
    for _ in range(5):
        start = time.perf_counter()
        result = call()
        took = time.perf_counter() - start
        best, spent = min(best, took), spent + took
        if spent > budget_s:
            break
    return best, result


def floor_flops(config: eqlin.ModelConfig, T: int) -> float:
    """2 · N_linear · T · d (module docstring)."""
    n_linear = config.num_layers * config.hidden_size * (config.kv_size + config.q_size + 2 * config.intermediate_size)
    return 2.0 * n_linear * T * config.hidden_size


def prompt_ids(model: eqlin.Model, T: int) -> np.ndarray:
    """T token ids: the benchmark text's, or (no tokenizer / too short) a fixed pseudo-random sequence."""
    ids = np.asarray(model.tokenizer.encode(TEXT), np.int32)[:T] if model.tokenizer else np.zeros(0, np.int32)
    if len(ids) < T or (ids >= model.config.vocab_size).any():
        ids = np.random.default_rng(T).integers(3, model.config.vocab_size, T).astype(np.int32)
    return ids


def eqlin_case(model: eqlin.Model, ids: np.ndarray, fold: bool) -> dict:
    """Compile and run eqlin's final-output detached J (folded MLP or not); seconds, peak bytes, error."""
    T, cfg, itemsize, limit = len(ids), model.config, model.dtype.itemsize, memory_limit_bytes()
    fold = fold and estimate_jacobian_bytes(cfg, T, chunk=1, itemsize=itemsize, fold=True) <= limit
    chunk = resolve_chunk(cfg, T, 1, "rev", None, itemsize, limit, fold=fold)
    x = model.embed(ids)
    kw = dict(layers=None, part="residual", scope="cumulative", detach=True, mode="rev", chunk=chunk, fold=fold)
    start = time.perf_counter()
    compiled = jacobian_arrays.lower(model.params, model.config, x, **kw).compile()
    compile_s = time.perf_counter() - start
    with PeakRSS() as mem:
        run_s, out = best_of(lambda: jax.block_until_ready(compiled(model.params, x)))
    return {"compile_s": compile_s, "run_s": run_s, "first_call_s": compile_s + run_s, "peak_bytes": mem.peak,
            "relative_error": float(out[4]), "chunk": chunk, "fold": fold, "jacobian": np.asarray(out[0])}


def torch_jacobian(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The reference approach: the detached J (d, T, d) by vectorized reverse mode, on the model's device."""
    x = ref.embed(model, ids).detach()
    J = torch.autograd.functional.jacobian(lambda e: ref.final_hidden(model, e), x, vectorize=True)
    if TORCH_DEVICE == "cuda":
        torch.cuda.synchronize()
    return J


def torch_case(folder: Path, ids: np.ndarray, dtype: str) -> dict:
    """The reference approach on transformers' model made detached at run time (on CUDA if available)."""
    torch.set_num_threads(os.cpu_count())
    model = ref.make_detached(ref.load_transformers(folder, dtype=getattr(torch, dtype))).to(TORCH_DEVICE)
    ids_t = torch.tensor(ids, device=TORCH_DEVICE)
    torch_jacobian(model, ids_t[:2])  # warm-up (allocator, kernels)
    with PeakRSS() as mem:
        seconds, J = best_of(lambda: torch_jacobian(model, ids_t))
    return {"run_s": seconds, "peak_bytes": mem.peak, "jacobian": J.cpu().numpy()}


def batch_case(model: eqlin.Model, T: int, B: int, single_s: float) -> dict:
    """Throughput of `eqlin.batch` on B ragged prompts (lengths T, T−1, ...), second call, beside
    `single_s`, one unbatched prompt of length T."""
    prompts = [prompt_ids(model, T)[: max(2, T - b)] for b in range(B)]
    detached_jacobians(model, prompts).jacobian.block_until_ready()
    seconds, out = best_of(lambda: jax.block_until_ready(detached_jacobians(model, prompts)))
    return {"B": B, "T_max": T, "seconds": seconds, "prompts_per_s": B / seconds,
            "unbatched_prompts_per_s": 1 / single_s, "max_relative_error": float(jnp.max(out.relative_error))}


def cli_case(text: str) -> dict:
    """End-to-end `eqlin analyze TEXT --layers none` on the embedded model, cache warmed by a first run."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "eqlin.cli", "analyze", text, "--layers", "none", "--out", out, "-q"]
        times = []
        for _ in range(2):
            start = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True)
            times.append(time.perf_counter() - start)
    return {"text": text, "cold_s": times[0], "warm_cache_s": times[1]}


def models(names: list[str], dtype: str, tmp: Path) -> dict[str, tuple[eqlin.Model, Path]]:
    """name -> (eqlin model, the HF-style folder transformers loads)."""
    found = {}
    for name in names:
        if name == "embedded":
            from eqlin.gguf import converted_folder, default_model_path  # needs the embedded model's package

            folder = converted_folder(default_model_path())
        elif name == "gemma270m-random":
            folder = tmp / name
            if not (folder / "config.json").exists():
                config = transformers.AutoConfig.for_model(**__import__("json").loads(GEMMA_270M_CONFIG.read_text()))
                transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
        else:
            folder = tmp / "tiny"
            if not (folder / "config.json").exists():
                folder.mkdir(exist_ok=True)
                make_checkpoint(folder, "gemma3")
        found[name] = (eqlin.load(folder, dtype=dtype), folder)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=["embedded", "tiny", "gemma270m-random"],
                        default=["embedded", "tiny"])
    parser.add_argument("--no-unfolded", action="store_true", help="skip eqlin's unfolded (fold=False) timing")
    parser.add_argument("--lengths", type=int, nargs="+", default=[8, 32], help="T values (128, 512: opt-in)")
    parser.add_argument("--dtypes", nargs="+", choices=["float64", "float32"], default=["float64", "float32"])
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    parser.add_argument("--batch", type=int, default=4, metavar="B", help="prompts in the batch case (0: skip)")
    parser.add_argument("--batch-models", nargs="+", choices=["embedded", "tiny"], default=["tiny"],
                        help="models that run the batch case (default: tiny; embedded is minutes on 2 cores)")
    parser.add_argument("--cli", action="store_true", help="also time the end-to-end CLI (warm cache)")
    parser.add_argument("--out", type=Path, default=None, help="JSON file (default: results/<UTC time>.json)")
    args = parser.parse_args()
    transformers.utils.logging.disable_progress_bar()

    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "cpu": cpu_model(), "cores": os.cpu_count(), "jax_device": jax.devices()[0].device_kind,
            "torch_device": torch.cuda.get_device_name() if TORCH_DEVICE == "cuda" else "cpu",
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "jax": jax.__version__, "torch": torch.__version__, "load_average_start": os.getloadavg()}
    rows, batches = [], []
    result = {"meta": meta, "jacobian": rows, "batch": batches}
    out = args.out or RESULTS / f"{meta['date'].replace(':', '')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        """Rewrite the JSON after every measurement: a crash or ^C later keeps what was measured."""
        result["meta"]["load_average_end"] = os.getloadavg()
        write_json_atomic(out, result)

    print(f"devices: jax {meta['jax_device']}, torch {meta['torch_device']}, cpu {meta['cpu']}", flush=True)
    print(f"{'model':>8} {'dtype':>7} {'T':>4} {'eqlin s':>8} {'compile':>8} {'GFLOP/s':>8} {'floor':>6} "
          f"{'MiB':>6} {'unfold s':>8} {'torch s':>8} {'MiB':>6} {'ratio':>6} {'|ΔJ|':>8} {'load':>5}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in args.dtypes:
            for name, (model, folder) in models(args.models, dtype, Path(tmp)).items():
                cfg = model.config
                for T in args.lengths:
                    ids = prompt_ids(model, T)
                    gemm = gemm_gflops(dtype, cfg.hidden_size, cfg.intermediate_size)
                    flops = floor_flops(cfg, T)
                    e = eqlin_case(model, ids, fold=fold_pays(cfg, cfg.hidden_size))
                    row = {"model": name, "dtype": dtype, "T": T, "gemm_gflops": gemm, "floor_flops": flops,
                           "floor_s": flops / gemm / 1e9, "eqlin": {k: v for k, v in e.items() if k != "jacobian"}}
                    row["eqlin"]["gflops"] = flops / e["run_s"] / 1e9
                    row["eqlin"]["fraction_of_floor"] = row["floor_s"] / e["run_s"]
                    if not args.no_unfolded and e["fold"]:
                        u = eqlin_case(model, ids, fold=False)
                        row["eqlin_unfolded"] = {k: v for k, v in u.items() if k != "jacobian"}
                        row["folded_vs_unfolded"] = float(np.linalg.norm(u["jacobian"] - e["jacobian"])
                                                          / np.linalg.norm(u["jacobian"]))
                    row["load_average"] = os.getloadavg()[0]
                    rows.append(row)
                    save()
                    if not args.no_torch:
                        t = torch_case(folder, ids, dtype)
                        row["torch"] = {"run_s": t["run_s"], "peak_bytes": t["peak_bytes"],
                                        "gflops": flops / t["run_s"] / 1e9}
                        row["torch_over_eqlin"] = t["run_s"] / e["run_s"]
                        row["relative_difference"] = float(np.linalg.norm(t["jacobian"] - e["jacobian"])
                                                           / np.linalg.norm(t["jacobian"]))
                        row["load_average"] = os.getloadavg()[0]
                        save()
                    tr = row.get("torch", {})
                    print(f"{name:>8} {dtype:>7} {T:>4} {e['run_s']:>8.4g} {e['compile_s']:>8.2f} "
                          f"{row['eqlin']['gflops']:>8.1f} {row['eqlin']['fraction_of_floor']:>6.2f} "
                          f"{e['peak_bytes'] / 2**20:>6.0f} "
                          f"{row.get('eqlin_unfolded', {}).get('run_s', float('nan')):>8.4g} "
                          f"{tr.get('run_s', float('nan')):>8.4g} "
                          f"{tr.get('peak_bytes', float('nan')) / 2**20:>6.0f} "
                          f"{row.get('torch_over_eqlin', float('nan')):>6.2f} "
                          f"{row.get('relative_difference', float('nan')):>8.1e} {row['load_average']:>5.2f}", flush=True)
                if args.batch and name in args.batch_models:
                    first = next(r for r in rows if r["model"] == name and r["dtype"] == dtype)
                    b = batch_case(model, first["T"], args.batch, first["eqlin"]["run_s"])
                    b.update(model=name, dtype=dtype, load_average=os.getloadavg()[0])
                    batches.append(b)
                    save()
                    print(f"batch {name} {dtype}: {b['B']} ragged prompts, T_max {b['T_max']}: {b['seconds']:.2f} s, "
                          f"{b['prompts_per_s']:.2f} prompts/s (unbatched {b['unbatched_prompts_per_s']:.2f}), max error {b['max_relative_error']:.1e}", flush=True)
    if args.cli:
        result["cli"] = cli_case("The bridge out of Marin is the")
        print(f"cli: cold {result['cli']['cold_s']:.1f} s, warm cache {result['cli']['warm_cache_s']:.1f} s")
    save()
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
