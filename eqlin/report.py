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
    "layers.png": "Effective dimension (stable rank) of the cumulative layer maps",
}


def _png(draw: Callable[[Any], None], size: tuple[float, float]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=size, dpi=110)
    try:
        draw(fig)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        return buf.getvalue()
    finally:
        plt.close(fig)


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


def _layers(result: Analysis):
    maps = result.report["layer_maps"]

    def draw(fig):
        ax = fig.add_subplot(1, 1, 1)
        for part, style in (("residual", "-o"), ("attn", "--s"), ("mlp", ":^")):
            ax.plot(maps["layers"], maps[part]["stable_rank"], style, label=f"{part}: stable rank")
            ax.plot(maps["layers"], maps[part]["participation_ratio"], style, alpha=0.4,
                    label=f"{part}: participation ratio")
        ax.set_xlabel("layer")
        ax.set_ylabel("effective dimension")
        ax.legend(fontsize=7)
    return draw


def figures(result: Analysis) -> dict[str, bytes]:
    """PNG bytes by file name (the layer figure only when layer maps were computed)."""
    out = {"reconstruction.png": _png(_reconstruction(result), (9, 4)),
           "jacobian.png": _png(_jacobian(result), (10, 4.5)),
           "spectra.png": _png(_spectra(result), (8, 4.5))}
    if result.report["layer_maps"]["layers"]:
        out["layers.png"] = _png(_layers(result), (8, 4.5))
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
         for p in report["per_token"]])
    maps = report["layer_maps"]
    layer_table = _table(
        ["layer"] + [f"{part} stable rank" for part in ("residual", "attn", "mlp")] + ["max relative error"],
        [[l] + [f"{maps[part]['stable_rank'][i]:.2f}" for part in ("residual", "attn", "mlp")]
         + [f"{max(maps[part]['relative_error'][i] for part in ('residual', 'attn', 'mlp')):.1e}"]
         for i, l in enumerate(maps["layers"])]) if maps["layers"] else "<p>No layer maps were computed.</p>"
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
<h2>Layer maps (input embeddings → layer output, read through the final norm)</h2>{layer_table}
<h2>Figures</h2>{images}
</body></html>
"""


def write_report(result: Analysis, out: Path, *, quiet: bool = True) -> list[Path]:
    """Write report.json, the PNG figures and report.html as the whole content of `out`, swapped into
    place as one set (`eqlin.outputs.write_folder_atomic`). Returns the paths."""
    with stage("figures and report", quiet):
        pngs = figures(result)
        files = {**pngs, "report.json": json_text(result.report).encode(),
                 "report.html": render_html(result.report, pngs).encode()}
        return write_folder_atomic(out, files)


def summary(report: dict[str, Any], out: Path) -> str:
    """The terminal summary of a report."""
    nt = report["next_token"]
    lines = [
        f"model: {report['model']['source']} ({report['model']['family']}), dtype {report['dtype']}",
        f"input: {[t['text'] for t in report['tokens']]}",
        f"next token: {nt['text']!r}  p = {nt['probability']:.4f}",
        f"relative reconstruction error ‖y − Σ_t J_t x_t‖/‖y‖: detached {report['relative_error']:.2e}, "
        f"plain {report['plain_relative_error']:.2e}",
        "",
        "per input token: top singular values of J_t, top-1 token of u_i (unembedding) / v_i (nearest embedding)",
    ]
    for p in report["per_token"]:
        pairs = ", ".join(f"{s:.3g} [{u[0]!r} / {v[0]!r}]"
                          for s, u, v in zip(p["singular_values"], p["left_tokens"], p["right_tokens"]))
        lines.append(f"  {p['position']:>3} {p['token']!r:>14}  {pairs}")
    maps = report["layer_maps"]
    if maps["layers"]:
        lines += ["", "effective dimension (stable rank) of the cumulative layer maps:",
                  "  layer  residual      attn       mlp"]
        for i, l in enumerate(maps["layers"]):
            lines.append(f"  {l:>5} " + " ".join(f"{maps[part]['stable_rank'][i]:>9.2f}"
                                                  for part in ("residual", "attn", "mlp")))
    lines += ["", f"report: {out / 'report.html'} (and report.json, figures)"]
    return "\n".join(lines)
