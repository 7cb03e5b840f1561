"""A steering sweep's presentation, from tables written by hand: steering.json and steering.png as the whole
folder, the JSON equal to the table, a summary that shows both continuations of every cell, and a readable heat
map with one colour scale for both panels."""

from __future__ import annotations

import json

from matplotlib.colors import SymLogNorm
from matplotlib.text import Text

from eqlin import report
from eqlin.outputs import MARKER
from eqlin.steering_report import _heatmap, heatmap_png, summary, write_sweep
from tests.test_report import assert_readable

TABLE = {
    "model": {"source": "tiny", "family": "gemma3", "num_layers": 4}, "dtype": "float64",
    "concept": "The bridge out of Marin is the Golden", "text": "Here is a painting of the",
    "concept_tokens": [{"id": 7, "text": " Golden"}], "max_new_tokens": 4, "layers": [0, 2], "strengths": [1.0, 4.0],
    "baseline": {"text": " cat", "mean_logprob": -3.5},
    "lift": [[0.5, 2.0], [-0.25, 30.0]], "control_lift": [[-1.0, -120.0], [0.0, 0.75]],
    "cells": [{"layer": l, "strength": s, "lift": 0.5, "control_lift": -1.0, "steered_text": f" gate {l} {s}",
               "control_text": f" noise {l} {s}"} for l in (0, 2) for s in (1.0, 4.0)],
}


def test_sweep_folder_and_summary(tmp_path):
    out = tmp_path / "steer"
    write_sweep(TABLE, out)
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "steering.json", "steering.png"]
    assert json.loads((out / "steering.json").read_text()) == TABLE
    assert (out / "steering.png").read_bytes()[:8] == heatmap_png(TABLE)[:8] == b"\x89PNG\r\n\x1a\n"
    printed = summary(TABLE, out)  # both continuations of every cell
    assert all(repr(c["steered_text"]) in printed and repr(c["control_text"]) in printed for c in TABLE["cells"])
    assert str(out / "steering.json") in printed and str(out / "steering.png") in printed


def test_the_steering_heat_map_has_one_scale_for_both_panels():
    """The control's large losses are on the colour scale, not saturated beyond it."""
    table = {"lift": [[0.5, 4.2], [-1.0, 2.0]], "control_lift": [[-23.0, -137.2], [1.3, -5.5]], "layers": [3, 9],
             "strengths": [0.5, 2.0], "concept_tokens": [{"text": " Golden"}], "text": "Here is a painting of the",
             "concept": "The bridge out of Marin is the Golden", "max_new_tokens": 16, "dtype": "float32"}
    fig = report.figure(_heatmap(table), (11, 4))
    assert_readable(fig)
    norms = {im.norm for ax in fig.axes for im in ax.images}
    assert len(norms) == 1 and isinstance(*norms, SymLogNorm)
    (norm,) = norms
    assert norm.vmin <= -137.2 and norm.vmax >= 137.2


def test_dollars_in_the_text_and_concept_are_drawn_as_written(tmp_path):
    """`steer --text 'the dog $$'` used to end in matplotlib's ValueError after the whole sweep."""
    table = {**TABLE, "text": "the dog $$", "concept": "costs $x$", "concept_tokens": [{"id": 7, "text": "$"}]}
    write_sweep(table, tmp_path / "steer")
    assert (tmp_path / "steer" / "steering.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fig = report.figure(_heatmap(table), (11, 4))
    assert "Steering 'the dog $$' with the concept 'costs $x$'\ngreedy, 4 new tokens, float64" == fig.get_suptitle()
    assert not any(t.get_parse_math() for t in fig.findobj(Text) if "$" in t.get_text())
