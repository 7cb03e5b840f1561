"""Notebook and console display: one-line reprs and compact HTML tables (`_repr_html_`) that name the map,
give shapes, the reconstruction error and top decoded tokens, and never print a whole Jacobian."""

from __future__ import annotations

import json

import jax
import pytest

import eqlin
from eqlin.analysis import analyze
from eqlin.display import layers_text, token_heatmap, visible
from tests.conftest import TEXT

CONCEPT = "The bridge out of Marin is the Golden"


@pytest.fixture(scope="module")
def model(loaded) -> eqlin.Model:
    return loaded("gemma3")


def compact(html: str, limit: int = 20_000) -> str:
    assert len(html) < limit and html.startswith('<div class="eqlin">')
    return html


def test_model_repr_is_one_line(model):
    text = repr(model)
    assert "\n" not in text and len(text) < 300
    assert text.startswith("Model(gemma3, 4 layers, d = 48") and "float64" in text


def test_linearization(model):
    lin = eqlin.detached_jacobian(model, TEXT)
    d, T = model.config.hidden_size, len(model.encode(TEXT))
    text = repr(lin)
    assert "\n" not in text and f"J ({d}, {T}, {d}) float64" in text
    assert f"relative error {float(lin.relative_error):.1e}" in text
    page = compact(lin._repr_html_())
    assert "final hidden state" in page and f"{float(lin.relative_error):.1e}" in page
    assert page.count("<tr>") <= T + 10  # one row per position, not per entry of J
    layers = eqlin.detached_jacobian(model, TEXT, layer=[1, 3], part="mlp")
    assert "layers 1, 3: MLP branch" in repr(layers) and "max " in repr(layers)
    assert "relative error" in compact(layers._repr_html_())


def test_a_traced_linearization_still_shows(model):
    lin = eqlin.detached_jacobian(model, TEXT)
    shown = []

    @jax.jit
    def f(lin):
        shown.append(repr(lin))
        return lin.output

    f(lin)
    assert "(traced)" in shown[0] and "J (48," in shown[0]


def test_spectrum(model):
    lin = eqlin.detached_jacobian(model, TEXT)
    raw = eqlin.spectrum(lin, k=3)
    assert "per token, k=3" in repr(raw) and "decoded" not in repr(raw)
    compact(raw._repr_html_())
    spec = eqlin.decode_spectrum(model, raw, top=2)
    page = compact(spec._repr_html_())
    assert "decoded" in repr(spec)
    for t in range(len(model.encode(TEXT))):  # each token's u_1 top token is shown
        assert visible(spec.left_tokens.tokens[t][0][0]) in page


def test_layer_spectra_and_analysis(model):
    result = analyze(model, TEXT, layers=(0, 3), top_k=3)
    story = result.layer_spectra
    assert repr(story).startswith("LayerSpectra(layers 0, 3;") and "\n" not in repr(story)
    assert repr(story.maps["single"]["attn"]).startswith("MapSpectra(2 layers")
    compact(story._repr_html_())
    text = repr(result)
    assert "\n" not in text and text.startswith(f"Analysis({TEXT!r} → ") and "2 layers analysed" in text
    page = compact(result._repr_html_(), 40_000)
    assert "Contribution to the logit of the next token" in page and "linear-gradient" in page


def test_steering_results(model):
    result = eqlin.steer(model, CONCEPT, "Here is a painting of the", layer=2, strength=1.0, max_new_tokens=3)
    assert repr(result).startswith(f"SteeringResult(concept {CONCEPT!r}") and "\n" not in repr(result)
    assert "steered continuation" in compact(result._repr_html_())
    table = eqlin.steering_sweep(model, CONCEPT, "Here is a painting of the", layers=[2], strengths=[1.0],
                                 max_new_tokens=2)
    assert json.loads(json.dumps(table)) == table  # still the plain table of steering.json
    assert "random control" in compact(table._repr_html_())


def test_layer_lists_stay_short():
    assert layers_text(range(18)) == "0–17" and layers_text([0, 5]) == "0, 5"
    assert layers_text(range(0, 40, 2)) == "0, 2, 4, 6, 8, 10, 12, 14, … (20 in all)"


def test_the_heat_map_scale_and_its_legend():
    page = token_heatmap(["<bos>", " a", " b"], [10.0, 1.0, -0.5], signed=True, label="share")
    assert "position 0 (+10) lies beyond it" in page and "-1 " in page  # scale set by the others: ±1
    page = token_heatmap(["<bos>", " a", " b"], [1.0, 1.0, -0.5], signed=True, label="share")
    assert "beyond" not in page and "␣a" in page and "-1 " in page


def test_progress_bars_suit_notebooks():
    import tqdm.auto

    from eqlin import progress

    assert progress.tqdm is tqdm.auto.tqdm
