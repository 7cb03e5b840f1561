"""`eqlin study` on a tiny model: study.json's numbers recomputed from reports.jsonl alone, the figures
present, study.html self-contained (and, where Chromium is installed, opening with every image loaded)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from eqlin.cli import EXIT_OK, main
from tests.browser import needs_chromium, opened
from tests.conftest import TEXT

# Ten tokens with BOS each, as TEXT: the layer maps compiled for the tiny report are reused.
PROMPTS = [TEXT, "The small red boat crossed the river to the", "A cold wind runs over the old city of"]


@pytest.fixture(scope="module")
def study(checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("study")
    (folder / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    out = folder / "out"
    code = main(["study", str(folder / "prompts.txt"), "--model", str(checkpoint("gemma3")), "--out", str(out),
                 "--layers", "all", "--top-k", "3", "-q", "--no-compile-cache"])
    return code, out


def test_the_summary_is_recomputed_from_reports_jsonl(study):
    code, out = study
    assert code == EXIT_OK
    reports = [json.loads(line) for line in (out / "reports.jsonl").read_text().splitlines()]
    summary = json.loads((out / "study.json").read_text())
    assert summary["schema"] == "eqlin.study/1" and summary["reports"] == len(reports) == 3
    errors = [r["relative_error"] for r in reports]
    rec = summary["reconstruction"]
    assert rec["detached"]["max"] == max(errors) <= 1e-13
    assert rec["detached"]["median"] == float(np.median(errors))
    assert rec["detached"]["fraction_at_most_threshold"] == 1.0 and rec["threshold"] == 1e-13
    assert rec["plain"]["median"] == float(np.median([r["plain_relative_error"] for r in reports]))
    assert rec["layer_maps"]["max"] == max(r["layer_analysis"]["max_relative_error"] for r in reports) <= 1e-13
    for scope in ("cumulative", "single"):
        for part in ("residual", "attn", "mlp"):
            rows = summary["stable_rank"][scope][part]
            assert [row["layer"] for row in rows] == [0, 1, 2, 3]
            for row in rows:
                values = [r["layers"][row["layer"]][scope][part]["stable_rank"] for r in reports]
                q1, median, q3 = np.percentile(values, [25, 50, 75])
                assert (row["q1"], row["median"], row["q3"], row["prompts"]) == (q1, median, q3, 3)
    for row in summary["emergence"]["layers"]:
        ranks = [r["layers"][row["layer"]]["cumulative"]["residual"]["next_token_rank"] for r in reports]
        assert row["lens_top1"] == np.mean([k == 0 for k in ranks])
    assert summary["emergence"]["layers"][-1]["lens_top1"] == 1.0  # the last layer's lens is the prediction
    next_tokens = [r["next_token"]["text"] for r in reports]
    assert {t["token"]: t["count"] for t in summary["tokens"]["next_token"]} == {t: next_tokens.count(t)
                                                                                  for t in next_tokens}


def test_study_html_is_self_contained(study):
    _, out = study
    page = (out / "study.html").read_text()
    assert not re.search(r"""(src|href)=["']?(https?:|//|file:)""", page)
    assert page.count("data:image/png;base64,") == 3
    assert {"errors.png", "stable_rank.png", "emergence.png"} <= {p.name for p in out.iterdir()}


@needs_chromium
def test_study_html_opens_in_headless_chromium(study, tmp_path):
    _, out = study
    assert opened(out / "study.html", tmp_path) == {"images": 3, "loaded": 3, "errors": []}


def test_the_emergence_layer_is_where_the_next_token_stays_on_top():
    from eqlin.study import first_layer

    def digest(ranks: dict[int, int]) -> dict:  # the fields of a report's digest (eqlin.digest) it reads
        return {"layers": tuple(ranks), "lens_rank": tuple(ranks.values())}

    assert first_layer(digest({0: 3, 5: 0, 11: 2, 17: 0})) == 17
    assert first_layer(digest({0: 3, 5: 0, 11: 0, 17: 0})) == 5
    assert first_layer(digest({0: 0, 17: 1})) is None and first_layer(digest({})) is None


def test_a_set_with_every_prompt_skipped_still_has_a_study(tmp_path):
    from eqlin.study import render_html, summarize

    record = {"prompts_file": "p.txt", "prompts": 1, "request": {"source": "m", "checkpoint": "c", "dtype": "float64",
              "layers": "none", "top_k": 5, "branch_tap": "post", "layer_engine": "auto"},
              "skipped": [{"line": 1, "text": "x " * 99, "reason": "100 tokens, more than the model's 64 positions"}]}
    summary = summarize([], [], record)
    assert summary["reconstruction"] is None and summary["reports"] == 0
    assert "100 tokens, more than the model" in render_html(summary, {})
