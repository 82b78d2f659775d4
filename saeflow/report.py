"""The demo's report: one self-contained HTML file (images inlined) built from the stages'
saved results, so every number in it comes from the run that wrote the files."""

from __future__ import annotations

import base64
import html
import json
import os
import tempfile
from pathlib import Path

CSS = """
body{font:15px/1.5 system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{margin-bottom:.2em} h2{margin-top:2em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.8em 0;font-size:13px} td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}
th{background:#f5f5f5} td.l,th.l{text-align:left} img{max-width:100%} .muted{color:#666;font-size:13px}
.gen{display:grid;grid-template-columns:140px 1fr;gap:2px 12px;font-size:13px;margin:.5em 0 1.2em}
.gen div:nth-child(odd){color:#555;font-weight:600} .svg svg{max-width:100%;height:auto}
code{background:#f3f3f3;padding:1px 4px;border-radius:3px}
"""


def _e(x) -> str:
    return html.escape(str(x))


def _img(path: Path, alt: str) -> str:
    if not path.exists():
        return f'<p class="muted">({_e(alt)}: not produced)</p>'
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def _table(header: list[str], rows: list[list], left: int = 1) -> str:
    def cell(i, v, tag):
        cls = ' class="l"' if i < left else ""
        if isinstance(v, float):
            v = f"{v:.3f}"
        return f"<{tag}{cls}>{_e(v)}</{tag}>"
    head = "".join(cell(i, h, "th") for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(cell(i, v, "td") for i, v in enumerate(r)) + "</tr>"
                   for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _quality(suite) -> str:
    summary = (suite.info or {}).get("quality_summary") or {}
    if not summary:
        return '<p class="muted">No quality table stored with this suite.</p>'
    metrics = sorted({m for v in summary.values() for m in v})
    rows = [[kind, *[v.get(m, float("nan")) for m in metrics]] for kind, v in summary.items()]
    qpng = Path(suite.root) / "quality.png" if suite.root else Path("/nonexistent")
    return ("<p>Medians over the SAEs of each kind, on held-out text (first token excluded).</p>"
            + _table(["kind", *metrics], rows) + _img(qpng, "SAE quality per layer"))


def _lineage(atlas, out: Path) -> str:
    fr = atlas.class_fractions()
    classes = list(next(iter(fr.values())))
    rows = [[layer, *[100 * fr[layer][c] for c in classes]] for layer in sorted(fr)]
    rows = [[r[0], *[f"{v:.1f}%" for v in r[1:]]] for r in rows]
    return (f"<p>Every residual feature of every layer is matched, from decoder weights alone, "
            f"against the previous residual SAE and this layer's MLP and attention SAEs, and "
            f"classified. Thresholds: {_e(atlas.info.get('threshold_rule', ''))}</p>"
            + _img(out / "lineage.png", "lineage classes over depth")
            + "<details><summary>class shares per layer</summary>"
            + _table(["layer", *[c.replace('_', ' ') for c in classes]], rows) + "</details>")


def _graphs(graphs: dict) -> str:
    parts = []
    for theme, g in graphs.items():
        graph = g["graph"]
        layers = sorted({n.feature.layer for n in graph.nodes})
        nodes = [[str(n.feature), n.lineage or "", n.label, n.score] for n in graph.nodes[:40]]
        parts.append(
            f"<h3>{_e(theme)}: seed <code>{_e(g['seed'])}</code></h3>"
            f"<p>{len(graph.nodes)} features, {len(graph.edges)} edges, layers "
            f"{layers[0]}&ndash;{layers[-1]}. Labels are the tokens each decoder row promotes "
            f"through the unembedding.</p><div class=\"svg\">{g['svg']}</div>"
            "<details><summary>nodes</summary>"
            + _table(["feature", "lineage", "label", "cos"], nodes, left=3) + "</details>")
    return "".join(parts)


def _steering(out: Path, themes) -> str:
    from saeflow.demo import slug
    sdir = out / "steering"
    summary = json.loads((sdir / "summary.json").read_text())
    comp = summary["comparison"]
    rows = []
    for theme, c in comp.items():
        row = [theme, c["unsteered"]["heldout"], c["prompting"]["heldout"]]
        for m in ("single", "cumulative"):
            row += [c[m]["heldout"], c[m]["cell"]] if m in c else ["-", "-"]
        rows.append(row)
    parts = ["<p>Score = topic &times; coherence, each in [0, 1] (topic: calibrated sentence-"
             "embedding similarity to the theme; coherence: calibrated perplexity under the "
             "unsteered model times a repetition penalty). Each mode's best cell (layer, "
             "coefficient) is picked on the first sampling seed and scored on the others.</p>",
             _table(["theme", "unsteered", "prompting", "single", "best single cell",
                     "cumulative", "best cumulative cell"], rows, left=1),
             _img(sdir / "overview.png", "steering overview")]
    for theme in themes:
        res = json.loads((sdir / slug(theme) / "results.json").read_text())
        cells = res["cells"]
        best = {m: comp[theme][m]["cell"] for m in ("single", "cumulative") if m in comp[theme]}
        show = [("unsteered", "unsteered"), ("prompting", "prompting")] + \
               [(f"{m} (best: {c})", c) for m, c in best.items()]
        gens = []
        for name, key in show:
            g = cells[key]["generations"][0]
            gens.append(f"<div>{_e(name)}</div><div>{_e(g['prompt'])}<b>{_e(g['text'])}</b> "
                        f"<span class='muted'>(topic {g['topic']:.2f}, coherence "
                        f"{g['coherence']:.2f})</span></div>")
        parts.append(f"<h3>{_e(theme)}</h3>" + _img(sdir / slug(theme) / "scores.png", theme)
                     + "<div class='gen'>" + "".join(gens) + "</div>")
    return "".join(parts)


def _deactivation(out: Path) -> str:
    d = out / "deactivation"
    data = json.loads((d / "summary.json").read_text())
    rows = [[r["strategy"], r["kind"], r["n"], r["success_rate"], r["mean_change"],
             r["median_change"]] for r in data["summary"] if r["layer"] == "all"]
    return ("<p>At tokens where a residual feature is active, its matched predecessor (at the "
            "previous residual, this layer's MLP or attention SAE) is switched off at that token "
            "only and the rest of the forward pass is recomputed. Success: the target went to "
            "zero. For context, the paper reports on Gemma 2 2B: top-1 cosine 65% success / 0.75 "
            "mean change; top-1 Pearson 65% / 0.74.</p>"
            + _table(["strategy", "predecessor", "pairs", "success rate", "mean change",
                      "median change"], rows, left=2)
            + _img(d / "success_by_layer.png", "success rate by strategy and layer"))


def write_report(out: Path, suite, atlas, graphs: dict, cfg, timings: dict) -> Path:
    widths = sorted(set(atlas.widths.values()))
    secs = ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
    body = [
        f"<h1>saeflow report: {_e(suite.name)}</h1>",
        f"<p class='muted'>model {_e(atlas.model)}; {len(suite)} SAEs at "
        f"{len(atlas.layers)} layers (res, mlp, att), widths {_e(widths)}; stage times: "
        f"{_e(secs)}{' (--quick: a small suite for CI)' if cfg.quick else ''}</p>",
        "<h2>1. The SAEs</h2>", _quality(suite),
        "<h2>2. Where features come from: lineage over depth</h2>", _lineage(atlas, out),
        "<h2>3. Flow graphs of the theme seeds</h2>", _graphs(graphs),
        "<h2>4. Do the matches hold causally?</h2>", _deactivation(out),
        "<h2>5. Steering with whole flow graphs</h2>", _steering(out, cfg.themes),
        "<h2>Explore</h2><p>Open the atlas in the viewer: <code>saeflow view "
        f"{_e(atlas.root)}</code>, then http://127.0.0.1:8765. Raw results are beside this "
        "file: <code>steering/</code>, <code>deactivation/</code>, <code>graphs/</code>.</p>",
    ]
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>saeflow report</title>"
            f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>")
    path = out / "report.html"
    fd, tmp = tempfile.mkstemp(prefix=".report.", suffix=".html", dir=out)
    with os.fdopen(fd, "w") as f:
        f.write(page)
    os.replace(tmp, path)
    return path
