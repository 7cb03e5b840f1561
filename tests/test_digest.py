"""A report's digest: the fields a prompt set's summary and study read, equal to the report's, and a field
missing or of the wrong type named by its path."""

from __future__ import annotations

import copy
import json

import pytest

from eqlin.digest import PARTS, digest


@pytest.fixture(scope="module")
def report(tiny_report):
    _, out = tiny_report
    return json.loads((out / "report.json").read_text())


def test_a_digest_holds_the_reports_own_values(report):
    d = digest(report)
    assert report["layers"] and len(d["layers"]) == len(report["layers"])
    assert d["text"] == report["text"] and d["token_count"] == len(report["tokens"])
    assert d["next_token"] == {k: report["next_token"][k] for k in ("text", "probability")}
    for key in ("relative_error", "plain_relative_error", "homogeneity_error"):
        assert d[key] == report[key]
    assert d["logit"]["relative_error"] == report["logit"]["relative_error"]
    assert [p["left_tokens"][0][0] for p in d["per_token"]] == [p["left_tokens"][0][0] for p in report["per_token"]]
    for mine, theirs in zip(d["layers"], report["layers"]):
        assert mine["layer"] == theirs["layer"]
        for part in PARTS:
            assert mine["single"][part]["stable_rank"] == theirs["single"][part]["stable_rank"]
            assert {k: theirs["cumulative"][part][k] for k in mine["cumulative"][part] if k != "top_tokens"} == {
                k: v for k, v in mine["cumulative"][part].items() if k != "top_tokens"}
            assert mine["cumulative"][part]["top_tokens"][0] == theirs["cumulative"][part]["top_tokens"][0]
    assert len(json.dumps(d)) < len(json.dumps(report)) / 4


@pytest.mark.parametrize("edit, message", [
    (lambda r: r.update(relative_error="tiny"), "relative_error is a string, not a number"),
    (lambda r: r.update(relative_error=True), "relative_error is a boolean, not a number"),
    (lambda r: r["next_token"].pop("probability"), "next_token.probability is missing"),
    (lambda r: r.update(per_token={}), "per_token is an object, not a list"),
    (lambda r: r["per_token"][1].update(left_tokens=[]), r"per_token\[1\].left_tokens\[0\] is missing"),
    (lambda r: r["layers"][0]["cumulative"]["mlp"].update(u1_next_token_rank=1.5),
     r"layers\[0\].cumulative.mlp.u1_next_token_rank is a number, not an integer"),
    (lambda r: r["layer_analysis"].update(max_relative_error=None),
     "layer_analysis.max_relative_error is null, not a number"),
])
def test_a_field_missing_or_of_the_wrong_type_is_named(report, edit, message):
    edited = copy.deepcopy(report)
    edit(edited)
    with pytest.raises(ValueError, match=rf"^{message}$"):
        digest(edited)
    with pytest.raises(ValueError, match="^the line is a list, not an object$"):
        digest([report])


def test_without_layers_the_largest_layer_error_may_be_null(report):
    assert digest({**report, "layers": [], "layer_analysis": {"max_relative_error": None}})["layers"] == []
