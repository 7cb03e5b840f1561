"""Figures, a self-contained report.html and a terminal summary for an `Analysis`; every file is
written atomically (see `eqlin.outputs`)."""

from __future__ import annotations

import base64
import html
import io
import unicodedata
from pathlib import Path
from typing import Any, Callable

import numpy as np

from eqlin.analysis import Analysis, duration_text
from eqlin.display import contribution_heatmaps, matrix_free, token_html
from eqlin.figure_text import drawable as _drawable, font_note, literal, literal_legend
from eqlin.memory import format_bytes
from eqlin.outputs import json_text, write_folder_atomic
from eqlin.progress import stage

REPORT_KIND = "report"  # the kind of output folder `write_report` writes (eqlin.outputs.MARKER)
FIGURES = {
    "reconstruction.png": "Reconstruction of the output y by Σ_t J_t x_t: the detached Jacobian (exact) against the "
                          "plain Jacobian (not)",
    "jacobian.png": "The detached Jacobian [J_0 … J_{T−1}] (d × T·d), one block of columns per input token; each "
                    "pixel shows the largest-magnitude entry of a block of entries, and the colour scale is clipped "
                    "(the colour bar says where and how much)",
    "spectra.png": "Top singular values of each per-token map J_t, with the token that each J_t's top left singular "
                   "vector u_1 decodes to (legend)",
    "spectrum.png": "Matrix-free analysis: the top singular values of the token-combined map [J_0 … J_{T−1}], each "
                    "labelled with the token its left singular vector u_i decodes to, and where each right singular "
                    "vector v_i reads (its share on each input token)",
    "emergence.png": "Where the prediction emerges: u_1 of every layer map decoded through the unembedding, boxed "
                     "where it decodes to the next token",
    "dimensionality.png": "Effective dimension of every layer map (stable rank and participation ratio), both scopes "
                          "and three parts",
}
PART_COLORS = {"residual": "tab:blue", "attn": "tab:orange", "mlp": "tab:green"}
SCOPE_STYLES = {"cumulative": ("-", "o"), "single": ("--", "s")}
DPI = 110
JACOBIAN_BLOCKS = (320, 640)  # jacobian.png shows at most this many rows × columns (each a block of J)
CLIP_PERCENTILE = 99.5  # jacobian.png's colour scale ends at this percentile of the shown |values|
MAX_TICK_LABELS = 16  # token labels along an axis, at most


def figure(draw: Callable[[Any], None], size: tuple[float, float]):
    """A fresh matplotlib `Figure` (no pyplot state, no backend switch) drawn by `draw(fig)`, laid out
    by matplotlib's constrained layout (room for titles, colour bars and legends outside the axes)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=DPI, layout="constrained")
    draw(fig)
    return fig


def render_png(draw: Callable[[Any], None], size: tuple[float, float]) -> bytes:
    """PNG bytes of `figure(draw, size)`."""
    buf = io.BytesIO()
    figure(draw, size).savefig(buf, format="png")
    return buf.getvalue()


def _short(token: str, width: int = 12) -> str:
    """A token as a printable literal (whitespace visible), cut to `width` characters."""
    text = repr(token)[1:-1] or "∅"
    return text if len(text) <= width else text[: width - 1] + "…"


def _quoted(token: str, width: int = 11) -> str:
    """A token in quotes for the terminal, whitespace visible, cut to `width` characters inside them."""
    return f"'{_short(token, width)}'"


def _tick_positions(n: int) -> range:
    """Which of n positions get a label: all, or every k-th so that at most `MAX_TICK_LABELS` do."""
    return range(0, n, -(-n // MAX_TICK_LABELS))


def _reconstruction(result: Analysis):
    r = result.report

    def draw(fig):
        y = result.output
        axes = fig.subplots(1, 2)
        for ax, recon, label, err, color in [
                (axes[0], result.reconstruction, "detached", r["relative_error"], "tab:blue"),
                (axes[1], result.plain_reconstruction, "plain", r["plain_relative_error"], "tab:red")]:
            ax.scatter(y, recon, s=6, alpha=0.6, color=color)
            lim = [min(y.min(), recon.min()), max(y.max(), recon.max())]
            ax.plot(lim, lim, color="gray", lw=0.8, label="y = Σ_t J_t x_t")
            ax.set_xlabel("y_i, the model's output")
            ax.set_ylabel("(Σ_t J_t x_t)_i, the reconstruction")
            ax.set_title(f"{label} Jacobian: ‖y − Σ_t J_t x_t‖ / ‖y‖ = {err:.2e}", fontsize=10)
            ax.legend(fontsize=8, loc="upper left")
        fig.suptitle(f"Reconstructing the final hidden state y (one point per coordinate, d = {y.size}) at the "
                     "last position", fontsize=11)
    return draw


def block_extremes(J: np.ndarray, rows: int, cols: int) -> tuple[np.ndarray, int, int]:
    """J (d_out, T, d_in) as an image of at most `rows` × `cols` pixels without dropping entries: each
    pixel is the signed entry of largest magnitude in its block of bh × bw entries, blocks never crossing
    from one token's J_t into the next (each J_t is padded with zeros to whole blocks). Returns
    (image (ceil(d_out/bh), T·ceil(d_in/bw)), bh, bw)."""
    d_out, T, d_in = J.shape
    bw = -(-T * d_in // cols)
    bw = next(b for b in range(bw, d_in + 1) if T * -(-d_in // b) <= cols) if bw < d_in else d_in
    bh = -(-d_out // rows)
    A = np.pad(J, ((0, -d_out % bh), (0, 0), (0, -d_in % bw)))
    R, C = A.shape[0] // bh, A.shape[2] // bw
    blocks = A.reshape(R, bh, T, C, bw).transpose(0, 2, 3, 1, 4).reshape(R, T, C, bh * bw)
    pick = np.abs(blocks).argmax(axis=-1)[..., None]
    return np.take_along_axis(blocks, pick, axis=-1).reshape(R, T * C), bh, bw


def _jacobian(result: Analysis):
    tokens = [t["text"] for t in result.report["tokens"]]

    def draw(fig):
        J = result.jacobian  # (d, T, d)
        d_out, T, d_in = J.shape
        image, bh, bw = block_extremes(J, *JACOBIAN_BLOCKS)
        per_token = image.shape[1] // T
        magnitude = np.abs(image)
        lim = float(np.percentile(magnitude, CLIP_PERCENTILE)) or float(magnitude.max()) or 1.0
        beyond = float(np.mean(magnitude > lim))
        ax = fig.add_subplot(1, 1, 1)
        # Fewer pixels than the axes has: "nearest" repeats pixels, never drops one.
        im = ax.imshow(image, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest",
                       extent=(0, T * d_in, d_out, 0))
        ticks = _tick_positions(T)
        labels = [f"{t}: {_drawable(tokens[t])}" for t in ticks]
        ax.set_xticks([d_in * t + d_in / 2 for t in ticks], labels, rotation=30, ha="right", fontsize=8,
                      **literal(*labels))
        for t in range(1, T):
            ax.axvline(d_in * t, color="black", lw=0.6)
        ax.set_xlabel(f"input: token position t (x_t, d = {d_in} columns of J_t each)\n{font_note(labels)}")
        ax.set_ylabel(f"output coordinate i of y (d = {d_out})")
        block = "every entry shown" if bh * bw == 1 else (
            f"each pixel: the largest-|·| entry of a block of {bh} × {bw} entries (signed)")
        ax.set_title(f"The detached Jacobian [J_0 … J_{T - 1}]: {d_out} × {T * d_in} entries, shown as "
                     f"{image.shape[0]} × {image.shape[1]} pixels ({per_token} per token)\n{block}", fontsize=9)
        bar = fig.colorbar(im, ax=ax, fraction=0.04, extend="both" if beyond else "neither")
        bar.set_label(f"entry of J (colour clipped at ±{lim:.2g}, the {CLIP_PERCENTILE:g}th percentile of |shown|;\n"
                      f"{beyond:.1%} of pixels beyond; largest |J| = {float(np.abs(J).max()):.3g})", fontsize=8)
        fig.suptitle("y = Σ_t J_t x_t: how each input coordinate (column) moves each output coordinate (row)",
                     fontsize=11)
    return draw


def _spectra(result: Analysis):
    per_token = result.report["per_token"]

    def draw(fig):
        from matplotlib import colormaps
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize
        s = result.singular_values  # (T, k)
        T, k = s.shape
        ax = fig.add_subplot(1, 1, 1)
        many = T > MAX_TICK_LABELS  # a colour per position instead of a legend entry per token
        colors = colormaps["viridis"](np.linspace(0, 1, T)) if many else [f"C{t % 10}" for t in range(T)]
        styles = ["-", "--", ":", "-."]
        labels = [f"{t}: {_drawable(row['token'])}  → u_1: {_drawable(row['left_tokens'][0][0])}"
                  for t, row in enumerate(per_token)]
        for t, label in enumerate(labels):
            ax.plot(range(1, k + 1), s[t], marker="o", ms=3, color=colors[t], lw=1,
                    linestyle="-" if many else styles[t // 10 % len(styles)], label=label)
        _log_y(ax)
        ax.set_xticks(range(1, k + 1))
        ax.set_xlabel("i, index of the singular value (largest first)")
        ax.set_ylabel("singular value σ_i of J_t (log scale)")
        ax.grid(alpha=0.3, which="both")
        if many:
            bar = fig.colorbar(ScalarMappable(Normalize(0, T - 1), colormaps["viridis"]), ax=ax, fraction=0.04)
            bar.set_label("input position t", fontsize=8)
        else:
            legend = ax.legend(fontsize=7, title=f"position: token → top token of u_1\n{font_note(labels)}",
                               title_fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
            literal_legend(legend)
        ax.set_title(f"Top {k} singular values of each per-token map J_t (y = Σ_t J_t x_t)", fontsize=10)
    return draw


def _log_y(ax) -> None:
    """A log y scale labelled with readable values (0.2, 0.5, 1, 2, 5, …), no minor labels."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _emergence(result: Analysis):
    story = result.layer_spectra
    next_text = result.report["next_token"]["text"]
    columns = [(scope, part) for scope in story.maps for part in story.maps[scope]]

    def draw(fig):
        ax = fig.add_subplot(1, 1, 1)
        n = len(story.layers)
        shown = {(i, j): _drawable(story.maps[scope][part].top_tokens[i][0][0])
                 for i in range(n) for j, (scope, part) in enumerate(columns)}
        next_shown = _drawable(next_text, 30)
        ranks = np.array([[story.maps[s][p].u1_next_token_rank[i] for s, p in columns] for i in range(n)])
        image = ax.imshow(np.log10(1 + ranks), cmap="viridis_r", aspect="auto", origin="lower",
                          vmin=0, vmax=max(1.0, float(np.log10(1 + ranks.max()))))
        for i in range(n):
            for j in range(len(columns)):
                hit = ranks[i, j] == 0
                ax.text(j, i, shown[i, j], ha="center", va="center", fontsize=7, **literal(shown[i, j]),
                        fontweight="bold" if hit else "normal",
                        color="black" if np.log10(1 + ranks[i, j]) < 0.5 * image.norm.vmax else "white")
                if hit:
                    ax.add_patch(_box(j, i))
        ax.set_xticks(range(len(columns)), [f"{scope}\n{part}" for scope, part in columns], fontsize=8)
        ax.set_yticks(range(n), [str(l) for l in story.layers], fontsize=7)
        ax.set_xlabel("map (scope, part)")
        ax.set_ylabel("layer")
        ax.set_title(f"Top token of u_1 for each layer map; boxed: u_1 decodes to the next token {next_shown}\n"
                     f"(␣: a space; {font_note([*shown.values(), next_shown])})", fontsize=9,
                     **literal(*shown.values(), next_shown))
        bar = fig.colorbar(image, ax=ax, fraction=0.04)
        bar.set_label(f"rank of {_drawable(next_text)} among u_1's tokens\n(log10(1 + rank); 0: on top)", fontsize=8,
                      **literal(_drawable(next_text)))
    return draw


def _box(x: float, y: float):
    from matplotlib.patches import Rectangle

    return Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, edgecolor="red", lw=1.5)


def _dimensionality(result: Analysis):
    story = result.layer_spectra
    layers = np.array(story.layers)
    contiguous = bool(np.all(np.diff(layers) == 1))
    d = result.jacobian.shape[0]

    def draw(fig):
        axes = fig.subplots(1, 2)
        for ax, (measure, label, title) in zip(axes, [
                ("stable_rank", "stable rank ‖J‖_F² / σ_1²", "Stable rank"),
                ("participation_ratio", "participation ratio (Σσ²)² / Σσ⁴", "Participation ratio")]):
            for scope, parts in story.maps.items():
                line, marker = SCOPE_STYLES[scope]
                for part, maps in parts.items():
                    ax.plot(layers, getattr(maps.effective, measure), linestyle=line if contiguous else "none",
                            marker=marker, ms=4, lw=1, color=PART_COLORS[part], label=f"{scope} · {part}")
            ax.set_xticks(layers if len(layers) <= 12 else layers[::-(-len(layers) // 10)])
            ax.set_xlabel("layer" + ("" if contiguous else " (only the analysed ones, not joined)"))
            ax.set_ylabel(label)
            ax.set_title(f"{title} of each layer map (out of d = {d})", fontsize=10)
            ax.grid(alpha=0.3)
        fig.legend(*axes[0].get_legend_handles_labels(), loc="outside right upper", fontsize=8,
                   title="scope · part", title_fontsize=8)
        fig.suptitle("Effective dimension of the six maps of every analysed layer (both panels share the legend)",
                     fontsize=11)
    return draw


def _combined_spectrum(result: Analysis):
    report = result.report
    spec, tokens = report["spectrum"], [p["token"] for p in report["per_token"]]

    def draw(fig):
        s = np.asarray(spec["singular_values"])
        k, T = s.size, len(tokens)
        left, right = fig.subplots(1, 2, width_ratios=(1, 1.6))
        left.plot(range(1, k + 1), s, marker="o", color="tab:blue")
        labels = [_drawable(u[0]) for u in spec["left_tokens"]]
        for i, label in enumerate(labels):
            left.annotate(label, (i + 1, s[i]), textcoords="offset points", xytext=(4, 4), fontsize=8,
                          **literal(label))
        _log_y(left)
        left.set_xticks(range(1, k + 1))
        left.set_xlabel("i, index of the singular value (largest first)")
        left.set_ylabel("σ_i (log scale)")
        left.set_title(f"Top {k} singular values, labelled with u_i's top token", fontsize=10)
        left.grid(alpha=0.3, which="both")
        weights = np.array([p["right_weight"] for p in report["per_token"]]).T  # (k, T)
        image = right.imshow(weights, cmap="Purples", aspect="auto", vmin=0, interpolation="nearest")
        ticks = _tick_positions(T)
        names = [f"{t}: {_drawable(tokens[t])}" for t in ticks]
        right.set_xticks(list(ticks), names, rotation=30, ha="right", fontsize=8, **literal(*names))
        right.set_yticks(range(k), [f"v_{i + 1}" for i in range(k)], fontsize=8)
        right.set_ylabel("right singular vector")
        right.set_xlabel(f"input position t\n{font_note(labels + names)}")
        right.set_title("‖v_i[t]‖²: each right singular vector's share on each input token", fontsize=10)
        fig.colorbar(image, ax=right, fraction=0.04).set_label("share (each row sums to 1)", fontsize=8)
        fig.suptitle(f"The token-combined map [J_0 … J_{T - 1}] (d × T·d), matrix-free ({spec['method']}): J never "
                     "built", fontsize=11)
    return draw


def figures(result: Analysis) -> dict[str, bytes]:
    """PNG bytes by file name (the layer figures only when layer maps were computed; a matrix-free analysis
    has no J to draw, and its spectrum is the token-combined map's)."""
    out = {"reconstruction.png": render_png(_reconstruction(result), (10, 4.5))}
    if matrix_free(result.report):
        out["spectrum.png"] = render_png(_combined_spectrum(result), (12, 4.8))
    else:
        out["jacobian.png"] = render_png(_jacobian(result), (11, 6))
        out["spectra.png"] = render_png(_spectra(result), (10, 5))
    if result.layer_spectra is not None:
        n = len(result.layer_spectra.layers)
        out["emergence.png"] = render_png(_emergence(result), (10, 0.32 * n + 1.8))
        out["dimensionality.png"] = render_png(_dimensionality(result), (13, 4.8))
    return out


def _table(header: list[str], rows: list[list[Any]], *, raw: bool = False) -> str:
    """An HTML table with a header row; cells are escaped unless `raw` (HTML already)."""
    cells = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c if raw else html.escape(str(c))}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f"<table><thead><tr>{cells}</tr></thead><tbody>{body}</tbody></table>"


def _fields(rows: list[tuple[str, str]]) -> str:
    """A table of (name, HTML value) rows, the names as row headers (no header row)."""
    body = "".join(f"<tr><th scope=\"row\">{html.escape(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return f"<table class=\"fields\"><tbody>{body}</tbody></table>"


def _per_token_section(report: dict[str, Any]) -> str:
    """Each input token's map J_t: its size, its share of the logit, its effective dimension and its
    top singular triplets decoded, with what every column means."""
    k = len(report["per_token"][0]["singular_values"])
    header = (["t", "token", "‖J_t x_t‖", "logit contribution", "stable rank"]
              + [f"σ_{i} · u_{i} / v_{i}" for i in range(1, k + 1)] + [f"u_1 → top {k} tokens"])
    rows = []
    for p in report["per_token"]:
        triplets = [f"<b>{s:.3g}</b><br><span class=\"nw\">u: {token_html(u[0])}</span><br>"
                    f"<span class=\"nw\">v: {token_html(v[0])}</span>"
                    for s, u, v in zip(p["singular_values"], p["left_tokens"], p["right_tokens"])]
        rows.append([str(p["position"]), token_html(p["token"]), f"{p['contribution_norm']:.3g}",
                     f"{p['logit_contribution']:+.3g}", f"{p['effective_dimension']['stable_rank']:.2f}",
                     *triplets, " ".join(token_html(t) for t in p["left_tokens"][0])])
    c = _constant(report)
    if c:  # a model with biases: c in its own row
        rows.append(["c", "(constant: biases)", f"{c['norm']:.3g}", f"{c['logit']:+.3g}", "", *[""] * k,
                     " ".join(token_html(t) for t in c["tokens"])])
    return f"""<p>One row per input token t and its map J_t (d × d), where y = Σ_t J_t x_t.
<b>‖J_t x_t‖</b>: the size of what token t adds to the output y; <b>logit contribution</b>:
W_U[next] · J_t x_t, token t's exact share of the next token's logit (the heat map above); <b>stable rank</b>
‖J_t‖_F² / σ_1², J_t's effective dimension. Then the top {k} singular triplets of
J_t = Σ_i σ_i u_i v_iᵀ, one column each: <b>σ_i</b>, <b>u</b>: the top token of u_i through the unembedding
(what J_t writes, read by the logit lens) and <b>v</b>: the input token whose embedding is nearest to v_i by
cosine (what J_t reads). The terminal summary prints the same pairs. The last column lists u_1's top {k}
tokens, best first. Tokens are shown with their spaces as ␣.</p>
{_table(header, rows, raw=True)}"""


def _combined_section(report: dict[str, Any]) -> str:
    """A matrix-free report's token-combined spectrum: what is absent and why, then one row per triplet."""
    spec = report["spectrum"]
    k, T = spec["k"], len(report["per_token"])
    rows = []
    for i, (s, u) in enumerate(zip(spec["singular_values"], spec["left_tokens"])):
        weights = np.array([p["right_weight"][i] for p in report["per_token"]])
        reads = ", ".join(f"{t}: {token_html(report['per_token'][t]['token'])} {weights[t]:.2f} → "
                          f"{token_html(report['per_token'][t]['right_tokens'][i][0])}"
                          for t in np.argsort(-weights)[:min(3, T)])
        rows.append([str(i + 1), f"<b>{s:.4g}</b>", " ".join(token_html(t) for t in u), reads])
    return f"""<p>The top {k} singular triplets of the token-combined map [J_0 … J_{{T−1}}] (d × T·d), y = Σ_i σ_i u_i (v_i · x),
computed by {html.escape(spec['method'])} from products with J and Jᵀ (relative reconstruction error of the map:
{spec['relative_error']:.1e}). <b>u_i</b>: its top {k} tokens through the unembedding (what the map writes);
<b>v_i reads</b>: the input positions holding most of v_i (‖v_i[t]‖², the shares sum to 1), each with the input
token whose embedding is nearest to v_i's block there by cosine.</p>
{_table(["i", "σ_i", f"u_i → top {k} tokens", "v_i reads (t: token share → nearest embedding)"], rows, raw=True)}"""


def _constant(report: dict[str, Any]) -> dict[str, Any] | None:
    """report.json's "constant" for a model with biases (y = Σ_t J_t x_t + c, c ≠ 0), else None."""
    c = report.get("constant") or {}
    return c if c.get("norm") else None


def _final_map_section(report: dict[str, Any]) -> str:
    """The per-token maps J_t taken apart (full analysis) or the token-combined spectrum (matrix-free)."""
    if matrix_free(report):
        return f"<h2>The token-combined map's top singular triplets</h2>{_combined_section(report)}"
    return f"<h2>Per input token: the map J_t taken apart</h2>{_per_token_section(report)}"


def _analysis_text(report: dict[str, Any]) -> str:
    """Which analysis ran and why, in one line (reports from before the choice existed are full)."""
    plan = report.get("plan")
    if plan is None:
        return "full (J built)"
    if report["analysis"] == "full":
        return f"full (J built): {plan['reason']}"
    took = f", about {duration_text(plan['full_seconds'])} here" if plan.get("full_seconds") is not None else ""
    return (f"matrix-free (J never built): {plan['reason']}; the full J at T={plan['length']} needs about "
            f"{format_bytes(plan['full_bytes'])}{took}, the budget is {format_bytes(plan['limit'])}")


def _reconstructed_as(report: dict[str, Any]) -> str:
    """What the detached map reconstructs y with: Σ_t J_t x_t, plus c for a model with biases."""
    return "(Σ_t J_t x_t + c)" if _constant(report) else "Σ_t J_t x_t"


def render_html(report: dict[str, Any], pngs: dict[str, bytes]) -> str:
    """A self-contained page: the numbers, the token heat maps, per-token and layer tables with what
    their columns mean, and every figure inlined as a data URI with a caption."""
    nt, logit = report["next_token"], report["logit"]
    top = ", ".join(f"{token_html(p['text'])} {p['probability']:.3f}" for p in report["top_predictions"])
    images = "".join(
        f"<figure><img alt=\"{html.escape(FIGURES[name])}\" src=\"data:image/png;base64,"
        f"{base64.b64encode(data).decode()}\"><figcaption><b>{name}</b>: {html.escape(FIGURES[name])}"
        f"</figcaption></figure>"
        for name, data in pngs.items())
    summary_rows = [
        ("model", html.escape(f"{report['model']['source']} ({report['model']['family']}, "
                              f"{report['model']['parameters']:,} parameters, d = {report['model']['hidden_size']})"
                              + _allowed_text(report))),
        ("dtype", report["dtype"]),
        ("input tokens", " ".join(token_html(t["text"]) for t in report["tokens"])),
        ("next token", f"{token_html(nt['text'])} p = {nt['probability']:.4f} (top {len(report['top_predictions'])}: "
                       f"{top})"),
        ("analysis", html.escape(_analysis_text(report))),
        (f"detached reconstruction error ‖y − {_reconstructed_as(report)}‖ / ‖y‖",
         f"{report['relative_error']:.2e} (exact up to rounding)"),
        ("plain Jacobian reconstruction error", f"{report['plain_relative_error']:.2e} (the ordinary Jacobian does "
                                                "not reconstruct y)"),
        ("homogeneity error ‖y − jvp(f, x; x)‖ / ‖y‖ (matrix-free)", f"{report['homogeneity_error']:.2e}"),
        (f"next-token logit: value / Σ_t W_U[next] · J_t x_t{' + W_U[next] · c' if _constant(report) else ''}",
         f"{logit['value']:.6f} / {logit['reconstructed']:.6f}"),
    ]
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>eqlin report: {html.escape(report['text'])}</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;line-height:1.4}}
table{{border-collapse:collapse;margin:1em 0;font-size:0.9em}}td,th{{border:1px solid #ccc;padding:3px 6px;
vertical-align:top;text-align:left}}table.fields th{{background:#f6f6f6;font-weight:normal;color:#333}}
thead th{{background:#f0f0f0}}.nw{{white-space:nowrap}}figure{{margin:1.5em 0}}img{{max-width:100%}}figcaption{{color:#444}}</style></head>
<body><h1>eqlin: the exact linear map of one prediction</h1>
<p>Input: <code>{html.escape(report['text'])}</code>. For this input the model's next-token prediction is
exactly a linear function of the input embeddings x_t: y = Σ_t J_t x_t, where y is the final hidden state at
the last position and J_t its detached Jacobian with respect to token t (nonlinear coefficients frozen).</p>
{_fields(summary_rows)}
<h2>What each input token contributes</h2>{contribution_heatmaps(report)}
{_final_map_section(report)}
<h2>The layer story: every layer's maps</h2>{_layer_section(report)}
<h2>Figures</h2>{images}
</body></html>
"""


def _layer_section(report: dict[str, Any]) -> str:
    """The layer story's explanation and table (or a note that no layer was analysed)."""
    rows = report["layers"]
    skipped = report["layer_analysis"].get("skipped")
    if skipped:
        return f"<p>No layer maps: {html.escape(skipped)}.</p>"
    if not rows:
        return "<p>No layer maps were computed (<code>--layers none</code>).</p>"
    info, nt = report["layer_analysis"], report["next_token"]
    scopes = [s for s in ("cumulative", "single") if s in rows[0]]
    parts = ("residual", "attn", "mlp")
    header = (["layer"] + [f"SR {s[:3]}. {p}" for s in scopes for p in parts]
              + [f"u₁ → {s[:3]}. {p}" for s in scopes[:1] for p in parts] + ["lens rank", "lens p", "max error"])
    body = [[str(r["layer"])] + [f"{r[s][p]['stable_rank']:.2f}" for s in scopes for p in parts]
            + [token_html(r[s][p]["top_tokens"][0]) + (" ✓" if r[s][p]["u1_next_token_rank"] == 0 else "")
               for s in scopes[:1] for p in parts]
            + [str(r[scopes[0]]["residual"]["next_token_rank"]),
               f"{r[scopes[0]]['residual']['next_token_probability']:.3g}",
               f"{max(r[s][p]['relative_error'] for s in scopes for p in parts):.1e}"]
            for r in rows]
    return f"""<p>For each analysed layer l, six exact linear maps y = Σ_t J_t x_t, each output read at the last
position through the final norm so that it decodes through the unembedding. <b>cumulative</b>: from the input
embeddings to layer l's output; <b>single</b>: from the residual stream entering layer l (every position) to
its output. <b>residual</b>: the stream after layer l; <b>attn</b>, <b>mlp</b>: that branch's output alone
({html.escape(info['tap_meaning'])}). Largest relative reconstruction error over all of them:
{info['max_relative_error']:.1e}; engines: {html.escape(', '.join(f'{k} {v}' for k, v in info['engines'].items()))}.</p>
<p>Columns: <b>SR</b> stable rank ‖J‖_F² / σ₁² (cum. = cumulative, sin. = single); <b>u₁ →</b> the token the
map's top left singular vector u₁ decodes to (✓: the model's next token {token_html(nt['text'])});
<b>lens rank</b>, <b>lens p</b>: the next token's rank (0 = top) and probability in the logit lens of the
residual stream after layer l; <b>max error</b>: the largest reconstruction error of the layer's maps.</p>
{_table(header, body, raw=True)}"""


def write_report(result: Analysis, out: Path, *, quiet: bool | None = None, extra: dict[str, bytes] | None = None
                 ) -> list[Path]:
    """Write report.json, the PNG figures, report.html and the `extra` files ({name: bytes}, e.g. the saved
    Jacobian) as the whole content of `out`, swapped into place as one set
    (`eqlin.outputs.write_folder_atomic`). Returns the paths."""
    with stage("figures and report", quiet):
        pngs = figures(result)
        files = {**pngs, "report.json": json_text(result.report).encode(),
                 "report.html": render_html(result.report, pngs).encode(), **(extra or {})}
        return write_folder_atomic(out, files, kind=REPORT_KIND)


def _columns(text: str) -> int:
    """The terminal columns `text` takes: East Asian wide and full-width characters two, combining marks none."""
    return sum(0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def _ljust(text: str, width: int) -> str:
    return text + " " * max(0, width - _columns(text))


def _rjust(text: str, width: int) -> str:
    return " " * max(0, width - _columns(text)) + text


def _layer_lines(report: dict[str, Any]) -> list[str]:
    """The layer story as a compact terminal table."""
    info, nt, rows = report["layer_analysis"], report["next_token"], report["layers"]
    scopes = [s for s in ("cumulative", "single") if s in rows[0]]
    parts = ("residual", "attn", "mlp")
    lines = [f"layer maps: {len(rows)} layers x {len(scopes)} scopes x 3 parts, max relative error "
             f"{info['max_relative_error']:.1e}; branches read {info['tap']} their post-norms",
             "  stable rank (" + " | ".join(scopes) + f"), u_1's top token (cumulative; * = {nt['text']!r}), "
             f"rank of {nt['text']!r} in the logit lens of the stream",
             "  layer " + " | ".join(" ".join(f"{p[:5]:>6}" for p in parts) for _ in scopes)
             + "   " + " ".join(f"{p:<14}" for p in parts) + " lens"]
    for r in rows:
        ranks = " | ".join(" ".join(f"{r[s][p]['stable_rank']:>6.2f}" for p in parts) for s in scopes)
        tokens = " ".join(_ljust(_quoted(r[scopes[0]][p]["top_tokens"][0])
                                 + ("*" if r[scopes[0]][p]["u1_next_token_rank"] == 0 else ""), 14) for p in parts)
        lines.append(f"  {r['layer']:>5} {ranks}   {tokens} {r[scopes[0]]['residual']['next_token_rank']:>4}")
    return lines


def _allowed_text(report: dict[str, Any]) -> str:
    """'; config keys allowed by the user (--allow-key): ...' where --allow-key let keys through, else ''."""
    allowed = report["model"].get("allowed_keys")
    return f"; config keys allowed by the user (--allow-key): {', '.join(allowed)}" if allowed else ""


def summary(report: dict[str, Any], out: Path) -> str:
    """The terminal summary of a report."""
    nt = report["next_token"]
    c = _constant(report)
    lines = [
        f"model: {report['model']['source']} ({report['model']['family']}), dtype {report['dtype']}"
        + _allowed_text(report),
        f"input: {[t['text'] for t in report['tokens']]}",
        f"next token: {nt['text']!r}  p = {nt['probability']:.4f}",
        f"relative reconstruction error ‖y − {_reconstructed_as(report)}‖/‖y‖: detached "
        f"{report['relative_error']:.2e}, "
        f"plain {report['plain_relative_error']:.2e}",
        f"matrix-free homogeneity error ‖y − jvp(f, x; x)‖/‖y‖: {report['homogeneity_error']:.2e}",
        *([f"constant c (biases; y = Σ_t J_t x_t + c): ‖c‖/‖y‖ = {c['relative_norm']:.3g}, "
           f"through the unembedding {c['tokens'][:3]!r}"] if c else []),
        f"analysis: {_analysis_text(report)}",
        "",
    ]
    if matrix_free(report):
        spec = report["spectrum"]
        lines += ["token-combined map [J_0 … J_{T−1}]: top singular values, top-1 token of u_i (unembedding) / the "
                  "position v_i reads most (its share, nearest embedding)"]
        for i, (s, u) in enumerate(zip(spec["singular_values"], spec["left_tokens"])):
            t = max(range(len(report["per_token"])), key=lambda t: report["per_token"][t]["right_weight"][i])
            p = report["per_token"][t]
            lines.append(f"  {i + 1:>3} {s:>10.4g} [{u[0]!r} / t={t} {p['token']!r} {p['right_weight'][i]:.2f} "
                         f"{p['right_tokens'][i][0]!r}]")
        lines.append("  (no J built: per-token contributions and spectra, J's picture and layer maps are absent)")
    else:
        lines += ["per input token: top singular values of J_t, top-1 token of u_i (unembedding) / v_i (nearest "
                  "embedding)"]
        for p in report["per_token"]:
            pairs = ", ".join(f"{s:.3g} [{u[0]!r} / {v[0]!r}]"
                              for s, u, v in zip(p["singular_values"], p["left_tokens"], p["right_tokens"]))
            lines.append(f"  {p['position']:>3} {_rjust(repr(p['token']), 14)}  {pairs}")
    skipped = report["layer_analysis"].get("skipped")
    if skipped:
        lines += ["", f"layer maps: {skipped}"]
    elif report["layers"]:
        lines += [""] + _layer_lines(report)
    lines += ["", f"report: {out / 'report.html'} (and report.json, figures)"]
    return "\n".join(lines)
