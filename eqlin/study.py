"""The paper's statistics over a prompt set, computed from its reports (the lines of reports.jsonl) alone,
each held as its digest (`eqlin.digest`: the fields read here).

`summarize(digests, lines, record)` returns study.json's content; `write_study` writes it with the
figures and a self-contained study.html into the set's folder, each file atomically.

study.json:
    schema          "eqlin.study/1"
    prompts_file, request, skipped      from set.json (`eqlin.prompt_sets`)
    prompts         distinct prompts in the file; reports: how many are summarised
    reconstruction  threshold (1e-13) and, over the reports: detached {count, min, median, max,
                    at_most_threshold (a count), fraction_at_most_threshold, worst {line, text, value}};
                    plain {count, min, median, max} (the plain Jacobian's ‖y − Σ_t J_t x_t‖/‖y‖);
                    homogeneity {median, max}; logit {max} (the next token's logit, reconstructed);
                    layer_maps {reports, max} (the largest error over every layer map of a report)
    stable_rank     {scope: {part: [{layer, prompts, min, q1, median, q3, max}]}}: the stable rank
                    ‖J‖_F²/σ_1² of each layer map, over the reports that analysed that layer ({}: none did)
    emergence       {layers: [{layer, prompts, lens_top1, u1_top1 {part}, lens_rank_median}], first_layer
                    {prompts, median, counts [{layer, prompts}]}} or null (no layer maps). lens_top1: the
                    fraction of prompts whose next token is top-1 in the logit lens of the residual stream
                    after the layer; u1_top1: the fraction whose cumulative map's u_1 decodes to it;
                    first_layer: the first analysed layer from which the next token stays top-1 in the
                    logit lens through the last analysed layer
    tokens          the most frequent decoded tokens, [{token, count}] each: next_token (the predictions),
                    final_u1 / final_v1 (u_1 through the unembedding / v_1's nearest embedding, of every J_t
                    of every prompt), layer_u1 {part: u_1 of every cumulative layer map}
    per_prompt      [{line, text, tokens, next_token, probability, relative_error, plain_relative_error,
                    layer_max_error, first_layer}]
"""

from __future__ import annotations

import base64
import collections
import html
from pathlib import Path
from typing import Any

import numpy as np

from eqlin.digest import PARTS, SCOPES
from eqlin.errors import OutputError
from eqlin.outputs import check_output_dir, json_text, write_bytes_atomic
from eqlin.prompt_sets import EXACT, SET_KIND
from eqlin.report import PART_COLORS, render_png

STUDY_SCHEMA = "eqlin.study/1"
TOP_TOKENS = 15
FIGURES = {
    "errors.png": "Relative reconstruction error of each prompt's final map: detached vs plain Jacobian",
    "stable_rank.png": "Stable rank of every layer map: median and quartiles over the prompts",
    "emergence.png": "Where the predicted token emerges, by layer",
}


def _stats(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    q1, median, q3 = np.percentile(a, [25, 50, 75])
    return {"min": float(a.min()), "q1": float(q1), "median": float(median), "q3": float(q3), "max": float(a.max())}


def _most_common(tokens: list[str]) -> list[dict[str, Any]]:
    return [{"token": t, "count": c} for t, c in collections.Counter(tokens).most_common(TOP_TOKENS)]


def first_layer(d: dict[str, Any]) -> int | None:
    """The first analysed layer from which the next token stays top-1 in the logit lens of the residual
    stream through the last analysed layer (None: not at the last one either, or no layers), from a
    report's digest."""
    found = None
    for layer, rank in zip(d["layers"], d["lens_rank"]):
        if rank == 0:
            found = layer if found is None else found
        else:
            found = None
    return found


def _reconstruction(digests: list[dict[str, Any]], lines: list[int]) -> dict[str, Any]:
    detached = [d["relative_error"] for d in digests]
    plain = [d["plain_relative_error"] for d in digests]
    worst = int(np.argmax(detached))
    within = sum(e <= EXACT for e in detached)
    layer_errors = [d["layer_max_error"] for d in digests if d["layers"]]
    return {
        "threshold": EXACT,
        "detached": {"count": len(detached), **{k: v for k, v in _stats(detached).items() if k in ("min", "median", "max")},
                     "at_most_threshold": within, "fraction_at_most_threshold": within / len(detached),
                     "worst": {"line": lines[worst], "text": digests[worst]["text"], "value": detached[worst]}},
        "plain": {"count": len(plain), **{k: v for k, v in _stats(plain).items() if k in ("min", "median", "max")}},
        "homogeneity": {k: v for k, v in _stats([d["homogeneity_error"] for d in digests]).items()
                        if k in ("median", "max")},
        "logit": {"max": max(d["logit_error"] for d in digests)},
        "layer_maps": {"reports": len(layer_errors), "max": max(layer_errors) if layer_errors else None},
    }


def _by_layer(digests: list[dict[str, Any]]) -> dict[int, list[tuple[dict[str, Any], int]]]:
    """{layer: [(digest, the layer's index in it)]} over the digests that analysed the layer."""
    rows: dict[int, list[tuple[dict[str, Any], int]]] = collections.defaultdict(list)
    for d in digests:
        for i, layer in enumerate(d["layers"]):
            rows[layer].append((d, i))
    return dict(sorted(rows.items()))


def _stable_rank(by_layer: dict[int, list[tuple[dict[str, Any], int]]]) -> dict[str, Any]:
    if not by_layer:
        return {}
    return {scope: {part: [{"layer": l, "prompts": len(rows), **_stats([d["stable_rank"][scope][part][i]
                                                                        for d, i in rows])}
                           for l, rows in by_layer.items()] for part in PARTS} for scope in SCOPES}


def _emergence(digests: list[dict[str, Any]], by_layer: dict[int, list[tuple[dict[str, Any], int]]]
               ) -> dict[str, Any] | None:
    if not by_layer:
        return None
    layers = []
    for l, rows in by_layer.items():
        ranks = [d["lens_rank"][i] for d, i in rows]
        layers.append({"layer": l, "prompts": len(rows), "lens_top1": sum(k == 0 for k in ranks) / len(rows),
                       "u1_top1": {part: sum(d["u1_rank"][part][i] == 0 for d, i in rows) / len(rows)
                                   for part in PARTS},
                       "lens_rank_median": float(np.median(ranks))})
    firsts = [first_layer(d) for d in digests if d["layers"]]
    found = [f for f in firsts if f is not None]
    counts = collections.Counter(found)
    return {"layers": layers, "first_layer": {"prompts": len(firsts), "median": float(np.median(found)) if found else None,
                                              "counts": [{"layer": l, "prompts": counts[l]} for l in sorted(counts)]}}


def _tokens(digests: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "next_token": _most_common([d["next_token"] for d in digests]),
        "final_u1": _most_common([t for d in digests for t in d["final_u1"]]),
        "final_v1": _most_common([t for d in digests for t in d["final_v1"]]),
        "layer_u1": {part: _most_common([t for d in digests for t in d["layer_u1"][part]]) for part in PARTS},
    }


def summarize(digests: list[dict[str, Any]], lines: list[int], record: dict[str, Any]) -> dict[str, Any]:
    """study.json's content (module docstring) from the digests of the set's reports (`eqlin.digest`),
    their prompt file `lines`, and set.json's `record`."""
    by_layer = _by_layer(digests)
    return {
        "schema": STUDY_SCHEMA, "prompts_file": record["prompts_file"], "request": record["request"],
        "prompts": record["prompts"], "reports": len(digests), "skipped": record["skipped"],
        "reconstruction": _reconstruction(digests, lines) if digests else None,
        "stable_rank": _stable_rank(by_layer),
        "emergence": _emergence(digests, by_layer),
        "tokens": _tokens(digests),
        "per_prompt": [{"line": line, "text": d["text"], "tokens": d["token_count"], "next_token": d["next_token"],
                        "probability": d["probability"], "relative_error": d["relative_error"],
                        "plain_relative_error": d["plain_relative_error"], "layer_max_error": d["layer_max_error"],
                        "first_layer": first_layer(d)}
                       for line, d in zip(lines, digests)],
    }


# --------------------------------------------------------------------------------------------------
# Figures.


def _errors_figure(digests: list[dict[str, Any]]):
    from matplotlib.ticker import MaxNLocator

    detached = np.array([d["relative_error"] for d in digests])
    plain = np.array([d["plain_relative_error"] for d in digests])

    def draw(fig):
        ax = fig.add_subplot(1, 1, 1)
        floor = 1e-18  # an error of exactly 0 is drawn here (and said so)
        values = np.maximum(np.concatenate([detached, plain]), floor)
        lo, hi = np.floor(np.log10(values.min())), np.ceil(np.log10(values.max())) + 1e-9
        bins = np.logspace(lo, hi, int(round((hi - lo) * 4)) + 1)
        for errors, label, color in [(detached, "detached Jacobian", "tab:blue"), (plain, "plain Jacobian", "tab:red")]:
            zeros = int(np.sum(errors == 0))
            ax.hist(np.maximum(errors, floor), bins=bins, color=color, alpha=0.7,
                    label=f"{label} ({len(errors)} prompts{f'; {zeros} exactly 0, drawn at 1e-18' if zeros else ''})")
        ax.axvline(EXACT, color="black", ls="--", lw=1, label="1e-13 (the float64 bound)")
        ax.set_xscale("log")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("relative reconstruction error ‖y − Σ_t J_t x_t‖ / ‖y‖ (log scale)")
        ax.set_ylabel("prompts")
        ax.set_title(f"Final map of each prompt, {len(digests)} prompts", fontsize=10)
        ax.legend(fontsize=8)
    return draw


def _measured(layers: list[int]) -> tuple[np.ndarray, bool]:
    x = np.asarray(layers)
    return x, bool(len(x) > 1 and np.all(np.diff(x) == 1))


def _stable_rank_figure(stable_rank: dict[str, Any], n_reports: int):
    def draw(fig):
        for i, scope in enumerate(SCOPES):
            ax = fig.add_subplot(1, 2, i + 1)
            for j, part in enumerate(PARTS):
                rows = stable_rank[scope][part]
                x, contiguous = _measured([row["layer"] for row in rows])
                median = np.array([row["median"] for row in rows])
                spread = np.array([[row["median"] - row["q1"] for row in rows], [row["q3"] - row["median"] for row in rows]])
                ax.errorbar(x + (j - 1) * 0.15, median, yerr=spread, fmt="o", ms=4, capsize=2, lw=1,
                            color=PART_COLORS[part], ls="-" if contiguous else "none", label=part)
            layers = [row["layer"] for row in stable_rank[scope]["residual"]]
            ax.set_xticks(layers if len(layers) <= 18 else layers[::max(1, len(layers) // 9)])
            ax.set_xlabel("layer")
            ax.set_ylabel("stable rank ‖J‖_F² / σ_1²")
            ax.set_title(f"{scope} maps ({'input embeddings' if scope == 'cumulative' else 'layer input'} → layer "
                         f"output): median, bars q1–q3", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, title="part", title_fontsize=8)
        fig.suptitle(f"Stable rank over {n_reports} prompts (markers only at analysed layers)", fontsize=10)
    return draw


def _emergence_figure(emergence: dict[str, Any]):
    from matplotlib.ticker import MaxNLocator

    rows = emergence["layers"]
    x, contiguous = _measured([row["layer"] for row in rows])
    style = "-" if contiguous else "none"

    def draw(fig):
        ax = fig.add_subplot(1, 2, 1)
        ax.plot(x, [row["lens_top1"] for row in rows], marker="s", ls=style, color="black",
                label="top-1 in the logit lens of the residual stream")
        for j, part in enumerate(PARTS):  # offset sideways so that equal fractions stay visible
            ax.plot(x + (j - 1) * 0.12, [row["u1_top1"][part] for row in rows], marker="o", ms=4, ls=style, lw=1,
                    color=PART_COLORS[part], label=f"u_1 of the cumulative {part} map decodes to it")
        ax.set_ylim(-0.03, 1.03)
        ax.set_xticks(x if len(x) <= 18 else x[::max(1, len(x) // 9)])
        ax.set_xlabel("layer")
        ax.set_ylabel("fraction of prompts")
        ax.set_title("The model's next token, read at each layer", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax = fig.add_subplot(1, 2, 2)
        first = emergence["first_layer"]
        ax.bar([c["layer"] for c in first["counts"]], [c["prompts"] for c in first["counts"]], color="tab:gray")
        ax.set_xticks(x if len(x) <= 18 else x[::max(1, len(x) // 9)])
        ax.set_xlim(x.min() - 0.7, x.max() + 0.7)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("first layer from which the next token stays top-1 in the logit lens")
        ax.set_ylabel("prompts")
        ax.set_title(f"Emergence layer of each of {first['prompts']} prompts", fontsize=9)
    return draw


def figures(summary: dict[str, Any], digests: list[dict[str, Any]]) -> dict[str, bytes]:
    """PNG bytes by file name; the layer figures only when layer maps were analysed."""
    if not digests:
        return {}
    out = {"errors.png": render_png(_errors_figure(digests), (9, 4))}
    if summary["stable_rank"]:
        out["stable_rank.png"] = render_png(_stable_rank_figure(summary["stable_rank"], len(digests)), (13, 4.8))
        out["emergence.png"] = render_png(_emergence_figure(summary["emergence"]), (13, 4.5))
    return out


# --------------------------------------------------------------------------------------------------
# study.html, the terminal summary, writing.


def _table(header: list[str], rows: list[list[Any]]) -> str:
    cells = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{cells}</tr></thead><tbody>{body}</tbody></table>"


def _tokens_table(tokens: list[dict[str, Any]]) -> list[str]:
    return [f"{t['token']!r} ×{t['count']}" for t in tokens]


def headline(summary: dict[str, Any]) -> list[str]:
    """The study's numbers in a few lines (terminal and study.html)."""
    rec = summary["reconstruction"]
    if rec is None:
        return [f"no reports: all {summary['prompts']} prompts were skipped"]
    d, p = rec["detached"], rec["plain"]
    lines = [f"detached reconstruction error over {d['count']} prompts: max {d['max']:.2e}, median {d['median']:.2e}; "
             f"{d['at_most_threshold']} of {d['count']} ({100 * d['fraction_at_most_threshold']:.0f} %) ≤ {EXACT:.0e}",
             f"plain Jacobian error: median {p['median']:.3g} (min {p['min']:.3g}, max {p['max']:.3g})"]
    if rec["layer_maps"]["reports"]:
        lines.append(f"layer maps: largest error {rec['layer_maps']['max']:.2e} over {rec['layer_maps']['reports']} "
                     "prompts' maps")
    em = summary["emergence"]
    if em:
        sr = summary["stable_rank"]["cumulative"]["residual"]
        lines.append("stable rank of the cumulative residual map, median by layer: "
                     + ", ".join(f"{row['layer']}: {row['median']:.1f}" for row in sr))
        if em["first_layer"]["median"] is not None:
            lines.append(f"the next token becomes and stays top-1 in the logit lens at layer "
                         f"{em['first_layer']['median']:g} (median over {em['first_layer']['prompts']} prompts)")
    lines.append("most frequent next tokens: " + ", ".join(_tokens_table(summary["tokens"]["next_token"][:8])))
    return lines


def render_html(summary: dict[str, Any], pngs: dict[str, bytes]) -> str:
    """A self-contained page: the headline numbers, tables and every figure inlined as data URIs."""
    req, rec = summary["request"], summary["reconstruction"]

    def image(name: str) -> str:
        if name not in pngs:
            return ""
        data = base64.b64encode(pngs[name]).decode()
        return (f"<figure><img alt=\"{html.escape(FIGURES[name])}\" src=\"data:image/png;base64,{data}\">"
                f"<figcaption>{html.escape(FIGURES[name])}</figcaption></figure>")

    about = _table(["", ""], [
        ["prompts file", summary["prompts_file"]], ["model", req["source"]], ["checkpoint", req["checkpoint"]],
        ["dtype", req["dtype"]], ["options", f"--layers {req['layers']} --top-k {req['top_k']} --branch-tap "
                                             f"{req['branch_tap']} --layer-engine {req['layer_engine']}"],
        ["prompts", f"{summary['prompts']} distinct, {summary['reports']} reported, {len(summary['skipped'])} lines "
                    "skipped"]])
    numbers = "".join(f"<li>{html.escape(line)}</li>" for line in headline(summary))
    sections = [f"<h2>Reconstruction</h2><p>For each prompt, the relative error ‖y − Σ_t J_t x_t‖/‖y‖ of the final "
                "map (y: the final hidden state at the last position): the detached Jacobian reconstructs y exactly "
                f"(to float64 rounding; the paper's bound is {EXACT:.0e}), the plain autograd Jacobian does not.</p>"
                f"{image('errors.png')}"]
    if rec:
        sections.append(_table(["error", "count", "min", "median", "max"], [
            ["detached ‖y − Σ_t J_t x_t‖/‖y‖", rec["detached"]["count"], f"{rec['detached']['min']:.2e}",
             f"{rec['detached']['median']:.2e}", f"{rec['detached']['max']:.2e}"],
            ["plain Jacobian", rec["plain"]["count"], f"{rec['plain']['min']:.3g}", f"{rec['plain']['median']:.3g}",
             f"{rec['plain']['max']:.3g}"]]))
    if not summary["stable_rank"]:
        sections.append("<h2>Layers</h2><p>No layer maps were analysed (<code>--layers none</code>): run the study "
                        "with layers (into another --out) for stable rank by layer and where the prediction "
                        "emerges.</p>")
    else:
        sr, em = summary["stable_rank"], summary["emergence"]
        header = ["layer", "prompts"] + [f"{s[:3]}. {p}" for s in SCOPES for p in PARTS]
        rows = [[row["layer"], row["prompts"]] + [
            f"{sr[s][p][i]['median']:.2f} [{sr[s][p][i]['q1']:.2f}, {sr[s][p][i]['q3']:.2f}]" for s in SCOPES for p in PARTS]
            for i, row in enumerate(sr["cumulative"]["residual"])]
        sections.append(f"<h2>Effective dimension by layer</h2>{image('stable_rank.png')}<p>Stable rank ‖J‖_F²/σ₁², "
                        "median [q1, q3] over the prompts that analysed the layer; cum. = cumulative (input "
                        "embeddings → layer output), sin. = single (layer input → output).</p>" + _table(header, rows))
        rows = [[row["layer"], row["prompts"], f"{row['lens_top1']:.2f}", *(f"{row['u1_top1'][p]:.2f}" for p in PARTS),
                 f"{row['lens_rank_median']:g}"] for row in em["layers"]]
        sections.append("<h2>Where the prediction emerges</h2><p>For each analysed layer, the fraction of prompts whose "
                        "next token (the model's own prediction) is top-1 in the logit lens of the residual stream "
                        "after that layer (read through the final norm and the unembedding), and the fraction whose "
                        "cumulative map's top left singular vector u₁ decodes to it. <b>emerges at</b> (per prompt, "
                        "below): the first analysed layer from which the next token stays top-1 in the logit lens "
                        f"through the last analysed layer.</p>{image('emergence.png')}" + _table(
            ["layer", "prompts", "top-1 in the logit lens", "u₁ residual", "u₁ attn", "u₁ mlp", "median lens rank"],
            rows))
    tok = summary["tokens"]
    columns = [("next token", tok["next_token"]), ("u₁ of J_t", tok["final_u1"]), ("v₁ of J_t", tok["final_v1"])]
    columns += [(f"u₁ of cumulative {p} maps", tok["layer_u1"][p]) for p in PARTS if tok["layer_u1"][p]]
    depth = max(len(c) for _, c in columns)
    sections.append("<h2>Most frequent decoded tokens</h2>" + _table(
        [name for name, _ in columns],
        [[_tokens_table(c)[i] if i < len(c) else "" for _, c in columns] for i in range(depth)]))
    sections.append("<h2>Prompts</h2>" + _table(
        ["line", "prompt", "tokens", "next token", "p", "error", "plain error", "layer maps' max error", "emerges at"],
        [[p["line"], p["text"], p["tokens"], repr(p["next_token"]), f"{p['probability']:.3f}",
          f"{p['relative_error']:.1e}", f"{p['plain_relative_error']:.3g}",
          "" if p["layer_max_error"] is None else f"{p['layer_max_error']:.1e}",
          "" if p["first_layer"] is None else p["first_layer"]] for p in summary["per_prompt"]]))
    if summary["skipped"]:
        sections.append("<h2>Skipped lines</h2>" + _table(["line", "text", "reason"], [
            [s["line"], s["text"], s["reason"]] for s in summary["skipped"]]))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>eqlin study: {html.escape(summary['prompts_file'])}</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}}
table{{border-collapse:collapse;margin:1em 0;font-size:0.85em}}td,th{{border:1px solid #ccc;padding:3px 6px}}
figure{{margin:1.5em 0}}img{{max-width:100%}}figcaption{{color:#555}}</style></head>
<body><h1>eqlin study: exact linear maps over a prompt set</h1>
{about}<ul>{numbers}</ul>
{''.join(sections)}
</body></html>
"""


def write_study(summary: dict[str, Any], digests: list[dict[str, Any]], out: Path) -> list[Path]:
    """Write study.json, the figures and study.html into `out`, each file atomically, and remove a figure
    of an earlier study that this one does not have. `out` must be a prompt set's folder that eqlin marked
    (`eqlin.outputs.check_output_dir`): a folder of the user's own images is never written into. Returns the
    written paths."""
    out = check_output_dir(out, SET_KIND)
    pngs = figures(summary, digests)
    files = {"study.json": json_text(summary).encode(), **pngs, "study.html": render_html(summary, pngs).encode()}
    try:
        for name, data in files.items():
            write_bytes_atomic(out / name, data)
        for name in set(FIGURES) - set(pngs):
            (out / name).unlink(missing_ok=True)
    except OSError as e:
        raise OutputError(f"cannot write the study into {out}: {e.strerror or e}; the reports are kept; free space on "
                          "that disk and run eqlin study again (it reuses them)") from None
    return [out / name for name in files]
