"""A steering sweep's presentation: the heat map, steering.json and steering.png written as one set, and
the terminal summary (the sweep itself: `eqlin.steering.steering_sweep`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from eqlin.figure_text import literal
from eqlin.outputs import json_text, write_folder_atomic
from eqlin.report import render_png

SWEEP_KIND = "steering sweep"  # the kind of output folder `write_sweep` writes (eqlin.outputs.MARKER)


def heatmap_png(table: dict[str, Any]) -> bytes:
    """Two heat maps side by side (steered lift, random-control lift) on one shared colour scale that
    holds every value of both (symmetric logarithmic beyond ±1 nat, so lifts of a few nats and control
    losses of a hundred both show), every cell annotated with its value."""
    return render_png(_heatmap(table), (11, 0.55 * len(table["layers"]) + 2.8))


def _heatmap(table: dict[str, Any]):
    """heatmap_png's drawing, `draw(fig)`."""
    from matplotlib.colors import SymLogNorm

    lift, control = np.asarray(table["lift"]), np.asarray(table["control_lift"])
    lim = max(float(np.abs(lift).max()), float(np.abs(control).max()), 1.0)
    norm = SymLogNorm(linthresh=1.0, vmin=-lim, vmax=lim, base=10)
    tokens = " ".join(repr(t["text"]) for t in table["concept_tokens"])

    def draw(fig):
        axes = fig.subplots(1, 2, sharey=True)
        for ax, values, title in ((axes[0], lift, "concept map J_c"),
                                  (axes[1], control, "control: random operator with J_c's Frobenius norm")):
            im = ax.imshow(values, cmap="RdBu_r", norm=norm, aspect="auto")
            ax.set_xticks(range(len(table["strengths"])), [f"{s:g}" for s in table["strengths"]])
            ax.set_yticks(range(len(table["layers"])), [str(l) for l in table["layers"]])
            ax.set_xlabel("strength λ (‖v‖ = λ/2 · ‖h‖)")
            ax.set_title(title, fontsize=10)
            for (i, j), v in np.ndenumerate(values):
                ax.text(j, i, f"{v:+.2f}", ha="center", va="center", fontsize=8,
                        color="white" if abs(norm(v) - 0.5) > 0.3 else "black")
        axes[0].set_ylabel("layer l (v added to the stream entering it)")
        bar = fig.colorbar(im, ax=list(axes), fraction=0.04)
        bar.set_label(f"lift of mean log p({tokens}) over the unsteered run, nats\n(one scale for both panels; "
                      "linear within ±1, logarithmic beyond)", fontsize=8, **literal(tokens))
        fig.suptitle(f"Steering {table['text']!r} with the concept {table['concept']!r}\n"
                     f"greedy, {table['max_new_tokens']} new tokens, {table['dtype']}", fontsize=10,
                     **literal(table["text"], table["concept"]))

    return draw


def write_sweep(table: dict[str, Any], out: Path) -> list[Path]:
    """Write steering.json and steering.png as the whole content of `out`, swapped into place as one set."""
    return write_folder_atomic(out, {"steering.json": json_text(table).encode(), "steering.png": heatmap_png(table)},
                               kind=SWEEP_KIND)


def summary(table: dict[str, Any], out: Path) -> str:
    """The terminal summary of a sweep: lift and control lift per (layer, strength), both continuations each."""
    tokens = " ".join(repr(t["text"]) for t in table["concept_tokens"])
    lines = [
        f"model: {table['model']['source']} ({table['model']['family']}), dtype {table['dtype']}",
        f"concept: {table['concept']!r}   text: {table['text']!r}   scored tokens: {tokens}",
        f"baseline continuation: {table['baseline']['text']!r} (mean log p {table['baseline']['mean_logprob']:.3f})",
        "",
        "layer  strength      lift   control   continuations: steered, then control",
    ]
    for c in table["cells"]:
        lines += [f"{c['layer']:>5} {c['strength']:>9g} {c['lift']:>9.3f} {c['control_lift']:>9.3f}   {c['steered_text']!r}",
                  f"{'':>35}   {c['control_text']!r}"]
    lines += ["", f"table: {out / 'steering.json'}, heat map: {out / 'steering.png'}"]
    return "\n".join(lines)
