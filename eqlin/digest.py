"""A report's digest: the few fields of a prompt's report (a line of reports.jsonl) that a prompt set's
summary and its study read, each checked for its type, in a compact form.

A prompt set holds one digest per prompt instead of the report (a report carries every singular value and
decoded token: ~33 KB as Python objects on a tiny model), so its memory grows by a digest per prompt (a few
numbers per analysed layer; decoded tokens are interned, so each distinct token is held once), and a line
edited by hand (a wrong type, a missing key) is named when it is read, never met as a TypeError halfway
through a summary.

digest:
    text, source (model.source), token_count (len of tokens), next_token (its text), probability
    relative_error, plain_relative_error, homogeneity_error, logit_error (logit.relative_error),
    layer_max_error (layer_analysis.max_relative_error; None only without layers)
    final_u1, final_v1  per position: the first token of J_t's u_1 / v_1 (per_token[t].left_tokens[0][0],
                        right_tokens[0][0])
    layers              the analysed layers; per layer, in that order:
    stable_rank         {scope: {part: stable ranks}} (layers[i][scope][part].stable_rank)
    lens_rank           the next token's rank in the logit lens (layers[i].cumulative.residual.next_token_rank)
    u1_rank, layer_u1   {part: ...}: the next token's rank under the cumulative map's u_1, and u_1's first token
"""

from __future__ import annotations

import sys
from typing import Any

SCOPES, PARTS = ("cumulative", "single"), ("residual", "attn", "mlp")
_KINDS: dict[str, tuple[type, ...]] = {"a string": (str,), "a number": (int, float), "an integer": (int,),
                                       "a list": (list,), "a number or null": (int, float, type(None))}


def _path(keys: tuple[str | int, ...]) -> str:
    return "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in keys).lstrip(".")


def _json_type(value: Any) -> str:
    names = {str: "a string", bool: "a boolean", int: "a number", float: "a number", list: "a list", dict: "an object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _at(value: Any, *keys: str | int, kind: str) -> Any:
    """value[k0][k1]…, of `kind` (a key of _KINDS; booleans are not numbers); ValueError naming the path."""
    for i, key in enumerate(keys):
        present = (isinstance(value, dict) and key in value) if isinstance(key, str) else (
            isinstance(value, list) and key < len(value))
        if not present:
            raise ValueError(f"{_path(keys[:i + 1])} is missing")
        value = value[key]
    if isinstance(value, bool) or not isinstance(value, _KINDS[kind]):
        raise ValueError(f"{_path(keys)} is {_json_type(value)}, not {kind}")
    return value


def digest(report: Any) -> dict[str, Any]:
    """`report`'s digest (module docstring); ValueError naming the first field that is missing or of the
    wrong type, e.g. "relative_error is a string, not a number"."""
    if not isinstance(report, dict):
        raise ValueError(f"the line is {_json_type(report)}, not an object")
    n_layers = len(_at(report, "layers", kind="a list"))
    positions = range(len(_at(report, "per_token", kind="a list")))

    def number(*keys: str) -> float:
        return _at(report, *keys, kind="a number")

    def token(*keys: str | int) -> str:
        return sys.intern(_at(report, *keys, kind="a string"))

    def per_layer(scope: str, part: str, key: str, kind: str) -> tuple:
        return tuple(_at(report, "layers", i, scope, part, key, kind=kind) for i in range(n_layers))

    return {
        "text": _at(report, "text", kind="a string"), "source": token("model", "source"),
        "token_count": len(_at(report, "tokens", kind="a list")),
        "next_token": token("next_token", "text"), "probability": number("next_token", "probability"),
        "relative_error": number("relative_error"), "plain_relative_error": number("plain_relative_error"),
        "homogeneity_error": number("homogeneity_error"), "logit_error": number("logit", "relative_error"),
        "layer_max_error": _at(report, "layer_analysis", "max_relative_error",
                               kind="a number" if n_layers else "a number or null"),
        "final_u1": tuple(token("per_token", t, "left_tokens", 0, 0) for t in positions),
        "final_v1": tuple(token("per_token", t, "right_tokens", 0, 0) for t in positions),
        "layers": tuple(_at(report, "layers", i, "layer", kind="an integer") for i in range(n_layers)),
        "stable_rank": {scope: {part: per_layer(scope, part, "stable_rank", "a number") for part in PARTS}
                        for scope in SCOPES},
        "lens_rank": per_layer("cumulative", "residual", "next_token_rank", "an integer"),
        "u1_rank": {part: per_layer("cumulative", part, "u1_next_token_rank", "an integer") for part in PARTS},
        "layer_u1": {part: tuple(token("layers", i, "cumulative", part, "top_tokens", 0) for i in range(n_layers))
                     for part in PARTS},
    }
