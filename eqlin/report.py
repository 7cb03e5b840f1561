"""Figures, a self-contained report.html and a terminal summary for an `Analysis`; every file is
written atomically (see `eqlin.outputs`)."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any, Callable

import numpy as np

from eqlin.analysis import Analysis
from eqlin.outputs import json_text, write_folder_atomic
from eqlin.progress import stage

FIGURES = {
    "reconstruction.png": "Reconstruction of the output y: detached vs plain Jacobian",
    "jacobian.png": "The detached Jacobian [J_1 … J_T] (d × T·d)",
    "spectra.png": "Singular values of each J_t, with the top left singular vector decoded",
    "emergence.png": "Where the prediction emerges: u_1 of every layer map decoded through the unembedding",
    "dimensionality.png": "Effective dimension of every layer map, both scopes and three parts",
}
PART_COLORS = {"residual": "tab:blue", "attn": "tab:orange", "mlp": "tab:green"}
SCOPE_STYLES = {"cumulative": ("-", "o"), "single": ("--", "s")}


def render_png(draw: Callable[[Any], None], size: tuple[float, float]) -> bytes:
    """PNG bytes of a figure drawn by `draw(fig)` on a fresh matplotlib `Figure` (no pyplot state, no
    backend switch)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=110)
    draw(fig)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _short(token: str, width: int = 12) -> str:
    """A token as a printable literal (whitespace visible), cut to `width` characters."""
    text = repr(token)[1:-1] or "∅"
    return text if len(text) <= width else text[: width - 1] + "…"


def _reconstruction(result: Analysis):
    r = result.report

    def draw(fig):
        y = result.output
        for i, (recon, label, err) in enumerate([
                (result.reconstruction, "detached", r["relative_error"]),
                (result.plain_reconstruction, "plain", r["plain_relative_error"])]):
            ax = fig.add_subplot(1, 2, i + 1)
            ax.scatter(y, recon, s=6, alpha=0.6, color="tab:blue" if i == 0 else "tab:red")
            lim = [min(y.min(), recon.min()), max(y.max(), recon.max())]
            ax.plot(lim, lim, color="gray", lw=0.8)
            ax.set_xlabel("y (model output)")
            ax.set_ylabel("Σ_t J_t x_t")
            ax.set_title(f"{label} Jacobian: relative error {err:.2e}")
    return draw


def _jacobian(result: Analysis):
    tokens = [t["text"] for t in result.report["tokens"]]

    def draw(fig):
        J = result.jacobian  # (d, T, d)
        d, T, _ = J.shape
        M = J.reshape(d, T * d)
        lim = float(np.percentile(np.abs(M), 99.5)) or 1.0
        ax = fig.add_subplot(1, 1, 1)
        im = ax.imshow(M, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest")
        ax.set_xticks([d * t + d / 2 for t in range(T)], [repr(s)[1:-1] for s in tokens], rotation=45, ha="right")
        for t in range(1, T):
            ax.axvline(d * t - 0.5, color="black", lw=0.5)
        ax.set_ylabel("output dimension")
        fig.colorbar(im, ax=ax, fraction=0.03)
    return draw


def _spectra(result: Analysis):
    per_token = result.report["per_token"]

    def draw(fig):
        ax = fig.add_subplot(1, 1, 1)
        s = result.singular_values  # (T, k)
        for t, row in enumerate(per_token):
            ax.plot(range(1, s.shape[1] + 1), s[t], marker="o", ms=3, label=repr(row["token"])[1:-1])
            ax.annotate(repr(row["left_tokens"][0][0])[1:-1], (1, s[t, 0]), textcoords="offset points",
                        xytext=(6, 0), fontsize=7)
        ax.set_yscale("log")
        ax.set_xticks(range(1, s.shape[1] + 1))
        ax.set_xlabel("singular value index")
        ax.set_ylabel("σ")
        ax.legend(fontsize=7, ncol=2, title="input token", title_fontsize=7)
    return draw


def _emergence(result: Analysis):
    story = result.layer_spectra
    next_text = result.report["next_token"]["text"]
    columns = [(scope, part) for scope in story.maps for part in story.maps[scope]]

    def draw(fig):
        ax = fig.add_subplot(1, 1, 1)
        n = len(story.layers)
        ranks = np.array([[story.maps[s][p].u1_next_token_rank[i] for s, p in columns] for i in range(n)])
        image = ax.imshow(np.log10(1 + ranks), cmap="viridis_r", aspect="auto", origin="lower",
                          vmin=0, vmax=max(1.0, float(np.log10(1 + ranks.max()))))
        for i in range(n):
            for j, (scope, part) in enumerate(columns):
                hit = ranks[i, j] == 0
                ax.text(j, i, _short(story.maps[scope][part].top_tokens[i][0][0]), ha="center", va="center",
                        fontsize=7, fontweight="bold" if hit else "normal",
                        color="black" if np.log10(1 + ranks[i, j]) < 0.5 * image.norm.vmax else "white")
                if hit:
                    ax.add_patch(_box(j, i))
        ax.set_xticks(range(len(columns)), [f"{scope}\n{part}" for scope, part in columns], fontsize=8)
        ax.set_yticks(range(n), [str(l) for l in story.layers], fontsize=7)
        ax.set_xlabel("map (scope, part)")
        ax.set_ylabel("layer")
        ax.set_title(f"Top token of u_1 for each layer map; boxed: u_1 decodes to the next token {next_text!r}",
                     fontsize=9)
        bar = fig.colorbar(image, ax=ax, fraction=0.04)
        bar.set_label(f"rank of {_short(next_text)!r} among u_1's tokens\n(log10(1 + rank); 0: on top)", fontsize=8)
    return draw


def _box(x: float, y: float):
    from matplotlib.patches import Rectangle

    return Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, edgecolor="red", lw=1.5)


def _dimensionality(result: Analysis):
    story = result.layer_spectra
    layers = np.array(story.layers)
    contiguous = bool(np.all(np.diff(layers) == 1))

    def draw(fig):
        for k, (measure, label) in enumerate([("stable_rank", "stable rank ‖J‖_F² / σ_1²"),
                                              ("participation_ratio", "participation ratio (Σσ²)² / Σσ⁴")]):
            ax = fig.add_subplot(1, 2, k + 1)
            for scope, parts in story.maps.items():
                line, marker = SCOPE_STYLES[scope]
                for part, maps in parts.items():
                    ax.plot(layers, getattr(maps.effective, measure), linestyle=line if contiguous else "none",
                            marker=marker, ms=4, lw=1, color=PART_COLORS[part], label=f"{scope} · {part}")
            ax.set_xticks(layers if len(layers) <= 12 else layers[::max(1, len(layers) // 9)])
            ax.set_xlabel("layer")
            ax.set_ylabel(label)
            ax.set_title(label.split(" ‖")[0].split(" (")[0].capitalize() + " of each layer map", fontsize=10)
            ax.grid(alpha=0.3)
            if k == 0:
                ax.legend(fontsize=7, ncol=2)
    return draw


def figures(result: Analysis) -> dict[str, bytes]:
    """PNG bytes by file name (the layer figures only when layer maps were computed)."""
    out = {"reconstruction.png": render_png(_reconstruction(result), (9, 4)),
           "jacobian.png": render_png(_jacobian(result), (10, 4.5)),
           "spectra.png": render_png(_spectra(result), (8, 4.5))}
    if result.layer_spectra is not None:
        n = len(result.layer_spectra.layers)
        out["emergence.png"] = render_png(_emergence(result), (10, 0.32 * n + 1.8))
        out["dimensionality.png"] = render_png(_dimensionality(result), (12, 4.5))
    return out


def _table(header: list[str], rows: list[list[Any]]) -> str:
    cells = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{cells}</tr></thead><tbody>{body}</tbody></table>"


def render_html(report: dict[str, Any], pngs: dict[str, bytes]) -> str:
    """A self-contained page: the numbers, per-token tables and every figure inlined as data URIs."""
    nt = report["next_token"]
    per_token = _table(
        ["pos", "token", "‖J_t x_t‖", "logit contribution", "σ_1…σ_k", "stable rank", "u_1 → tokens", "v_1 → tokens"],
        [[p["position"], repr(p["token"]), f"{p['contribution_norm']:.3g}", f"{p['logit_contribution']:.3g}",
          ", ".join(f"{s:.3g}" for s in p["singular_values"]), f"{p['effective_dimension']['stable_rank']:.2f}",
          " ".join(repr(t) for t in p["left_tokens"][0]), " ".join(repr(t) for t in p["right_tokens"][0])]
         for p in report["per_token"]] + _constant_row(report))
    layer_section = _layer_section(report)
    images = "".join(
        f"<figure><img alt=\"{html.escape(FIGURES[name])}\" src=\"data:image/png;base64,"
        f"{base64.b64encode(data).decode()}\"><figcaption>{html.escape(FIGURES[name])}</figcaption></figure>"
        for name, data in pngs.items())
    summary_rows = [
        ["model", f"{report['model']['source']} ({report['model']['family']}, {report['model']['parameters']:,} parameters)"],
        ["dtype", report["dtype"]],
        ["next token", f"{nt['text']!r} (p = {nt['probability']:.3f})"],
        ["detached reconstruction error", f"{report['relative_error']:.2e}"],
        ["plain Jacobian reconstruction error", f"{report['plain_relative_error']:.2e}"],
        ["homogeneity error (matrix-free)", f"{report['homogeneity_error']:.2e}"],
        ["next-token logit: value / reconstructed", f"{report['logit']['value']:.6f} / {report['logit']['reconstructed']:.6f}"],
    ]
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>eqlin report: {html.escape(report['text'])}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}}
table{{border-collapse:collapse;margin:1em 0;font-size:0.9em}}td,th{{border:1px solid #ccc;padding:3px 6px}}
figure{{margin:1.5em 0}}img{{max-width:100%}}figcaption{{color:#555}}</style></head>
<body><h1>eqlin: the exact linear map of one prediction</h1>
<p>Input: <code>{html.escape(report['text'])}</code></p>
{_table(["", ""], summary_rows)}
<h2>Per input token: J_t</h2>{per_token}
<h2>The layer story: every layer's maps</h2>{layer_section}
<h2>Figures</h2>{images}
</body></html>
"""


def _constant_row(report: dict[str, Any]) -> list[list[Any]]:
    """The constant c of a model with biases as its own row of the per-token table (none when c = 0)."""
    c = report.get("constant") or {}
    if not c.get("norm"):
        return []
    return [["c", "(constant: biases)", f"{c['norm']:.3g}", f"{c['logit']:.3g}", "", "",
             " ".join(repr(t) for t in c["tokens"]), ""]]


def _layer_section(report: dict[str, Any]) -> str:
    """The layer story's explanation and table (or a note that no layer was analysed)."""
    rows = report["layers"]
    if not rows:
        return "<p>No layer maps were computed (<code>--layers none</code>).</p>"
    info, nt = report["layer_analysis"], report["next_token"]
    scopes = [s for s in ("cumulative", "single") if s in rows[0]]
    parts = ("residual", "attn", "mlp")
    header = (["layer"] + [f"SR {s[:3]}. {p}" for s in scopes for p in parts]
              + [f"u₁ → {s[:3]}. {p}" for s in scopes[:1] for p in parts] + ["lens rank", "lens p", "max error"])
    body = [[r["layer"]] + [f"{r[s][p]['stable_rank']:.2f}" for s in scopes for p in parts]
            + [repr(r[s][p]["top_tokens"][0]) + (" ✓" if r[s][p]["u1_next_token_rank"] == 0 else "")
               for s in scopes[:1] for p in parts]
            + [r[scopes[0]]["residual"]["next_token_rank"], f"{r[scopes[0]]['residual']['next_token_probability']:.3g}",
               f"{max(r[s][p]['relative_error'] for s in scopes for p in parts):.1e}"]
            for r in rows]
    return f"""<p>For each analysed layer l, six exact linear maps y = Σ_t J_t x_t, each output read at the last
position through the final norm so that it decodes through the unembedding. <b>cumulative</b>: from the input
embeddings to layer l's output; <b>single</b>: from the residual stream entering layer l (every position) to
its output. <b>residual</b>: the stream after layer l; <b>attn</b>, <b>mlp</b>: that branch's output alone
({html.escape(info['tap_meaning'])}). Largest relative reconstruction error over all of them:
{info['max_relative_error']:.1e}; engines: {html.escape(', '.join(f'{k} {v}' for k, v in info['engines'].items()))}.</p>
<p>Columns: <b>SR</b> stable rank ‖J‖_F² / σ₁² (cum. = cumulative, sin. = single); <b>u₁ →</b> the token the
map's top left singular vector u₁ decodes to (✓: the model's next token {html.escape(repr(nt['text']))});
<b>lens rank</b>, <b>lens p</b>: the next token's rank (0 = top) and probability in the logit lens of the
residual stream after layer l; <b>max error</b>: the largest reconstruction error of the layer's maps.</p>
{_table(header, body)}"""


def write_report(result: Analysis, out: Path, *, quiet: bool = True) -> list[Path]:
    """Write report.json, the PNG figures and report.html as the whole content of `out`, swapped into
    place as one set (`eqlin.outputs.write_folder_atomic`). Returns the paths."""
    with stage("figures and report", quiet):
        pngs = figures(result)
        files = {**pngs, "report.json": json_text(result.report).encode(),
                 "report.html": render_html(result.report, pngs).encode()}
        return write_folder_atomic(out, files)


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
             + "   " + " ".join(f"{p:<13}" for p in parts) + " lens"]
    for r in rows:
        ranks = " | ".join(" ".join(f"{r[s][p]['stable_rank']:>6.2f}" for p in parts) for s in scopes)
        tokens = " ".join(f"{_short(r[scopes[0]][p]['top_tokens'][0], 11) + ('*' if r[scopes[0]][p]['u1_next_token_rank'] == 0 else ''):<13}"
                          for p in parts)
        lines.append(f"  {r['layer']:>5} {ranks}   {tokens} {r[scopes[0]]['residual']['next_token_rank']:>4}")
    return lines


def summary(report: dict[str, Any], out: Path) -> str:
    """The terminal summary of a report."""
    nt = report["next_token"]
    c = report.get("constant") or {}
    has_c = bool(c.get("norm"))
    lines = [
        f"model: {report['model']['source']} ({report['model']['family']}), dtype {report['dtype']}",
        f"input: {[t['text'] for t in report['tokens']]}",
        f"next token: {nt['text']!r}  p = {nt['probability']:.4f}",
        f"relative reconstruction error ‖y − {'(Σ_t J_t x_t + c)' if has_c else 'Σ_t J_t x_t'}‖/‖y‖: detached "
        f"{report['relative_error']:.2e}, "
        f"plain {report['plain_relative_error']:.2e}",
        "",
        "per input token: top singular values of J_t, top-1 token of u_i (unembedding) / v_i (nearest embedding)",
    ]
    for p in report["per_token"]:
        pairs = ", ".join(f"{s:.3g} [{u[0]!r} / {v[0]!r}]"
                          for s, u, v in zip(p["singular_values"], p["left_tokens"], p["right_tokens"]))
        lines.append(f"  {p['position']:>3} {p['token']!r:>14}  {pairs}")
    if has_c:
        lines.insert(4, f"constant c (biases; y = Σ_t J_t x_t + c): ‖c‖/‖y‖ = {c['relative_norm']:.3g}, "
                        f"through the unembedding {c['tokens'][:3]!r}")
    if report["layers"]:
        lines += [""] + _layer_lines(report)
    lines += ["", f"report: {out / 'report.html'} (and report.json, figures)"]
    return "\n".join(lines)
