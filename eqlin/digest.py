"""A report's digest: the few fields of a prompt's report (a line of reports.jsonl) that a prompt set's
summary and its study read, under the same keys, each checked for its type.

A prompt set holds one digest per prompt instead of the report (a report carries every singular value and
decoded token: ~54 KB on a tiny model, a digest a small fraction of it), so its memory grows by a digest
per prompt, and a line edited by hand (a wrong type, a missing key) is named when it is read, never met as a
TypeError halfway through a summary.

digest:
    text, model {source}, token_count (len of the report's tokens)
    next_token {text, probability}; relative_error, plain_relative_error, homogeneity_error;
    logit {relative_error}; layer_analysis {max_relative_error} (null only without layers)
    per_token       [{left_tokens [[u_1's first token]], right_tokens [[v_1's first token]]}]
    layers          [{layer, cumulative {part: {stable_rank, u1_next_token_rank, top_tokens [first],
                    next_token_rank (residual only)}}, single {part: {stable_rank}}}]
"""

from __future__ import annotations

from typing import Any

PARTS = ("residual", "attn", "mlp")
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


def _layer(report: dict[str, Any], i: int) -> dict[str, Any]:
    def cumulative(part: str) -> dict[str, Any]:
        at = ("layers", i, "cumulative", part)
        entry = {"stable_rank": _at(report, *at, "stable_rank", kind="a number"),
                 "u1_next_token_rank": _at(report, *at, "u1_next_token_rank", kind="an integer"),
                 "top_tokens": [_at(report, *at, "top_tokens", 0, kind="a string")]}
        if part == "residual":
            entry["next_token_rank"] = _at(report, *at, "next_token_rank", kind="an integer")
        return entry

    return {"layer": _at(report, "layers", i, "layer", kind="an integer"),
            "cumulative": {part: cumulative(part) for part in PARTS},
            "single": {part: {"stable_rank": _at(report, "layers", i, "single", part, "stable_rank", kind="a number")}
                       for part in PARTS}}


def digest(report: Any) -> dict[str, Any]:
    """`report`'s digest (module docstring); ValueError naming the first field that is missing or of the
    wrong type, e.g. "relative_error is a string, not a number"."""
    if not isinstance(report, dict):
        raise ValueError(f"the line is {_json_type(report)}, not an object")
    layers = _at(report, "layers", kind="a list")
    per_token = _at(report, "per_token", kind="a list")

    def number(*keys: str) -> float:
        return _at(report, *keys, kind="a number")

    return {
        "text": _at(report, "text", kind="a string"),
        "model": {"source": _at(report, "model", "source", kind="a string")},
        "token_count": len(_at(report, "tokens", kind="a list")),
        "next_token": {"text": _at(report, "next_token", "text", kind="a string"),
                       "probability": number("next_token", "probability")},
        "relative_error": number("relative_error"), "plain_relative_error": number("plain_relative_error"),
        "homogeneity_error": number("homogeneity_error"), "logit": {"relative_error": number("logit", "relative_error")},
        "layer_analysis": {"max_relative_error": _at(report, "layer_analysis", "max_relative_error",
                                                     kind="a number" if layers else "a number or null")},
        "per_token": [{side: [[_at(report, "per_token", t, side, 0, 0, kind="a string")]]
                       for side in ("left_tokens", "right_tokens")} for t in range(len(per_token))],
        "layers": [_layer(report, i) for i in range(len(layers))],
    }
