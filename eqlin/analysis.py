"""The main job behind `eqlin analyze`: one next-token prediction, its exact linear map, taken apart.

`analyze(model, text)` returns an `Analysis`: `report` is the content of report.json (schema below,
version "eqlin.report/1"; keys are only ever added) and the remaining fields hold the arrays the
figures need.

report.json:
    schema            "eqlin.report/1"
    model             {source, family, num_layers, hidden_size, vocab_size, parameters}
    dtype             compute dtype, e.g. "float64"
    text              the input text
    tokens            [{position, id, text}] as the model sees them (BOS included where added)
    next_token        {id, text, probability, logit}: the greedy next token
    top_predictions   [{id, text, probability}] the top_k next tokens
    relative_error    ‖y − Σ_t J_t x_t‖ / ‖y‖ of the detached Jacobian (y: final hidden state, last position)
    plain_relative_error   the same for the plain (non-detached) Jacobian: it does not reconstruct
    homogeneity_error ‖y − jvp(f, x; x)‖ / ‖y‖, matrix-free
    logit             {id, value, reconstructed, relative_error}: the next token's logit and Σ_t W_U[id] J_t x_t
    per_token         [{position, token, contribution_norm ‖J_t x_t‖, logit_contribution W_U[id] J_t x_t,
                        singular_values (top_k), effective_dimension {stable_rank, participation_ratio,
                        rank_90, rank_99}, left_tokens (top_k × top_k strings: tokens of each left
                        singular vector through the unembedding), right_tokens (the same for right
                        singular vectors, nearest input embeddings)}]
    layer_maps        {layers: [l…], scope: "cumulative", input → each layer's output read through the final
                        norm; residual / attn / mlp: {stable_rank, participation_ratio, rank_90, rank_99,
                        relative_error}, one value per layer} (empty layers: not computed)
    timings_s         seconds per stage
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from eqlin.decoder import num_params
from eqlin.linear_maps import detached_jacobian, jacobian, logit_map, matrix_free_check
from eqlin.model import Model
from eqlin.progress import stage, steps
from eqlin.selection import PARTS
from eqlin.spectral import decode_spectrum, spectrum

SCHEMA = "eqlin.report/1"


@dataclasses.dataclass(frozen=True)
class Analysis:
    """report: report.json's content. The arrays feed the figures: output y (d,), reconstruction
    Σ_t J_t x_t (d,), plain_reconstruction (d,), jacobian J (d, T, d), singular_values (T, k)."""

    report: dict[str, Any]
    output: np.ndarray
    reconstruction: np.ndarray
    plain_reconstruction: np.ndarray
    jacobian: np.ndarray
    singular_values: np.ndarray


def _f(a) -> float:
    return float(np.asarray(a))


def analyze(model: Model, text: str, *, layers: tuple[int, ...] = (), top_k: int = 5, quiet: bool = True
            ) -> Analysis:
    """Everything `eqlin analyze` reports, for the next-token prediction after `text`."""
    timings: dict[str, float] = {}
    ids = model.encode(text)
    strings = model.token_strings(ids)
    k = min(top_k, model.config.hidden_size)

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
    with timed("detached Jacobian (compile + run)"):
        lin = jax.block_until_ready(detached_jacobian(model, ids))
    with timed("plain Jacobian"):
        plain = jax.block_until_ready(jacobian(model, ids))
    with timed("matrix-free homogeneity check"):
        check = matrix_free_check(model, ids)
    lm = logit_map(model, lin, [int(order[0])])
    with timed("spectra and decoding"):
        spec = decode_spectrum(model, spectrum(lin, k), top=k)

    layer_maps: dict[str, Any] = {"layers": list(layers), "scope": "cumulative"}
    if layers:
        with steps("layer maps", len(PARTS), quiet) as bar:
            start = time.perf_counter()
            for part in PARTS:
                maps = detached_jacobian(model, ids, layer=list(layers), part=part)
                combined = spectrum(maps, per_token=False)
                layer_maps[part] = {**combined.effective.to_dict(),
                                    "relative_error": np.asarray(maps.relative_error).tolist()}
                bar.update()
            timings["layer maps"] = round(time.perf_counter() - start, 3)

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
    next_id = int(order[0])
    report = {
        "schema": SCHEMA,
        "model": {"source": model.source, "family": model.config.family, "num_layers": model.config.num_layers,
                  "hidden_size": model.config.hidden_size, "vocab_size": model.config.vocab_size,
                  "parameters": num_params(model.params)},
        "dtype": str(model.dtype),
        "text": text,
        "tokens": [{"position": t, "id": int(i), "text": s} for t, (i, s) in enumerate(zip(ids, strings))],
        "next_token": {"id": next_id, "text": model.token_strings([next_id])[0], "probability": float(probs[next_id]),
                       "logit": _f(logits[next_id])},
        "top_predictions": [{"id": int(i), "text": model.token_strings([int(i)])[0], "probability": float(probs[i])}
                            for i in order],
        "relative_error": _f(lin.relative_error),
        "plain_relative_error": _f(plain.relative_error),
        "homogeneity_error": _f(check.homogeneity_error),
        "logit": {"id": next_id, "value": _f(lm.logits[0]), "reconstructed": _f(lm.contributions[:, 0].sum()),
                  "relative_error": _f(lm.relative_error[0])},
        "per_token": per_token,
        "layer_maps": layer_maps,
        "timings_s": timings,
    }
    return Analysis(report, np.asarray(lin.output), np.asarray(lin.reconstruction),
                    np.asarray(plain.reconstruction), np.asarray(lin.jacobian), np.asarray(spec.singular_values))
