"""A steering sweep's presentation, from a table written by hand: steering.json and steering.png as the whole
folder, the JSON equal to the table, and a summary that shows both continuations of every cell."""

from __future__ import annotations

import json

from eqlin.steering_report import heatmap_png, summary, write_sweep

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
    assert sorted(p.name for p in out.iterdir()) == ["steering.json", "steering.png"]
    assert json.loads((out / "steering.json").read_text()) == TABLE
    assert (out / "steering.png").read_bytes()[:8] == heatmap_png(TABLE)[:8] == b"\x89PNG\r\n\x1a\n"
    printed = summary(TABLE, out)  # both continuations of every cell
    assert all(repr(c["steered_text"]) in printed and repr(c["control_text"]) in printed for c in TABLE["cells"])
    assert str(out / "steering.json") in printed and str(out / "steering.png") in printed
