"""The demo's report: one self-contained HTML file (images inlined) rendered from the stages'
result objects (``SteerEvalResult``, ``DeactivationResult``, the atlas and the flow graphs), so
every number in it comes from the run that wrote the raw files beside it."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from saeflow.io import write_text

CSS = """
body{font:15px/1.5 system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{margin-bottom:.2em} h2{margin-top:2em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.8em 0;font-size:13px} td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}
th{background:#f5f5f5} td.l,th.l{text-align:left} img{max-width:100%} .muted{color:#666;font-size:13px}
.gen{display:grid;grid-template-columns:140px 1fr;gap:2px 12px;font-size:13px;margin:.5em 0 1.2em}
.gen div:nth-child(odd){color:#555;font-weight:600}
.svg{overflow-x:auto;border:1px solid #eee} .svg svg{max-width:none;height:auto}
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


def _graphs(graphs: dict, cfg) -> str:
    parts = [f"<p>Each seed's ancestors and descendants: the residual chain of top-1 matches, "
             f"kept while its cosine is at least {cfg.res_threshold:g}, with the MLP and "
             f"attention features it is built from (cosine at least {cfg.block_threshold:g}). "
             f"The steering below uses these same graphs.</p>"]
    for theme, g in graphs.items():
        graph = g["graph"]
        layers = sorted({n.feature.layer for n in graph.nodes})
        nodes = [[str(n.feature), n.lineage or "", n.label, n.score] for n in graph.nodes[:40]]
        fires = (f" It is the feature that fires most specifically on {_e(theme)} text, most "
                 f"strongly at the token <code>{_e(repr(g['fires_on']))}</code>."
                 if g.get("fires_on") else "")
        parts.append(
            f"<h3>{_e(theme)}: seed <code>{_e(g['seed'])}</code></h3>"
            f"<p>{len(graph.nodes)} features, {len(graph.edges)} edges, layers "
            f"{layers[0]}&ndash;{layers[-1]}.{fires} Node labels are the tokens each decoder "
            f"row promotes through the unembedding; the drawing keeps its size (scroll "
            f"sideways through a long graph).</p><div class=\"svg\">{g['svg']}</div>"
            "<details><summary>nodes</summary>"
            + _table(["feature", "lineage", "label", "cos"], nodes, left=3) + "</details>")
    return "".join(parts)


def _steering(steering) -> str:
    comp = steering.comparison
    rows = []
    for theme, c in comp.items():
        row = [theme, _pm(c["unsteered"]), _pm(c["prompting"])]
        for m in ("single", "cumulative"):
            row += [_pm(c[m]), c[m]["cell"].split("/", 1)[1]] if m in c else ["-", "-"]
        rows.append(row)
    n = next(iter(comp.values()))["unsteered"].get("n_heldout")
    parts = ["<p>Each theme's seed feature and its flow graph are added to the residual stream "
             "while the model writes from neutral prompts. <b>Single-layer</b> steers the graph's "
             "features at one layer; <b>cumulative</b> steers every graph feature at that layer "
             "and all earlier ones. <b>Prompting</b> asks for the theme in words instead. Score = "
             "topic &times; coherence, each in [0, 1] (topic: calibrated sentence-embedding "
             "similarity to the theme; coherence: calibrated perplexity under the unsteered "
             "model times a repetition penalty). Each mode's best cell (layer / coefficient, the "
             "coefficient a fraction of the layer's typical residual norm) is picked on half of "
             "the generations and scored on the other half"
             + (f" ({n} generations, mean &plusmn; standard error)" if n else "") + ".</p>",
             _table(["theme", "unsteered", "prompting", "single", "best single (layer / coef)",
                     "cumulative", "best cumulative (layer / coef)"], rows, left=1),
             _reading(comp), _img(steering.out / "overview.png", "steering overview")]
    for run in steering.runs:
        cells = {r.cell: r for r in run.results}
        best = {m: run.comparison[m]["cell"] for m in ("single", "cumulative")
                if m in run.comparison}
        show = [("unsteered", "unsteered"), ("prompting", "prompting")] + \
               [(f"{m} (best: {c})", c) for m, c in best.items()]
        gens = []
        for name, key in show:
            g = cells[key].generations[0]
            gens.append(f"<div>{_e(name)}</div><div>{_e(g['prompt'])}<b>{_e(g['text'])}</b> "
                        f"<span class='muted'>(topic {g['topic']:.2f}, coherence "
                        f"{g['coherence']:.2f})</span></div>")
        parts.append(f"<h3>{_e(run.theme)}</h3>" + _img(run.folder / "scores.png", run.theme)
                     + "<div class='gen'>" + "".join(gens) + "</div>")
    return "".join(parts)


def _pm(c: dict) -> str:
    se = c.get("heldout_se")
    return f"{c['heldout']:.3f}" + (f" ± {se:.3f}" if se is not None and se == se else "")


def _reading(comp: dict) -> str:
    """What the steering table says, in words, from its own numbers: a difference counts only
    when it exceeds twice its standard error."""
    def verdict(a: dict, b: dict) -> int:
        se = ((a.get("heldout_se") or 0.0) ** 2 + (b.get("heldout_se") or 0.0) ** 2) ** 0.5
        d = a["heldout"] - b["heldout"]
        return 0 if se != se or abs(d) <= 2 * se else (1 if d > 0 else -1)

    both = {t: c for t, c in comp.items() if "single" in c and "cumulative" in c}
    if not both:
        return ""
    modes = {t: verdict(c["cumulative"], c["single"]) for t, c in both.items()}
    steer = {t: verdict(max(c["single"], c["cumulative"], key=lambda m: m["heldout"]),
                        c["prompting"]) for t, c in both.items()}

    def names(v: dict, sign: int) -> str:
        return _e(", ".join(t for t, x in v.items() if x == sign) or "none")

    return ("<p><b>Reading</b> (a difference counts when it exceeds twice its standard error): "
            f"cumulative beats single-layer on {names(modes, 1)}; single-layer beats cumulative "
            f"on {names(modes, -1)}; no clear difference on {names(modes, 0)}. The better "
            f"steering mode beats prompting on {names(steer, 1)}, loses to it on "
            f"{names(steer, -1)}, and ties on {names(steer, 0)}.</p>")


def _deactivation(result, folder: Path) -> str:
    rows = [[r.strategy, r.kind, r.n, r.success_rate, r.mean_change, r.median_change]
            for r in result.summary if r.layer == "all"]
    return ("<p>At tokens where a residual feature is active, its matched predecessor (at the "
            "previous residual, this layer's MLP or attention SAE) is switched off at that token "
            "only and the rest of the forward pass is recomputed. Success: the target went to "
            "zero. For context, the paper reports on Gemma 2 2B: top-1 cosine 65% success / 0.75 "
            "mean change; top-1 Pearson 65% / 0.74.</p>"
            + _table(["strategy", "predecessor", "pairs", "success rate", "mean change",
                      "median change"], rows, left=2)
            + _img(folder / "success_by_layer.png", "success rate by strategy and layer"))


def write_report(out: Path, suite, atlas, graphs: dict, cfg, timings: dict, steering,
                 deactivation) -> Path:
    """``out/report.html`` from the demo's results: ``graphs`` per theme (seed, graph, svg,
    fires_on), ``steering`` a ``SteerEvalResult``, ``deactivation`` a ``DeactivationResult``
    (saved under ``out/deactivation``)."""
    widths = sorted(set(atlas.widths.values()))
    secs = ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
    body = [
        f"<h1>saeflow report: {_e(suite.name)}</h1>",
        "<p>Sparse autoencoders (SAEs) split a language model's activations into features. This "
        "report follows features through the model without any data: each feature is matched to "
        "the features of the layer before and of the MLP and attention blocks in between by the "
        "cosine of their SAE decoder rows. From those matches it tells where each feature comes "
        "from (section 2), draws a feature's ancestors and descendants as a flow graph (3), "
        "checks causally that switching a matched predecessor off switches the feature off "
        "(4), and steers generation with whole flow graphs instead of one vector (5).</p>",
        f"<p class='muted'>model {_e(atlas.model)}; {len(suite)} SAEs at "
        f"{len(atlas.layers)} layers (res, mlp, att), widths {_e(widths)}; stage times: "
        f"{_e(secs)}{' (--quick: a small suite for CI)' if cfg.quick else ''}</p>",
        "<h2>1. The SAEs</h2>", _quality(suite),
        "<h2>2. Where features come from: lineage over depth</h2>", _lineage(atlas, out),
        "<h2>3. Flow graphs of the theme seeds</h2>", _graphs(graphs, cfg),
        "<h2>4. Do the matches hold causally?</h2>",
        _deactivation(deactivation, out / "deactivation"),
        "<h2>5. Steering with whole flow graphs</h2>", _steering(steering),
        "<h2>Explore</h2><p>Open the atlas in the viewer: <code>saeflow view "
        f"{_e(atlas.root)}</code>, then http://127.0.0.1:8765. Raw results are beside this "
        "file: <code>steering/</code>, <code>deactivation/</code>, <code>graphs/</code>.</p>",
    ]
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>saeflow report</title>"
            f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>")
    path = out / "report.html"
    write_text(path, page)
    return path
