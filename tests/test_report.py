"""The report: every figure titled and labelled, with colour bars, no overlapping text and honest about
what it shows; report.html with the token heat maps and every column explained, self-contained, opening in
headless Chromium with every figure loaded and no console errors (skipped, with the reason, only where
Chromium is not installed and EQLIN_REQUIRE_CHROMIUM is not set: CI sets it, so there a missing browser fails)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil

import numpy as np
import pytest
from matplotlib.text import Text

from eqlin import report
from tests.browser import needs_chromium, opened
from tests.conftest import TEXT


def test_report_is_self_contained(tiny_report):
    _, out = tiny_report
    page = (out / "report.html").read_text()
    assert not re.search(r"""(src|href)=["']?(https?:|//|file:)""", page)
    assert page.count("data:image/png;base64,") == 5


@needs_chromium
def test_report_opens_in_headless_chromium(tiny_report, tmp_path):
    _, out = tiny_report
    assert opened(out / "report.html", tmp_path) == {"images": 5, "loaded": 5, "errors": []}


# --- figures: labelled, with colour bars, no overlapping text, honest about what they show ---------------

def drawn_texts(fig) -> list:
    """(text, window extent) of every piece of text the figure actually draws (ticks out of view and
    empty strings are not drawn)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.text import Text

    canvas, drawn, original = FigureCanvasAgg(fig), [], Text.draw

    def record(self, renderer):
        original(self, renderer)
        if self.get_visible() and self.get_text().strip():
            drawn.append((self.get_text(), self.get_window_extent(renderer)))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Text, "draw", record)
        canvas.draw()
    return drawn


def assert_readable(fig) -> None:
    """A title on every plot (or the figure), both axis labels, a labelled colour bar for every image and
    colour scale, no two pieces of text overlapping, and all text inside the figure."""
    colorbars = [ax for ax in fig.axes if getattr(ax, "_colorbar", None) is not None]
    plots = [ax for ax in fig.axes if ax not in colorbars]
    suptitle = fig.get_suptitle()
    scales = {id(image.norm) for ax in plots for image in ax.images if image.colorbar is not None}
    for ax in plots:
        assert ax.get_title() or suptitle, "an untitled plot"
        shared = ax.get_shared_y_axes().get_siblings(ax)  # a shared y axis is labelled once
        assert ax.get_xlabel() and any(other.get_ylabel() for other in shared), f"unlabelled axes in {ax.get_title()!r}"
        for image in ax.images:  # its own colour bar, or the same scale as one that has one
            assert id(image.norm) in scales, f"an image without a colour bar in {ax.get_title()!r}"
    for ax in colorbars:
        assert ax.get_ylabel() or ax.get_xlabel(), "an unlabelled colour bar"
    texts = drawn_texts(fig)
    inside = fig.bbox.padded(1)
    for text, box in texts:
        assert inside.x0 <= box.x0 and box.x1 <= inside.x1 and inside.y0 <= box.y0 and box.y1 <= inside.y1, (
            f"{text!r} runs off the figure")
    overlaps = [(a, b) for i, (a, box_a) in enumerate(texts) for b, box_b in texts[i + 1:]
                if box_a.padded(-1).overlaps(box_b.padded(-1))]
    assert not overlaps, f"overlapping text: {overlaps[:5]}"


@pytest.fixture(scope="module")
def analysis(loaded):
    from eqlin.analysis import analyze

    return analyze(loaded("gemma3"), TEXT, layers=(0, 1, 2, 3), top_k=3)


@pytest.fixture(scope="module")
def free_analysis(loaded):
    from eqlin.analysis import analyze

    return analyze(loaded("gemma3"), TEXT, top_k=3, analysis="matrix-free", quiet=True)


@pytest.mark.parametrize("name", list(report.FIGURES))
def test_every_figure_is_labelled_and_its_text_does_not_overlap(analysis, free_analysis, name):
    draw = {"reconstruction.png": report._reconstruction, "jacobian.png": report._jacobian,
            "spectra.png": report._spectra, "emergence.png": report._emergence,
            "dimensionality.png": report._dimensionality, "spectrum.png": report._combined_spectrum}[name]
    assert_readable(report.figure(draw(free_analysis if name == "spectrum.png" else analysis), (11, 6)))


def test_a_matrix_free_report_says_what_is_absent_and_why(matrix_free_report, tmp_path):
    """No J: report.html shows the token-combined spectrum, says plainly why the per-token sections are absent,
    is self-contained and opens with both figures loaded."""
    _, out, *_ = matrix_free_report
    page, data = (out / "report.html").read_text(), json.loads((out / "report.json").read_text())
    assert not re.search(r"""(src|href)=["']?(https?:|//|file:)""", page)
    assert page.count("data:image/png;base64,") == 2 and page.count("<figcaption>") == 2
    assert "This is a matrix-free analysis: J was not built (the full J does not fit the memory budget)" in page
    assert "Contribution to the logit" not in page and "The token-combined map&#x27;s top singular triplets" not in page
    assert "The token-combined map's top singular triplets" in page and "v_i reads" in page
    for s in data["spectrum"]["singular_values"]:
        assert f"<b>{s:.4g}</b>" in page
    assert "No layer maps: layers [0, 1, 2, 3] asked, not computed in a matrix-free analysis" in page
    assert "matrix-free (J never built): the full J does not fit the memory budget; the full J at T=10" in page
    if shutil.which("chromium") or os.environ.get("EQLIN_REQUIRE_CHROMIUM"):
        assert opened(out / "report.html", tmp_path) == {"images": 2, "loaded": 2, "errors": []}


def test_long_inputs_thin_their_labels(analysis):
    """With 40 tokens: at most 16 token labels along jacobian.png, and spectra.png colours positions
    instead of listing 40 legend entries."""
    T = 40
    per_token = [dict(analysis.report["per_token"][t % 3], position=t) for t in range(T)]
    long = dataclasses.replace(
        analysis, report={**analysis.report, "tokens": [{"position": t, "id": 0, "text": f" word{t}"} for t in range(T)],
                          "per_token": per_token},
        jacobian=np.random.default_rng(0).normal(size=(48, T, 48)), singular_values=np.tile(analysis.singular_values[:1], (T, 1)))
    for draw in (report._jacobian, report._spectra):
        fig = report.figure(draw(long), (11, 6))
        assert_readable(fig)
        assert len(fig.axes[0].get_xticklabels()) <= report.MAX_TICK_LABELS
        assert fig.axes[0].get_legend() is None


def test_block_extremes_keep_every_extreme_and_stay_within_each_token():
    rng = np.random.default_rng(1)
    J = rng.normal(size=(50, 3, 40))
    J[7, 1, 13] = 100.0  # one outlier: nearest-neighbour sampling would mostly drop it
    J[0, 2, 0] = -100.0
    image, bh, bw = report.block_extremes(J, rows=20, cols=30)
    assert image.shape[0] <= 20 and image.shape[1] <= 30 and image.shape[1] % 3 == 0
    per_token = image.shape[1] // 3
    assert image.max() == 100.0 and image.min() == -100.0
    assert image[7 // bh, per_token * 1 + 13 // bw] == 100.0 and image[0, per_token * 2] == -100.0
    for t in range(3):  # each token's pixels come from its own J_t
        block = image[:, per_token * t:per_token * (t + 1)]
        assert np.abs(block).max() == np.abs(J[:, t]).max()
    same, one, also_one = report.block_extremes(J, rows=50, cols=120)
    assert (one, also_one) == (1, 1) and np.array_equal(same, J.reshape(50, 120))


# --- report.html: the heat maps, every column explained, tokens that do not wrap ---------------------------

def test_report_html_has_the_token_heat_maps_and_explains_its_tables(tiny_report):
    _, out = tiny_report
    page = (out / "report.html").read_text()
    data = json.loads((out / "report.json").read_text())
    assert "<th></th>" not in page  # no empty header row
    assert "Contribution to the logit of the next token" in page and "Size of each token" in page
    assert page.count("linear-gradient") == 2  # a colour legend for each heat map
    for p in data["per_token"]:  # every token's value is on the page, in both heat maps
        assert f"{p['logit_contribution']:+.3g}" in page and f"{p['contribution_norm']:.3g}" in page
    for column in ("‖J_t x_t‖", "logit contribution", "stable rank", "σ_i", "u_i", "v_i", "u_1's top"):
        assert column in page, column
    assert "white-space:pre" in page  # tokens never wrap inside
    assert page.count("<figcaption>") == 5 and "J_0 … J_{T−1}" in page
    printed = report.summary(data, out)
    assert f"matrix-free homogeneity error ‖y − jvp(f, x; x)‖/‖y‖: {data['homogeneity_error']:.2e}" in printed


def test_terminal_tables_align_wide_characters():
    assert report._ljust("'焦點'", 8) == "'焦點'  " and report._rjust("'่อย'", 6) == "  '่อย'"


def test_tokens_with_dollars_are_drawn_as_written(analysis):
    """Tokens and a next token holding `$` (mathtext's delimiter: `$$` used to end the report in ValueError, `$x$`
    to render as math) appear in the figures as written."""
    tokens = ["$x$", "$$", " a\\$"]
    rows = analysis.report["per_token"]
    dollars = dataclasses.replace(analysis, report={
        **analysis.report, "next_token": {**analysis.report["next_token"], "text": "$$"},
        "tokens": [dict(t, text=tokens[i % 3]) for i, t in enumerate(analysis.report["tokens"])],
        "per_token": [dict(r, token=tokens[i % 3], left_tokens=[["$y$", *r["left_tokens"][0][1:]], *r["left_tokens"][1:]])
                      for i, r in enumerate(rows)]})
    for draw, shown in ((report._jacobian, "1: $$"), (report._spectra, "0: $x$  → u_1: $y$"),
                        (report._emergence, "rank of $$ among u_1's tokens\n(log10(1 + rank); 0: on top)")):
        fig = report.figure(draw(dollars), (11, 6))
        assert shown in [text for text, _ in drawn_texts(fig)]
        assert not any(t.get_parse_math() for t in fig.findobj(Text) if "$" in t.get_text())
    assert report.render_png(report._emergence(dollars), (11, 6)).startswith(b"\x89PNG")
