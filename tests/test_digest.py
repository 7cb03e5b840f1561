"""A report's digest: the fields a prompt set's summary and study read, equal to the report's, and a field
missing or of the wrong type named by its path."""

from __future__ import annotations

import copy
import json
import tracemalloc

import pytest

from eqlin.digest import PARTS, SCOPES, digest


@pytest.fixture(scope="module")
def report(tiny_report):
    _, out = tiny_report
    return json.loads((out / "report.json").read_text())


def test_a_digest_holds_the_reports_own_values(report):
    d = digest(report)
    rows = report["layers"]
    assert rows and d["layers"] == tuple(row["layer"] for row in rows)
    assert (d["text"], d["source"], d["token_count"]) == (report["text"], report["model"]["source"],
                                                          len(report["tokens"]))
    assert (d["next_token"], d["probability"]) == (report["next_token"]["text"], report["next_token"]["probability"])
    for key in ("relative_error", "plain_relative_error", "homogeneity_error"):
        assert d[key] == report[key]
    assert (d["logit_error"], d["layer_max_error"]) == (report["logit"]["relative_error"],
                                                        report["layer_analysis"]["max_relative_error"])
    assert d["final_u1"] == tuple(p["left_tokens"][0][0] for p in report["per_token"])
    assert d["final_v1"] == tuple(p["right_tokens"][0][0] for p in report["per_token"])
    assert d["lens_rank"] == tuple(row["cumulative"]["residual"]["next_token_rank"] for row in rows)
    for part in PARTS:
        for scope in SCOPES:
            assert d["stable_rank"][scope][part] == tuple(row[scope][part]["stable_rank"] for row in rows)
        assert d["u1_rank"][part] == tuple(row["cumulative"][part]["u1_next_token_rank"] for row in rows)
        assert d["layer_u1"][part] == tuple(row["cumulative"][part]["top_tokens"][0] for row in rows)


def test_a_digest_is_a_small_part_of_its_report_and_shares_its_tokens(report):
    """What a prompt set holds per prompt (issue 29, item 13), measured with tracemalloc."""
    line = json.dumps(report)
    tracemalloc.start()
    try:
        digests = [digest(json.loads(line)) for _ in range(20)]
        held = tracemalloc.get_traced_memory()[0] / len(digests)
        reports = [json.loads(line) for _ in range(20)]
        held_reports = tracemalloc.get_traced_memory()[0] / len(reports) - held
    finally:
        tracemalloc.stop()
    assert held < held_reports / 5, (held, held_reports)
    assert digests[0]["final_u1"][0] is digests[1]["final_u1"][0]  # interned: each distinct token held once


@pytest.mark.parametrize("edit, message", [
    (lambda r: r.update(relative_error="tiny"), "relative_error is a string, not a number"),
    (lambda r: r.update(relative_error=True), "relative_error is a boolean, not a number"),
    (lambda r: r["next_token"].pop("probability"), "next_token.probability is missing"),
    (lambda r: r.update(per_token={}), "per_token is an object, not a list"),
    (lambda r: r["per_token"][1].update(left_tokens=[]), r"per_token\[1\].left_tokens\[0\] is missing"),
    (lambda r: r["layers"][0]["cumulative"]["mlp"].update(u1_next_token_rank=1.5),
     r"layers\[0\].cumulative.mlp.u1_next_token_rank is a number, not an integer"),
    (lambda r: r["layers"][1]["single"].pop("attn"), r"layers\[1\].single.attn is missing"),
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
    assert digest({**report, "layers": [], "layer_analysis": {"max_relative_error": None}})["layers"] == ()
