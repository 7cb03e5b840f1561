"""The main job behind `eqlin analyze`: one next-token prediction, its exact linear map, taken apart.

`analyze(model, text)` returns an `Analysis`: `report` is the content of report.json (schema below,
version "eqlin.report/1"; keys are only ever added) and the remaining fields hold the arrays the
figures need.

report.json:
    schema            "eqlin.report/1"
    model             {source, family, num_layers, hidden_size, vocab_size, parameters, checkpoint: the identity of
                        the checkpoint's content (`eqlin.model.checkpoint_identity`; null where not given)}
    dtype             compute dtype, e.g. "float64"
    options           {layers: [l…] analysed, top_k, branch_tap, layer_engine, analysis ("auto", "full" or
                        "matrix-free": as asked)}: the options that shape the report
    analysis          "full" (J built: everything below) or "matrix-free" (J never built: `eqlin.top_singular` of
                        the token-combined map; per_token, spectrum and layer_analysis as marked below)
    plan              why: {analysis, asked, reason (in words), length T, k, limit (the budget in bytes), basis (what
                        the budget is taken from), full_bytes, top_k_bytes (estimated peaks), longest_full (the
                        longest T whose full analysis fits; 0: none), full_flops (J's), flops_per_second (a float64
                        GEMM rate measured here) and full_seconds (their quotient): both null for a full analysis}
    text              the input text
    tokens            [{position, id, text}] as the model sees them (BOS included where added)
    next_token        {id, text, probability, logit}: the greedy next token
    top_predictions   [{id, text, probability}] the top_k next tokens
    relative_error    ‖y − (Σ_t J_t x_t + c)‖ / ‖y‖ of the detached Jacobian (y: final hidden state, last
                        position; c: the constant, 0 without biases)
    plain_relative_error   the same for the plain (non-detached) Jacobian: it does not reconstruct (computed from
                        one JVP, J·x = Σ_t J_t x_t, without forming the plain J)
    homogeneity_error ‖y − jvp(f, x; x)‖ / ‖y‖, matrix-free
    logit             {id, value, reconstructed, relative_error, constant}: the next token's logit,
                        Σ_t W_U[id] J_t x_t + W_U[id] c, and the constant's share W_U[id] c
    constant          {norm ‖c‖, relative_norm ‖c‖ / ‖y‖, logit W_U[next] c, tokens}: the constant c of the
                        affine map y = Σ_t J_t x_t + c (the frozen network at zero input: the biases carried
                        through; exactly 0 for bias-free models, see `eqlin.linear_maps`), with tokens its top_k
                        tokens through the unembedding (empty when c = 0). The spectra are J's alone
    per_token         [{position, token, contribution_norm ‖J_t x_t‖, logit_contribution W_U[id] J_t x_t,
                        singular_values (top_k), effective_dimension {stable_rank, participation_ratio,
                        rank_90, rank_99}, left_tokens (top_k × top_k strings: tokens of each left
                        singular vector through the unembedding), right_tokens (the same for right
                        singular vectors, nearest input embeddings)}]; matrix-free: [{position, token,
                        right_weight (k: ‖v_i[t]‖², token t's share of each right singular vector v_i of the
                        token-combined map; each v_i's shares sum to 1), right_tokens (k × top_k: v_i's block at t
                        by cosine nearest input embeddings)}] (J_t x_t needs J or one JVP per token: absent)
    spectrum          matrix-free only: {map "token-combined", method "lanczos", k, singular_values (k), left_tokens
                        (k × top_k: u_i through the unembedding), relative_error of the map's linearization}
    layer_maps        {layers: [l…], scope: "cumulative", input → each layer's output read through the final
                        norm; residual / attn / mlp: {stable_rank, participation_ratio, rank_90, rank_99,
                        relative_error}, one value per layer} (empty layers: not computed); the cumulative
                        half of "layers", kept for readers of earlier reports
    layers            [{layer: l, cumulative: P, single: P}] one entry per analysed layer, ascending (empty:
                        none analysed; see `eqlin.layer_story`). cumulative: input embeddings → layer l's
                        output; single: the residual stream entering layer l → its output; every output at the
                        last position through the final norm. P = {residual: M, attn: M, mlp: M}, where
                        M = {relative_error ‖y − Σ_t J_t x_t‖/‖y‖, stable_rank, participation_ratio, rank_90,
                        rank_99, singular_values (top_k, descending), top_tokens (u_1 through the
                        unembedding, top_k strings, best first), singular_vector_tokens (the same for
                        u_1 … u_k), next_token_rank and next_token_probability (the model's next token in
                        the logit lens of the map's output y: 0 = on top), u1_next_token_rank (the next
                        token's rank in u_1's unembedding scores: 0 = u_1 decodes to it)}
    layer_analysis    {layers, tap ("post" or "pre": attention / MLP branches read after or before the
                        family's branch post-norms), tap_meaning, engines {scope: "fwd" or "rev"},
                        max_relative_error over every layer map, skipped: why no layer map was computed although
                        layers were asked (a matrix-free analysis), else null}
    timings_s         seconds per stage
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from typing import Any, Callable, ContextManager, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from eqlin import display
from eqlin.decoder import num_params
from eqlin.errors import InputError, MemoryBudgetError
from eqlin.layer_story import Engine, LayerSpectra, layer_spectra
from eqlin.linear_maps import Linearization, detached_jacobian, logit_map, matrix_free_check
from eqlin.memory import (budget_basis, estimate_analysis_bytes, estimate_top_k_bytes, format_bytes, jacobian_flops,
                          largest_fitting, memory_limit_bytes)
from eqlin.model import Model
from eqlin.params import widen
from eqlin.progress import shown, stage
from eqlin.selection import Tap, evenly_spaced
from eqlin.spectral import Spectrum, decode_spectrum, match_tokens, spectrum, top_singular

SCHEMA = "eqlin.report/1"
ANALYSES = ("auto", "full", "matrix-free")  # analyze's `analysis` (--analysis): what `plan_analysis` may pick


@dataclasses.dataclass(frozen=True)
class Analysis:
    """report: report.json's content. The arrays feed the figures: output y (d,), reconstruction
    Σ_t J_t x_t + c (d,), plain_reconstruction J_plain·x (d,), jacobian J (d, T, d), singular_values (T, k)
    of each J_t. linearization: the final detached map itself (`Linearization.save` writes it).
    A matrix-free analysis (report["analysis"]) builds no J: jacobian and linearization are None,
    singular_values (k,) are the token-combined map's and spectrum holds its triplets (`top_singular`)."""

    report: dict[str, Any]
    output: np.ndarray
    reconstruction: np.ndarray
    plain_reconstruction: np.ndarray
    jacobian: np.ndarray | None
    singular_values: np.ndarray
    layer_spectra: LayerSpectra | None = None
    linearization: Linearization | None = None
    spectrum: Spectrum | None = None

    def __repr__(self) -> str:
        return display.analysis_repr(self)

    def _repr_html_(self) -> str:
        return display.analysis_html(self)


TAP_MEANING = {
    "post": "attention and MLP branches are read after the family's branch post-norms (exactly what each adds to "
            "the residual stream; Gemma's post_attention_layernorm / post_feedforward_layernorm, OLMo 2's "
            "post-norms; other families have none)",
    "pre": "attention and MLP branches are read before the family's branch post-norms (o_proj and down_proj "
           "outputs, as the paper's code reads Gemma; the same as post where a family has no post-norms)",
}
AUTO_ALL_LAYERS_UP_TO = 16  # tokens: 'auto' analyses every layer up to this length, else six of them


def auto_layers(num_layers: int, length: int) -> tuple[int, ...]:
    """What --layers auto means at `length` tokens: every layer up to `AUTO_ALL_LAYERS_UP_TO` tokens (the
    forward engine's cost grows as T²), else six evenly spaced layers ending at the last."""
    return tuple(range(num_layers)) if length <= AUTO_ALL_LAYERS_UP_TO else evenly_spaced(num_layers, 6)


def _f(a) -> float:
    return float(np.asarray(a))


def gemm_flops_per_second(dtype, n: int = 768, repeats: int = 3) -> float:
    """This machine's rate for an (n × n) @ (n × n) matrix product in `dtype` on JAX's default device,
    measured (compiled once, then `repeats` products timed): a yardstick for how long a computation of
    known flops takes (about 0.1 s in float64 on a 2-core CPU)."""
    a = jnp.ones((n, n), dtype)
    jax.block_until_ready(_gemm(a))
    start = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(_gemm(a))
    return 2 * n**3 * repeats / max(time.perf_counter() - start, 1e-9)


_gemm = jax.jit(lambda a: jnp.matmul(a, a, precision=jax.lax.Precision.HIGHEST))


@dataclasses.dataclass(frozen=True)
class Plan:
    """How `analyze` takes the final map apart, decided before anything is allocated.

    analysis: "full" (J built: per-token spectra) or "matrix-free" (`eqlin.top_singular`: the top-k of the
    token-combined map, J never built); asked: the `analysis` argument; reason: why, in words; limit: the
    budget in bytes and basis what it is taken from; full_bytes, top_k_bytes: the estimated peaks
    (`eqlin.memory.estimate_analysis_bytes`, `estimate_top_k_bytes`); longest_full: the longest input whose
    full analysis fits (0: none); full_flops: J's flops (`eqlin.memory.jacobian_flops`); flops_per_second:
    a float64 GEMM rate measured here (`gemm_flops_per_second`; None where not measured)."""

    analysis: str
    asked: str
    reason: str
    length: int
    k: int
    limit: int
    basis: str
    full_bytes: int
    top_k_bytes: int
    longest_full: int
    full_flops: int
    flops_per_second: float | None = None

    @property
    def full_seconds(self) -> float | None:
        """The full J's estimated time here (its flops at the measured rate), None where not measured."""
        return None if self.flops_per_second is None else self.full_flops / self.flops_per_second

    def to_dict(self) -> dict[str, Any]:
        return {**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, "full_seconds": self.full_seconds}

    def note(self) -> str:
        """One line for stderr: why the matrix-free analysis runs, with the estimates."""
        took = (f", about {duration_text(self.full_seconds)} at the {self.flops_per_second / 1e9:.0f} GFLOP/s measured "
                "here" if self.full_seconds is not None else "")
        longest = f"T={self.longest_full:,}" if self.longest_full else "none, not even T=1"
        return (f"eqlin: {self.reason}: the full J at T={self.length} needs about {format_bytes(self.full_bytes)}"
                f"{took}; budget {format_bytes(self.limit)} ({self.basis}); longest input whose full J fits: "
                f"{longest}; running the matrix-free analysis (top-{self.k} of the token-combined map, about "
                f"{format_bytes(self.top_k_bytes)}; J never built)")


def duration_text(seconds: float) -> str:
    """seconds as s, min or h, whichever reads best."""
    if seconds < 10:
        return f"{seconds:.2g} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def plan_analysis(model: Model, length: int, *, k: int, analysis: str = "auto", memory_limit: int | None = None,
                  given: bool = False) -> Plan:
    """The `Plan` for `length` tokens and the top `k` triplets: with analysis "auto", the full analysis where
    its estimate fits the budget (`memory_limit` bytes, default `eqlin.memory.memory_limit_bytes`), else the
    matrix-free one; "full" or "matrix-free" as asked. `given`: the caller computed J already (full).
    MemoryBudgetError for "full" that does not fit, and when neither fits, naming what would."""
    if analysis not in ANALYSES:
        raise InputError(f"analysis must be one of {', '.join(ANALYSES)}, got {analysis!r}")
    if given and analysis == "matrix-free":
        raise InputError("lin is a full J: analysis='matrix-free' never builds one; leave lin out, or use "
                         "analysis='full' or 'auto'")
    config, itemsize = model.config, model.dtype.itemsize
    limit = memory_limit_bytes(memory_limit, params=model.params)

    def full(t: int) -> int:
        return estimate_analysis_bytes(config, t, itemsize=itemsize)

    def top(t: int, size: int = itemsize) -> int:
        return estimate_top_k_bytes(config, t, k=k, itemsize=size)

    longest = largest_fitting(full, config.max_position_embeddings, limit) if full(1) <= limit else 0
    plan = Plan("full", analysis, "", length, k, limit, "memory_limit" if memory_limit is not None else budget_basis(),
                full(length), top(length), longest, jacobian_flops(config, length))
    if given:
        return dataclasses.replace(plan, reason="J computed by the caller (lin)")
    if analysis == "full" or (analysis == "auto" and plan.full_bytes <= limit):
        if plan.full_bytes > limit:
            fixes = f"at most T={longest:,} tokens, " if longest else ""
            raise MemoryBudgetError(
                f"the full analysis at T={length} needs about {format_bytes(plan.full_bytes)} (J one basis vector "
                f"at a time, and its per-token SVDs), over the {format_bytes(limit)} budget ({plan.basis}); use the "
                f"matrix-free analysis (analysis='auto' or 'matrix-free', eqlin analyze --analysis: top-{k} of the map "
                f"without building J, about {format_bytes(plan.top_k_bytes)}), {fixes}or a higher limit (memory_limit "
                "or EQLIN_MEMORY_LIMIT_GB)")
        reason = "asked (analysis='full')" if analysis == "full" else "the full J fits the memory budget"
        return dataclasses.replace(plan, reason=reason)
    if plan.top_k_bytes > limit:
        fixes = ([f"a shorter text (the top-{k} fits up to T={largest_fitting(top, length - 1, limit):,})"]
                 if length > 1 and top(1) <= limit else [])
        if itemsize > 4:
            fixes.append(f"--dtype float32 (about {format_bytes(top(length, 4))}, float32's larger error)")
        fixes.append("a higher limit (memory_limit or EQLIN_MEMORY_LIMIT_GB) on a machine or GPU with more memory")
        raise MemoryBudgetError(
            f"neither analysis fits the {format_bytes(limit)} budget ({plan.basis}) at T={length}: the full J needs "
            f"about {format_bytes(plan.full_bytes)}, the matrix-free top-{k} about {format_bytes(plan.top_k_bytes)}; "
            f"use {' or '.join(fixes)}")
    reason = ("matrix-free analysis as asked (analysis='matrix-free')" if analysis == "matrix-free"
              else "the full J does not fit the memory budget")
    return dataclasses.replace(plan, analysis="matrix-free", reason=reason,
                               flops_per_second=gemm_flops_per_second(model.dtype))


def analyze(model: Model, text: str, *, layers: tuple[int, ...] = (), top_k: int = 5, tap: Tap = "post",
            engine: Engine = "auto", checkpoint: str | None = None, lin: Linearization | None = None,
            analysis: str = "auto", memory_limit: int | None = None, quiet: bool | None = None) -> Analysis:
    """Everything `eqlin analyze` reports, for the next-token prediction after `text`: the final map,
    and for each of `layers` the six layer maps (`eqlin.layer_story`, branches read at `tap`).
    `checkpoint`: the checkpoint's identity, recorded in the report. `lin`: the final detached map of
    `text` if already computed (e.g. by `eqlin.detached_jacobians` for a batch), else it is computed here.
    `analysis`: "auto" (the full analysis where J fits `memory_limit`, else the matrix-free one, said on
    stderr), "full" or "matrix-free" (`plan_analysis`; MemoryBudgetError where nothing asked fits)."""
    quiet = not shown(quiet)
    timings: dict[str, float] = {}
    ids = model.encode(text)
    strings = model.token_strings(ids)
    k = min(top_k, model.config.hidden_size)
    plan = plan_analysis(model, len(ids), k=k, analysis=analysis, memory_limit=memory_limit, given=lin is not None)
    if plan.analysis == "matrix-free":
        print(plan.note(), file=sys.stderr, flush=True)  # never a silent fallback, quiet or not

    @contextlib.contextmanager
    def timed(name: str) -> Iterator[None]:
        with stage(name, quiet):
            start = time.perf_counter()
            yield
            timings[name] = round(time.perf_counter() - start, 3)

    with timed("forward"):
        logits = model.logits(ids)[-1]
        probs = np.asarray(jax.nn.softmax(logits))
    order = np.argsort(-probs)[:top_k]
    next_id = int(order[0])
    report = {
        "schema": SCHEMA,
        "model": {"source": model.source, "family": model.config.family, "num_layers": model.config.num_layers,
                  "hidden_size": model.config.hidden_size, "vocab_size": model.config.vocab_size,
                  "parameters": num_params(model.params), "checkpoint": checkpoint,
                  "allowed_keys": list(model.allowed_keys)},
        "dtype": str(model.dtype),
        "options": {"layers": list(layers), "top_k": top_k, "branch_tap": tap, "layer_engine": engine,
                    "analysis": analysis},
        "analysis": plan.analysis,
        "plan": plan.to_dict(),
        "text": text,
        "tokens": [{"position": t, "id": int(i), "text": s} for t, (i, s) in enumerate(zip(ids, strings))],
        "next_token": {"id": next_id, "text": model.token_strings([next_id])[0], "probability": float(probs[next_id]),
                       "logit": _f(logits[next_id])},
        "top_predictions": [{"id": int(i), "text": model.token_strings([int(i)])[0], "probability": float(probs[i])}
                            for i in order],
    }
    if plan.analysis == "matrix-free":
        return _matrix_free_analysis(model, ids, strings, report, k=k, layers=layers, tap=tap, timed=timed,
                                     quiet=quiet, timings=timings)
    if lin is None:
        with timed("detached Jacobian (compile + run)"):
            lin = jax.block_until_ready(detached_jacobian(model, ids, memory_limit=memory_limit))
    elif not np.array_equal(np.asarray(lin.ids), ids) or lin.jacobian.ndim != 3:
        raise InputError("lin must be the final detached map of this text's tokens")
    with timed("plain Jacobian's reconstruction (one JVP)"):
        plain = jax.block_until_ready(matrix_free_check(model, ids, detach=False))
    with timed("matrix-free homogeneity check"):
        check = matrix_free_check(model, ids)
    lm = logit_map(model, lin, [next_id])
    with timed("spectra and decoding"):
        spec = decode_spectrum(model, spectrum(lin, k), top=k)

    story = None
    layer_maps: dict[str, Any] = {"layers": list(layers), "scope": "cumulative"}
    if layers:
        with timed("layer maps (both scopes, three parts)"):
            story = layer_spectra(model, ids, layers=list(layers), k=k, top=k, tap=tap, engine=engine, quiet=quiet)
        for part, maps in story.maps["cumulative"].items():
            layer_maps[part] = {**maps.effective.to_dict(), "relative_error": maps.relative_error.tolist()}

    per_token = []
    for t, token in enumerate(strings):
        effective = {name: np.asarray(v)[t].item() for name, v in spec.effective.to_dict().items()}
        per_token.append({
            "position": t, "token": token,
            "contribution_norm": _f(jnp.linalg.norm(lin.contributions[t])),
            "logit_contribution": _f(lm.contributions[t, 0]),
            "singular_values": np.asarray(spec.singular_values[t]).tolist(),
            "effective_dimension": effective,
            "left_tokens": spec.left_tokens.tokens[t],
            "right_tokens": [row[:k] for row in spec.right_tokens.tokens[t]],
        })
    report.update({
        "relative_error": _f(lin.relative_error),
        "plain_relative_error": _f(plain.homogeneity_error),
        "homogeneity_error": _f(check.homogeneity_error),
        "logit": {"id": next_id, "value": _f(lm.logits[0]),
                  "reconstructed": _f(lm.contributions[:, 0].sum() + lm.constant[0]),
                  "relative_error": _f(lm.relative_error[0]), "constant": _f(lm.constant[0])},
        "constant": _constant(model, lin.constant, lin.output, _f(lm.constant[0]), k),
        "per_token": per_token,
        "layer_maps": layer_maps,
        "layers": story.to_list() if story else [],
        "layer_analysis": {"layers": list(layers), "tap": tap, "tap_meaning": TAP_MEANING[tap],
                           "engines": story.engines if story else {},
                           "max_relative_error": story.max_relative_error if story else None, "skipped": None},
        "timings_s": timings,
    })
    return Analysis(report, np.asarray(lin.output), np.asarray(lin.reconstruction),
                    np.asarray(plain.homogeneity), np.asarray(lin.jacobian), np.asarray(spec.singular_values),
                    story, lin)


def _constant(model: Model, c: jax.Array, y: jax.Array, logit: float, k: int) -> dict[str, Any]:
    """report.json's "constant": ‖c‖, ‖c‖ / ‖y‖, its logit share and (c ≠ 0) its top k tokens."""
    norm = _f(jnp.linalg.norm(c))
    return {"norm": norm, "relative_norm": norm / _f(jnp.linalg.norm(y)), "logit": logit,
            "tokens": match_tokens(model, c, k, "output").tokens if norm > 0 else []}


LAYERS_SKIPPED = ("not computed in a matrix-free analysis: each cumulative layer map is as large as J, which did "
                  "not fit; eqlin.top_singular(model, text, k, layer=l) gives one layer's top-k without building it")


def _matrix_free_analysis(model: Model, ids: np.ndarray, strings: list[str], report: dict[str, Any], *, k: int,
                          layers: tuple[int, ...], tap: Tap, timed: Callable[[str], ContextManager[None]],
                          quiet: bool, timings: dict[str, float]) -> Analysis:
    """`analyze`'s matrix-free half: the top-k triplets of the token-combined map (`top_singular`), decoded;
    y = J x + c and the plain map's J x from one JVP each; the next token's logit through W_U[next]."""
    with timed(f"matrix-free top-{k} (Lanczos)"):
        spec = jax.block_until_ready(top_singular(model, ids, k, quiet=quiet))
    with timed("plain map's reconstruction (one JVP)"):
        plain = jax.block_until_ready(matrix_free_check(model, ids, detach=False, per_token=False))
    with timed("detached map's reconstruction and constant (one JVP)"):
        check = jax.block_until_ready(matrix_free_check(model, ids, per_token=False))
    with timed("spectrum decoding"):
        spec = decode_spectrum(model, spec, top=k)
    next_id = report["next_token"]["id"]
    w = widen(model.params.unembedding[next_id], model.dtype)  # W_U[next] (d,)
    value, linear, const = (_f(jnp.dot(w, v, precision=jax.lax.Precision.HIGHEST))
                            for v in (check.output, check.homogeneity, check.constant))
    weights = np.square(np.linalg.norm(np.asarray(spec.V), axis=1))  # (T, k): ‖v_i's block at token t‖²
    per_token = [{"position": t, "token": token, "right_weight": weights[t].tolist(),
                  "right_tokens": [row[:k] for row in spec.right_tokens.tokens[t]]}
                 for t, token in enumerate(strings)]
    report.update({
        "relative_error": _f(spec.relative_error),
        "plain_relative_error": _f(plain.homogeneity_error),
        "homogeneity_error": _f(check.homogeneity_error),
        "logit": {"id": next_id, "value": value, "reconstructed": linear + const,
                  "relative_error": abs(value - (linear + const)) / max(abs(value), np.finfo(np.float64).tiny),
                  "constant": const},
        "constant": _constant(model, check.constant, check.output, const, k),
        "spectrum": {"map": "token-combined", "method": spec.method, "k": k,
                     "singular_values": np.asarray(spec.singular_values).tolist(),
                     "left_tokens": spec.left_tokens.tokens, "relative_error": _f(spec.relative_error)},
        "per_token": per_token,
        "layer_maps": {"layers": [], "scope": "cumulative"},
        "layers": [],
        "layer_analysis": {"layers": [], "tap": tap, "tap_meaning": TAP_MEANING[tap], "engines": {},
                           "max_relative_error": None,
                           "skipped": f"layers {list(layers)} asked, {LAYERS_SKIPPED}" if layers else None},
        "timings_s": timings,
    })
    return Analysis(report, np.asarray(check.output), np.asarray(check.homogeneity + check.constant),
                    np.asarray(plain.homogeneity), None, np.asarray(spec.singular_values), spectrum=spec)
