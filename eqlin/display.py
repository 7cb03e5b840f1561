"""Compact displays of eqlin's results: one-line `repr`s and small HTML tables for notebooks
(`_repr_html_`), and the token heat map that report.html shows.

A display names the map, gives the shapes, the reconstruction error and the top decoded tokens; it never
prints a whole Jacobian or a whole vocabulary of logits. Every function takes the result object and
reads only its fields, so this module imports none of the modules that define them.
"""

from __future__ import annotations

import html
from typing import Any, Sequence

import numpy as np

MAX_ROWS = 24  # positions or layers listed in a notebook table; the rest are summarised
_CELL = "border:1px solid #ccc;padding:2px 6px;text-align:left;vertical-align:top"
_TOKEN = "font-family:monospace;white-space:pre;background:#f3f3f3;border-radius:3px;padding:0 2px"


# --------------------------------------------------------------------------------------------------
# Small pieces.


def visible(token: str) -> str:
    """A token with its whitespace made visible: space '␣', newline '⏎', tab '⇥'; other control characters
    as escapes; '∅' for the empty string."""
    marks = {" ": "␣", "\n": "⏎", "\t": "⇥"}
    return "".join(marks.get(c) or (c if c.isprintable() else c.encode("unicode_escape").decode())
                   for c in token) or "∅"


def token_html(token: str) -> str:
    """A token as an HTML <code> span that never wraps, whitespace visible."""
    return f'<code style="{_TOKEN}">{html.escape(visible(token))}</code>'


def tokens_html(tokens: Sequence[str]) -> str:
    return " ".join(token_html(t) for t in tokens)


def concrete(a: Any) -> np.ndarray | None:
    """a as a NumPy array, or None while it is a tracer (inside jit, vmap or grad)."""
    try:
        return np.asarray(a)
    except Exception:  # a tracer cannot be turned into values
        return None


def shape_text(a: Any) -> str:
    """'(640, 8, 640) float64'."""
    return f"({', '.join(str(n) for n in a.shape)}{',' if len(a.shape) == 1 else ''}) {a.dtype}"


def nbytes_text(a: Any) -> str:
    n = int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def error_text(err: Any) -> str:
    """A reconstruction error, or the largest of several, as '1.3e-15' ('max 2.7e-15 over 3 maps')."""
    values = concrete(err)
    if values is None:
        return "(traced)"
    if values.ndim == 0:
        return f"{float(values):.1e}"
    return f"max {float(values.max()):.1e} over {values.size} maps"


def describe_map(layer: Any, part: str, scope: str, detach: bool = True, tap: str = "post") -> str:
    """In words, which map: its input, its output, and whether it is detached."""
    kind = "detached map:" if detach else "plain (not detached) Jacobian:"
    if layer is None:
        what = "input embeddings → final hidden state"
    else:
        layers = f"layers {layers_text(layer)}" if isinstance(layer, tuple) else f"layer {layer}"
        branch = {"residual": "residual stream after it", "attn": "attention branch", "mlp": "MLP branch"}[part]
        if part != "residual":
            branch += f" ({tap} its post-norm)"
        source = "input embeddings" if scope == "cumulative" else (
            f"residual stream entering {'each' if isinstance(layer, tuple) else 'it'}")
        what = f"{source} → {layers}: {branch}"
    return f"{kind} {what}, read at the last position through the final norm"


def _table(rows: Sequence[Sequence[str]], header: Sequence[str] | None = None, raw: bool = True) -> str:
    """An HTML table; cells are HTML already (raw) or escaped."""
    def cell(c: Any, tag: str) -> str:  # values never wrap; headers may
        style = _CELL + (";white-space:nowrap" if tag == "td" else "")
        return f'<{tag} style="{style}">{c if raw else html.escape(str(c))}</{tag}>'

    head = "" if header is None else "<thead><tr>" + "".join(cell(h, "th") for h in header) + "</tr></thead>"
    body = "".join("<tr>" + "".join(cell(c, "td") for c in row) + "</tr>" for row in rows)
    return f'<table style="border-collapse:collapse;font-size:0.9em;margin:0.4em 0">{head}<tbody>{body}</tbody></table>'


def _fields(rows: Sequence[tuple[str, str]]) -> str:
    """A two-column table of (name, HTML value) with the names as row headers."""
    body = "".join(f'<tr><th style="{_CELL}">{html.escape(k)}</th><td style="{_CELL}">{v}</td></tr>' for k, v in rows)
    return f'<table style="border-collapse:collapse;font-size:0.9em;margin:0.4em 0"><tbody>{body}</tbody></table>'


def _box(title: str, body: str) -> str:
    return f'<div class="eqlin"><b>{html.escape(title)}</b>{body}</div>'


def _rows_note(n: int) -> str:
    return f"<p><i>first {MAX_ROWS} of {n} rows shown</i></p>" if n > MAX_ROWS else ""


# --------------------------------------------------------------------------------------------------
# The token heat map (report.html and the notebook display of an Analysis).


def _hex(rgba: Sequence[float]) -> str:
    return "#" + "".join(f"{round(255 * c):02x}" for c in rgba[:3])


def _ink(rgba: Sequence[float]) -> str:
    """Black or white text, whichever reads better on the colour."""
    r, g, b = rgba[:3]
    return "#000" if 0.299 * r + 0.587 * g + 0.114 * b > 0.55 else "#fff"


def token_heatmap(tokens: Sequence[str], values: Sequence[float], *, signed: bool, label: str,
                  number: str = "{:+.3g}") -> str:
    """The input text as coloured tokens, one value each (shown under the token and on hover), with a
    colour legend. signed: a diverging scale (blue < 0 < red) symmetric about 0 at ±max|value|; else a
    sequential one from 0 to max(value). Where position 0 (BOS, usually: an attention sink) outweighs
    every other position more than twice, the scale is set by the others and position 0 is drawn at the
    end of the scale, which the legend says."""
    from matplotlib import colormaps

    values = np.asarray(values, dtype=float)
    cmap = colormaps["RdBu_r" if signed else "Purples"]
    magnitude = np.abs(values)
    rest = float(magnitude[1:].max()) if values.size > 1 else 0.0
    first_beyond = rest > 0 and magnitude[0] > 2 * rest
    lim = (rest if first_beyond else float(magnitude.max())) or 1.0

    def position(v: float) -> float:
        v = float(np.clip(v, -lim, lim))
        return 0.5 + 0.5 * v / lim if signed else 0.85 * v / lim  # Purples' darkest end is hard to read on

    spans = []
    for t, (token, v) in enumerate(zip(tokens, values)):
        rgba = cmap(position(v))
        spans.append(
            f'<span title="t = {t}: {html.escape(repr(token))}, {html.escape(number.format(v))}" '
            f'style="display:inline-block;text-align:center;margin:2px 1px;padding:2px 4px;border-radius:3px;'
            f'background:{_hex(rgba)};color:{_ink(rgba)}"><code style="white-space:pre;font-size:1.05em">'
            f'{html.escape(visible(token))}</code><br><small>{html.escape(number.format(v))}</small></span>')
    stops = np.linspace(-1, 1, 9) if signed else np.linspace(0, 1, 9)
    gradient = ", ".join(_hex(cmap(position(s * lim))) for s in stops)
    low = number.format(-lim) if signed else number.format(0).lstrip("+")
    legend = (f'<div style="font-size:0.85em;margin:2px 0 10px 0">{html.escape(low)} '
              f'<span style="display:inline-block;width:220px;height:10px;vertical-align:middle;'
              f'background:linear-gradient(to right, {gradient})"></span> {html.escape(number.format(lim))} '
              f'&nbsp; {html.escape(label)}'
              + (f"; the scale is set by positions 1 … {values.size - 1}: position 0 "
                 f"({html.escape(number.format(values[0]))}) lies beyond it and is drawn at its end" if first_beyond else "")
              + '</div>')
    return f'<div style="line-height:1.3">{"".join(spans)}</div>{legend}'


def matrix_free(report: dict[str, Any]) -> bool:
    """Whether an analysis report comes from the matrix-free analysis (no J built; reports before it was
    added are all full)."""
    return report.get("analysis") == "matrix-free"


NO_J = ("This is a matrix-free analysis: J was not built ({reason}), so what needs J itself is absent: each "
        "token's contribution J_t x_t, the per-token maps J_t and their spectra, the picture of J and the layer "
        "maps. Everything below comes from the token-combined map [J_0 … J_{{T−1}}] through products with J and "
        "Jᵀ.")


def contribution_heatmaps(report: dict[str, Any]) -> str:
    """Both heat maps of an analysis report: each input token's exact share of the predicted logit,
    W_U[next] · J_t x_t (signed; they sum to the logit), and ‖J_t x_t‖, with what they mean. A matrix-free
    report has neither: its heat map is each token's share of the top right singular vector v_1."""
    if matrix_free(report):
        tokens = [p["token"] for p in report["per_token"]]
        return (f"<p>{html.escape(NO_J.format(reason=report['plan']['reason']))} The logit of the next token is "
                f"reconstructed from one JVP: W_U[next] · J x{' + W_U[next] · c' if report['constant']['norm'] else ''}"
                f" = {report['logit']['reconstructed']:.6f}, the logit itself is {report['logit']['value']:.6f} "
                f"(relative difference {report['logit']['relative_error']:.1e}).</p><p><b>Where the map's top "
                "direction reads</b>: ‖v_1[t]‖², token t's share of the top right singular vector v_1 (they sum to "
                "1).</p>"
                + token_heatmap(tokens, [p["right_weight"][0] for p in report["per_token"]], signed=False,
                                label="‖v_1[t]‖²", number="{:.3g}"))
    per_token, logit, nt = report["per_token"], report["logit"], report["next_token"]
    tokens = [p["token"] for p in per_token]
    shares = [p["logit_contribution"] for p in per_token]
    norms = [p["contribution_norm"] for p in per_token]
    name = html.escape(repr(nt["text"]))
    return (
        f"<p><b>Contribution to the logit of the next token {name}</b>: W_U[{name}] · J_t x_t for each input "
        f"token t, signed (red raises the logit, blue lowers it). The values add up exactly: "
        f"Σ_t = {logit['reconstructed']:.6f}, the logit itself is {logit['value']:.6f} (relative difference "
        f"{logit['relative_error']:.1e}).</p>"
        + token_heatmap(tokens, shares, signed=True, label=f"logit contribution W_U[{nt['text']!r}] · J_t x_t")
        + "<p><b>Size of each token's contribution to the output</b>: ‖J_t x_t‖, the norm of the vector that "
          "token t adds to the final hidden state y = Σ_t J_t x_t (in any direction, not only the predicted "
          "token's).</p>"
        + token_heatmap(tokens, norms, signed=False, label="‖J_t x_t‖", number="{:.3g}"))


# --------------------------------------------------------------------------------------------------
# Linearization, Spectrum, LayerSpectra, MapSpectra.


def linearization_repr(lin: Any) -> str:
    J = lin.jacobian
    return (f"Linearization({describe_map(lin.layer, lin.part, lin.scope, lin.detach, lin.tap)}; "
            f"J {shape_text(J)}; relative error {error_text(lin.relative_error)})")


def linearization_html(lin: Any) -> str:
    J, err = lin.jacobian, concrete(lin.relative_error)
    rows = [("map", html.escape(describe_map(lin.layer, lin.part, lin.scope, lin.detach, lin.tap))),
            ("J (.jacobian)", f"{shape_text(J)}, {nbytes_text(J)}: y = Σ_t J_t x_t"),
            ("x (.inputs)", shape_text(lin.inputs)), ("y (.output)", shape_text(lin.output)),
            ("relative reconstruction error ‖y − Σ_t J_t x_t‖ / ‖y‖", error_text(lin.relative_error))]
    ids = None if lin.ids is None else concrete(lin.ids)  # None: a map at embeddings given directly
    contributions = concrete(lin.contributions)
    body = _fields(rows)
    if isinstance(lin.layer, tuple) and err is not None:
        body += _table([[str(l), f"{e:.1e}"] for l, e in list(zip(lin.layer, err))[:MAX_ROWS]],
                       ["layer", "relative error"]) + _rows_note(len(lin.layer))
    elif ids is not None and contributions is not None:
        norms = np.linalg.norm(contributions, axis=-1)
        body += ("<p>‖J_t x_t‖ per input position (what each token adds to y):</p>"
                 + _table([[str(t), str(i), f"{n:.3g}"] for t, (i, n) in list(enumerate(zip(ids, norms)))[:MAX_ROWS]],
                          ["t", "token id", "‖J_t x_t‖"]) + _rows_note(len(ids)))
    return _box("Linearization", body)


def spectrum_repr(spec: Any) -> str:
    s = concrete(spec.singular_values)
    top = "" if s is None else f"; σ_1 {float(np.max(s)):.3g}"
    kind = "per token" if spec.per_token else "token-combined"
    return (f"Spectrum({kind}, k={spec.singular_values.shape[-1]}, {spec.method}; "
            f"{describe_map(spec.layer, spec.part, spec.scope, spec.detach)}; singular_values "
            f"{shape_text(spec.singular_values)}{top}; relative error {error_text(spec.relative_error)}"
            f"{'' if spec.left_tokens is None else '; decoded'})")


def spectrum_html(spec: Any) -> str:
    s = concrete(spec.singular_values)
    kind = "one SVD per input token J_t" if spec.per_token else "the token-combined map [J_0 … J_{T−1}]"
    rows = [("map", html.escape(describe_map(spec.layer, spec.part, spec.scope, spec.detach))),
            ("spectrum", f"{kind}, top {spec.singular_values.shape[-1]} ({spec.method})"),
            ("relative reconstruction error", error_text(spec.relative_error))]
    body = _fields(rows)
    if s is None or isinstance(spec.layer, tuple):
        return _box("Spectrum", body + ("" if s is None else f"<p>singular values {shape_text(s)}; use "
                                        ".select(i) for one layer's map</p>"))
    left = spec.left_tokens.tokens if spec.left_tokens is not None else None
    right = spec.right_tokens.tokens if spec.right_tokens is not None else None
    legend = ("<p>σ_i: singular values; u_i → the tokens of u_i through the unembedding (logit lens), "
              "v_i → the input embeddings nearest to v_i (cosine); top token of each, best first.</p>")
    eff = concrete(spec.effective.stable_rank) if spec.effective is not None else None
    if spec.per_token:
        ids = None if spec.ids is None else concrete(spec.ids)  # None: a map at embeddings given directly
        table = []
        for t in range(min(s.shape[0], MAX_ROWS)):
            row = [str(t), "—" if ids is None else str(ids[t]), ", ".join(f"{v:.3g}" for v in s[t])]
            row += [] if eff is None else [f"{eff[t]:.2f}"]
            row += [] if left is None else [tokens_html([left[t][i][0] for i in range(len(left[t]))])]
            row += [] if right is None else [tokens_html([right[t][i][0] for i in range(len(right[t]))])]
            table.append(row)
        header = (["t", "token id", "σ_1 … σ_k"] + ([] if eff is None else ["stable rank"])
                  + ([] if left is None else ["u_1 … u_k → top token"])
                  + ([] if right is None else ["v_1 … v_k → top token"]))
        body += legend + _table(table, header) + _rows_note(s.shape[0])
    else:
        table = [[str(i + 1), f"{v:.4g}"] + ([] if left is None else [tokens_html(left[i][:5])]) for i, v in enumerate(s)]
        body += legend + _table(table, ["i", "σ_i"] + ([] if left is None else ["u_i → top tokens"]))
    return _box("Spectrum", body)


def map_spectra_repr(maps: Any) -> str:
    n, k = maps.singular_values.shape
    return (f"MapSpectra({n} layers, top {k} singular values each; stable rank "
            f"{float(np.min(maps.effective.stable_rank)):.3g}…{float(np.max(maps.effective.stable_rank)):.3g}; "
            f"max relative error {float(np.max(maps.relative_error)):.1e})")


def layers_text(layers: Sequence[int]) -> str:
    """'0–17' for consecutive layers, else the list (its first 8 and a count beyond)."""
    layers = list(layers)
    if len(layers) > 2 and layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}–{layers[-1]}"
    return ", ".join(map(str, layers[:8])) + (f", … ({len(layers)} in all)" if len(layers) > 8 else "")


def layer_spectra_repr(story: Any) -> str:
    scopes = ", ".join(story.maps)
    return (f"LayerSpectra(layers {layers_text(story.layers)}; scopes {scopes} × parts residual, attn, mlp; tap "
            f"{story.tap}; max relative error {story.max_relative_error:.1e})")


def layer_spectra_html(story: Any) -> str:
    scopes = list(story.maps)
    parts = ("residual", "attn", "mlp")
    first = story.maps[scopes[0]]
    header = (["layer"] + [f"stable rank, {s} {p}" for s in scopes for p in parts]
              + [f"u_1 → ({scopes[0]} {p})" for p in parts] + ["next token's logit-lens rank", "max error"])
    rows = []
    for i, layer in enumerate(story.layers[:MAX_ROWS]):
        row = [str(layer)] + [f"{story.maps[s][p].effective.stable_rank[i]:.2f}" for s in scopes for p in parts]
        row += [token_html(first[p].top_tokens[i][0][0]) + (" ✓" if first[p].u1_next_token_rank[i] == 0 else "")
                for p in parts]
        row += [str(int(first["residual"].next_token_rank[i])),
                f"{max(float(story.maps[s][p].relative_error[i]) for s in scopes for p in parts):.1e}"]
        rows.append(row)
    note = (f"<p>Six exact maps per layer (scope × part), outputs at the last position through the final norm; "
            f"attention and MLP read {story.tap} their post-norms. ✓: u_1 decodes to the model's next token "
            f"(id {story.next_token}); logit-lens rank 0: the stream already predicts it. Largest relative "
            f"reconstruction error {story.max_relative_error:.1e}.</p>")
    return _box("LayerSpectra", note + _table(rows, header) + _rows_note(len(story.layers)))


# --------------------------------------------------------------------------------------------------
# Analysis.


def analysis_repr(result: Any) -> str:
    r = result.report
    what = (f"matrix-free top-{len(result.singular_values)}" if result.jacobian is None
            else f"J {shape_text(result.jacobian)}")
    return (f"Analysis({r['text']!r} → {r['next_token']['text']!r} (p = {r['next_token']['probability']:.3f}); "
            f"{r['model']['family']}, {r['dtype']}; {what}; relative error "
            f"{r['relative_error']:.1e}, plain Jacobian {r['plain_relative_error']:.1e}; "
            f"{len(r['layers'])} layers analysed)")


def analysis_html(result: Any) -> str:
    r, nt = result.report, result.report["next_token"]
    top = ", ".join(f"{token_html(p['text'])} {p['probability']:.3f}" for p in r["top_predictions"])
    rows = [("model", html.escape(f"{r['model']['source']} ({r['model']['family']}, {r['dtype']})")),
            ("input", tokens_html([t["text"] for t in r["tokens"]])),
            ("next token", f"{token_html(nt['text'])} p = {nt['probability']:.4f} (top: {top})"),
            ("J", "not built (matrix-free analysis)" if result.jacobian is None
             else f"{shape_text(result.jacobian)}: y = Σ_t J_t x_t"),
            ("relative reconstruction error", f"detached {r['relative_error']:.2e}, plain Jacobian "
                                              f"{r['plain_relative_error']:.2e}, matrix-free homogeneity "
                                              f"{r['homogeneity_error']:.2e}")]
    if matrix_free(r):
        spec = r["spectrum"]
        table = [[str(i + 1), f"{s:.3g}", tokens_html(u)]
                 for i, (s, u) in enumerate(zip(spec["singular_values"], spec["left_tokens"]))]
        body = (_fields(rows) + contribution_heatmaps(r)
                + _table(table, ["i", "σ_i of [J_0 … J_{T−1}]", "u_i → top tokens"]))
    else:
        table = [[str(p["position"]), token_html(p["token"]), f"{p['singular_values'][0]:.3g}",
                  token_html(p["left_tokens"][0][0]), token_html(p["right_tokens"][0][0]),
                  f"{p['effective_dimension']['stable_rank']:.2f}"] for p in r["per_token"][:MAX_ROWS]]
        body = (_fields(rows) + contribution_heatmaps(r)
                + _table(table, ["t", "token", "σ_1 of J_t", "u_1 → top token", "v_1 → top token", "stable rank"])
                + _rows_note(len(r["per_token"])))
    if r["layers"]:
        info = r["layer_analysis"]
        hits = [row["layer"] for row in r["layers"] if row["cumulative"]["residual"]["u1_next_token_rank"] == 0]
        body += (f"<p>Layer story: {len(r['layers'])} layers × both scopes × three parts, largest relative "
                 f"error {info['max_relative_error']:.1e}; u_1 of the cumulative residual map decodes to "
                 f"{token_html(nt['text'])} at layers {hits or 'none'} (<code>.layer_spectra</code> for the table).</p>")
    return _box("Analysis", body + "<p>Figures and report.html: <code>eqlin.report.write_report(result, folder)"
                               "</code>.</p>")


# --------------------------------------------------------------------------------------------------
# Steering.


def steering_repr(result: Any) -> str:
    return (f"SteeringResult(concept {result.concept!r} into {result.text!r}, layer {result.layer}, strength "
            f"{result.strength:g}: lift {result.logprob_lift:+.3f} nats; steered {result.steered_text!r})")


def steering_html(result: Any) -> str:
    rows = [("concept", html.escape(repr(result.concept))), ("text", html.escape(repr(result.text))),
            ("injected", f"entering layer {result.layer}, strength λ = {result.strength:g}"),
            ("concept map error", f"{result.map_relative_error:.1e}"),
            ("lift of the concept tokens' mean log p", f"{result.logprob_lift:+.3f} nats (steered − baseline)"),
            ("steered continuation", html.escape(repr(result.steered_text))),
            ("baseline continuation", html.escape(repr(result.baseline_text)))]
    return _box("SteeringResult", _fields(rows))


def sweep_html(table: dict[str, Any]) -> str:
    tokens = tokens_html([t["text"] for t in table["concept_tokens"]])
    strengths = table["strengths"]
    rows = [[str(l)] + [f"{table['lift'][i][j]:+.2f} ({table['control_lift'][i][j]:+.2f})" for j in range(len(strengths))]
            for i, l in enumerate(table["layers"])]
    best = table["best"]
    head = _fields([
        ("concept → text", html.escape(f"{table['concept']!r} → {table['text']!r}")),
        ("scored tokens", tokens),
        ("baseline continuation", html.escape(repr(table["baseline"]["text"]))),
        ("best cell", html.escape(f"layer {best['layer']}, λ {best['strength']:g}: lift {best['lift']:+.2f}, "
                                  f"{best['steered_text']!r}; control {best['control_text']!r}"))])
    return _box("Steering sweep", head + "<p>Lift of the mean log p of the scored tokens in nats, steered minus "
                "baseline; in parentheses the random control of the same Frobenius norm.</p>"
                + _table(rows, ["layer \\ λ"] + [f"{s:g}" for s in strengths]))


# --------------------------------------------------------------------------------------------------
# Model.


def model_repr(model: Any) -> str:
    c = model.config
    from eqlin.params import weight_leaves

    params = sum(int(np.prod(a.shape)) for a in weight_leaves(model.params))
    return (f"Model({c.family}, {c.num_layers} layers, d = {c.hidden_size}, vocabulary {c.vocab_size:,}, "
            f"{params:,} parameters, {model.dtype}, {weights_text(model.params)}; from {model.source!r})")


def weights_text(params: Any) -> str:
    """How the weights are held: "weights stored as bfloat16" (widened where used), "weights quantized as
    Q4_K/Q5_0/…" (GGUF blocks dequantized where used; ", stored as float32" for other matrices held so) or "weights cast at
    load"."""
    from eqlin.params import is_quantized, storage_dtype, weight_leaves

    if params.weights == "cast":
        return "weights cast at load"
    held = weight_leaves(params)
    stored = sorted({storage_dtype(a).name for a in held if not is_quantized(a)} - {params.dtype.name})
    if params.weights == "quantized":
        qtypes = sorted({q for a in held if is_quantized(a) for q in a.qtypes})
        return f"weights quantized as {'/'.join(qtypes)}" + (f", stored as {'/'.join(stored)}" if stored else "")
    return f"weights stored as {'/'.join(stored)}"
