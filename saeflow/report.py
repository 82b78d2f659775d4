"""The demo's report: one self-contained HTML file (images inlined) rendered from the stages'
result objects (``SteerEvalResult``, ``DeactivationResult``, the atlas and the flow graphs), so
every number in it comes from the run that wrote the raw files beside it."""

from __future__ import annotations

from pathlib import Path

from saeflow.io import write_text
from saeflow.report_html import CSS
from saeflow.report_html import escape as _e
from saeflow.report_html import image as _img
from saeflow.report_html import num as _num
from saeflow.report_html import signed as _signed
from saeflow.report_html import table as _table

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
            f"{layers[0]}&ndash;{layers[-1]}.{fires} Node labels say what each feature fires on "
            f"(its top activating tokens in the bundled corpus), else the tokens its decoder row "
            f"promotes through the unembedding; the drawing keeps its size (scroll "
            f"sideways through a long graph).</p><div class=\"svg\">{g['svg']}</div>"
            "<details><summary>nodes</summary>"
            + _table(["feature", "lineage", "label", "cos"], nodes, left=3) + "</details>")
    return "".join(parts)


STEER_MODES = ("single", "cumulative", "cumulative_norm")


def _steering(steering) -> str:
    comp = steering.comparison
    rows = []
    for theme, c in comp.items():
        row = [theme, _pm(c["unsteered"]), _pm(c["prompting"]), _diff(c["prompting"])]
        for m in STEER_MODES:
            row += [_pm(c[m]), _diff(c[m]), c[m]["cell"].split("/", 1)[1]] if m in c else \
                   ["-", "-", "-"]
        rows.append(row)
    first = next(iter(comp.values()))
    n, split = first["unsteered"].get("n_heldout"), first.get("split", {})
    header = ["theme", "unsteered", "prompting", "vs unsteered"]
    for m in STEER_MODES:
        header += [m.replace("_", " "), "vs unsteered", "layer / coef"]
    parts = ["<p>Each theme's seed feature and its flow graph are added to the residual stream "
             "while the model writes from neutral prompts. <b>Single-layer</b> steers the graph's "
             "features at one layer; <b>cumulative</b> steers every graph feature at that layer "
             "and all earlier ones; <b>cumulative norm</b> is the cumulative plan rescaled to "
             "add the same total norm as single-layer steering at that cell (equal push). "
             "<b>Prompting</b> asks for the theme in words instead. Score = topic &times; "
             "coherence, each in [0, 1] (topic: calibrated sentence-embedding similarity of the "
             "content words to the theme; coherence: calibrated perplexity under the unsteered "
             "model and the bare prompt, times a repetition penalty). Each mode's best cell "
             "(layer / coefficient, the coefficient a fraction of the layer's typical residual "
             "norm) is chosen on the selection prompts and seeds and reported on others"
             + (f" ({n} generations per cell, mean &plusmn; standard error)" if n else "")
             + "; <i>vs unsteered</i> is the paired difference against unsteered generations "
             "of the same prompt, seed and sample.</p>", _split(split),
             _table(header, rows, left=1), _reading(comp), _equal_push(comp),
             _img(steering.out / "overview.png", "steering overview")]
    for run in steering.runs:
        cells = {r.cell: r for r in list(run.results) + list(run.heldout)}
        best = {m: run.comparison[m]["cell"] for m in STEER_MODES if m in run.comparison}
        show = [("unsteered", "unsteered"), ("prompting", "prompting")] + \
               [(f"{m} (best: {c})", c) for m, c in best.items()]
        gens = []
        for name, key in show:
            if key not in cells or not cells[key].generations:
                continue
            g = cells[key].generations[0]
            gens.append(f"<div>{_e(name)}</div><div>{_e(g['prompt'])}<b>{_e(g['text'])}</b> "
                        f"<span class='muted'>(topic {g['topic']:.2f}, coherence "
                        f"{g['coherence']:.2f})</span></div>")
        parts.append(f"<h3>{_e(run.theme)}</h3>" + _seed_evidence(run.setup.info)
                     + _img(run.folder / "scores.png", run.theme)
                     + "<div class='gen'>" + "".join(gens) + "</div>")
    return "".join(parts)


def _split(split: dict) -> str:
    def names(pairs):
        prompts = sorted({p for p, _ in pairs})
        seeds = sorted({s for _, s in pairs})
        return f"{', '.join(repr(p) for p in prompts)} × seeds {', '.join(map(str, seeds))}"
    if not split.get("selection") or not split.get("report"):
        return ""
    return (f"<p class='muted'>Selection: {_e(names(split['selection']))}. Report: "
            f"{_e(names(split['report']))}.</p>")


def _diff(c: dict) -> str:
    return _signed(c.get("vs_unsteered"), c.get("vs_unsteered_se"))


def _equal_push(comp: dict) -> str:
    """Cumulative against single at one coefficient and at equal added norm."""
    rows, cells = [], []
    for theme, c in comp.items():
        cvs, eq = c.get("cumulative_vs_single"), c.get("equal_norm")
        if not cvs and not eq:
            continue
        norms = [f"{c[m]['added_norm']:.1f}" if c.get(m, {}).get("added_norm") is not None
                 else "-" for m in STEER_MODES]
        rows.append([theme, _signed(cvs["diff"], cvs["se"]) if cvs else "-",
                     _signed(eq["diff"], eq["diff_se"]) if eq else "-",
                     f"{len(eq['cells'])} / {eq['n']}" if eq else "-", *norms])
        for x in (eq or {}).get("cells", []):
            cells.append([theme, x["layer"], f"{x['coefficient']:g}", _num(x["added_norm"], 1),
                          _num(x.get("cumulative_added_norm"), 1), _num(x["single"]),
                          _num(x.get("cumulative")), _num(x["cumulative_norm"]),
                          _signed(x["diff"], x["diff_se"])])
    if not rows:
        return ""
    return ("<h3>Equal push</h3><p>At one coefficient a cumulative plan adds many more vectors "
            "than a single-layer one. <i>Cumulative - single</i> compares the two modes' best "
            "cells on the report prompts (paired); <i>at equal norm</i> pools, over the whole "
            "selection grid, cumulative rescaled to single's added norm minus single (no "
            "choice involved). Added norm: the norm added per token, summed over the steered "
            "sites, of each mode's best cell.</p>"
            + _table(["theme", "cumulative - single", "at equal norm", "cells / pairs",
                      "norm single", "norm cumulative", "norm cumulative norm"], rows)
            + "<details><summary>equal-norm cells</summary>"
            + _table(["theme", "layer", "coef", "added norm", "cumulative's norm", "single",
                      "cumulative", "cumulative norm", "difference"], cells) + "</details>")


def _seed_evidence(info: dict) -> str:
    """The seed candidates with the numbers behind the choice (``ThemeFeature.evidence``)."""
    ranked = info.get("ranked") or []
    if not ranked:
        return ""
    rows = [[("\u25b6 " if r["feature"] == info.get("seed") else "") + r["feature"],
             _num(r.get("seed_score"), 2), _num(r.get("score"), 2), _num(r.get("specificity")),
             _num(r.get("relevance")), _num(r.get("theme_density"), 4),
             _num(r.get("background_density"), 4), ", ".join(r.get("fires_on") or [])]
            for r in ranked]
    split = info.get("theme_split", {})
    return (f"<p>Seed <code>{_e(info.get('seed'))}</code> ({_e(info.get('seed_label', ''))}), "
            f"chosen on {split.get('seed_texts', '?')} theme vs "
            f"{split.get('seed_background', '?')} background paragraphs, disjoint from the "
            f"{split.get('topic_texts', '?')} that calibrate the topic score. Seed score = t "
            f"&times; max(0, 2 specificity - 1) &times; relevance; specificity = theme density "
            f"/ (theme + background density) (0.5: no preference); relevance = cosine of the "
            f"tokens it fires on with the theme.</p>"
            + _table(["feature", "seed score", "t", "specificity", "relevance", "theme density",
                      "background density", "fires on"], rows, left=1))


def _pm(c: dict) -> str:
    se = c.get("heldout_se")
    return f"{c['heldout']:.3f}" + (f" ± {se:.3f}" if se is not None and se == se else "")


def _reading(comp: dict) -> str:
    """What the steering table says, in words, from its own numbers: a difference counts only
    when it exceeds twice its standard error (paired where the comparison has a paired
    difference)."""
    def verdict(d, se) -> int:
        return 0 if d is None or d != d or se != se or abs(d) <= 2 * se else (1 if d > 0 else -1)

    def unpaired(a: dict, b: dict) -> int:
        se = ((a.get("heldout_se") or 0.0) ** 2 + (b.get("heldout_se") or 0.0) ** 2) ** 0.5
        return verdict(a["heldout"] - b["heldout"], se)

    both = {t: c for t, c in comp.items() if "single" in c and "cumulative" in c}
    if not both:
        return ""
    modes = {t: verdict(c["cumulative_vs_single"]["diff"], c["cumulative_vs_single"]["se"])
             if "cumulative_vs_single" in c else unpaired(c["cumulative"], c["single"])
             for t, c in both.items()}
    best = {t: max(c["single"], c["cumulative"], key=lambda m: m["heldout"])
            for t, c in both.items()}
    steer = {t: unpaired(best[t], c["prompting"]) for t, c in both.items()}
    unsteered = {t: verdict(b.get("vs_unsteered"), b.get("vs_unsteered_se") or 0.0)
                 for t, b in best.items() if "vs_unsteered" in b}

    def names(v: dict, sign: int) -> str:
        return _e(", ".join(t for t, x in v.items() if x == sign) or "none")

    against = (f" Against unsteered text (paired), it wins on {names(unsteered, 1)}, loses on "
               f"{names(unsteered, -1)} and ties on {names(unsteered, 0)}."
               if unsteered else "")
    return ("<p><b>Reading</b> (a difference counts when it exceeds twice its standard error): "
            f"cumulative beats single-layer on {names(modes, 1)}; single-layer beats cumulative "
            f"on {names(modes, -1)}; no clear difference on {names(modes, 0)}. The better "
            f"steering mode beats prompting on {names(steer, 1)}, loses to it on "
            f"{names(steer, -1)}, and ties on {names(steer, 0)}.{against}</p>")


def _deactivation(result, folder: Path) -> str:
    from saeflow.recipes.deactivation import pearson_power, strategy_label
    info = result.info or {}
    rs = sorted({r.r for r in result.summary})
    rows = [([f"{r.r:g}"] if len(rs) > 1 else []) + [
        strategy_label(r.strategy, info), r.kind, r.n, r.success_rate, r.mean_change,
        r.median_change, _num(r.mean_pre_drop), _num(r.oracle_success_rate)]
        for r in result.summary if r.layer == "all"]
    power = pearson_power(info)
    pearson = "" if not power else (
        f" Top-1 Pearson correlates activations on {power['tokens']:,} separate tokens, where "
        f"the median target fires {power['target_fires_median']:g} times"
        + (": <b>underpowered</b> (fewer than 100,000 tokens), so its matches are noisy."
           if power["underpowered"] else "."))
    return ("<p>At tokens where a residual feature is active, its matched predecessor (at the "
            "previous residual, this layer's MLP or attention SAE) is switched off at that token "
            "only and block L is recomputed. Success: the target went to zero; change: 1 - "
            "new / old activation; pre-activation drop: 1 - new / old encoder pre-activation "
            "(how far a TopK latent was pushed even when it stays active, so TopK and JumpReLU "
            "suites compare). Baselines: <i>random active</i> switches off one active feature "
            "of the source site drawn uniformly (chance); <i>random of top-5</i> draws among "
            "the five best cosine matches, a weak-match baseline, not chance; the exhaustive "
            "oracle tries every active feature alone (the ceiling, on the same pairs)."
            f"{pearson} For context, the paper reports on Gemma 2 2B: top-1 cosine 65% "
            "success / 0.75 mean change; top-1 Pearson 65% / 0.74.</p>"
            + _table((["r"] if len(rs) > 1 else []) + [
                "strategy", "predecessor", "pairs", "success rate", "mean change",
                "median change", "pre-activation drop", "oracle success"], rows,
                left=3 if len(rs) > 1 else 2)
            + _img(folder / "success_by_layer.png", "success rate by strategy and layer"))


def _permutations(perm, out: Path) -> str:
    """Layer pruning and persistence over depth (Mechanistic Permutability) from the demo's
    ``PermutationStage``."""
    import statistics
    if perm is None:
        return '<p class="muted">Not run.</p>'
    cos = [p.mean_cos for p in perm.pairs]
    match = (f"<p>Each residual SAE is matched one-to-one to the next (linear assignment on "
             f"folded encoder and decoder weights, <code>{_e(perm.tag)}</code>, "
             f"{len(perm.pairs)} pairs). Matched decoder rows have a mean cosine of "
             f"{statistics.median(cos):.2f} (median over pairs; {min(cos):.2f} to "
             f"{max(cos):.2f}).</p>" if cos else "")
    methods = [m for m in ("permutation", "cosine", "reconstruction", "skip")
               if any(r.method == m for r in perm.prune)]
    by = {(r.layer, r.method): r for r in perm.prune}
    layers = sorted({r.layer for r in perm.prune})
    rows = [[u, *[by[(u, m)].explained_variance if (u, m) in by else "-" for m in methods],
             *[by[(u, m)].delta_loss if (u, m) in by else "-" for m in methods]]
            for u in layers]
    text = perm.prune_text
    prune = ("<h3>Layer pruning</h3><p>Block u is replaced by an estimate of h_u from h_(u-1): "
             "<i>permutation</i> encodes with SAE u-1, permutes the codes and decodes with SAE "
             "u; <i>cosine</i> maps each feature to its top-1 decoder cosine match instead; "
             "<i>reconstruction</i> is SAE u-1's own reconstruction; <i>skip</i> leaves h_(u-1). "
             "EV: explained variance of h_u; &Delta;L: the next-token loss change in nats. "
             f"Held-out text: {_e(text.get('n_seqs', '?'))} &times; "
             f"{_e(text.get('seq_len', '?'))} tokens of {_e(text.get('source', '?'))}/"
             f"{_e(text.get('split', '?'))}; from <code>{_e(perm.prune_from)}</code>.</p>"
             + _prune_reading(perm.prune, methods)
             + _table(["layer", *[f"EV {m}" for m in methods], *[f"ΔL {m}" for m in methods]],
                      rows)
             + _img(perm.plots["prune"], "layer pruning"))
    pooled = [r for r in perm.persistence if r.start == "all"] or perm.persistence
    start = pooled[0].start if pooled else "all"
    dists = sorted({r.distance for r in pooled})
    cell = {(r.measure, r.distance): r for r in pooled if r.start == start}
    measures = [m for m in ("coactivation", "semantic", "judge")
                if any(k[0] == m for k in cell)]
    prow = [[name, *[_num(getattr(cell.get((m, d)), field, None)) for d in dists]]
            for m in measures for name, field in ((m, "mean"), (f"{m}: chance", "chance"))]
    dist = perm.distances.get(str(start), {})
    half = "; ".join(f"{m}: half-excess distance {v['half']}, above chance to {v['significant']}"
                     for m, v in dist.items())
    ps = perm.persistence_settings
    persist = ("<h3>Persistence over depth</h3><p>Features of a start layer followed along "
               "composed permutations, d layers on: <i>coactivation</i> is the matching score "
               "(how often the feature and its image fire together, over the tokens where "
               "either fires), <i>semantic</i> the cosine of the sentence embeddings of their "
               "top contexts; each against random features of the same layer (chance). "
               f"{_e(ps.get('n_features', '?'))} features per start, starts "
               f"{_e(', '.join(map(str, ps.get('starts') or [])) or 'default')}; from "
               f"<code>{_e(perm.persistence_from)}</code>. Start "
               f"{_e(start)} ({'all starts pooled' if start == 'all' else 'one start'}): "
               f"{_e(half)}.</p>"
               + _table(["measure", *[f"d = {d}" for d in dists]], prow)
               + _img(perm.plots["persistence"], "persistence over depth"))
    return match + prune + persist


def _prune_reading(rows, methods) -> str:
    """Where pruning by permutation costs least, and how it compares with the baselines."""
    perm = {r.layer: r.delta_loss for r in rows if r.method == "permutation"}
    perm = {u: d for u, d in perm.items() if d == d}
    if not perm:
        return ""
    u = min(perm, key=perm.get)  # type: ignore[arg-type]
    parts = [f"Pruning by permutation costs least at layer {u} ({perm[u]:.2f} nats)"]
    for m in ("skip", "reconstruction", "cosine"):
        other = {r.layer: r.delta_loss for r in rows
                 if r.method == m and r.layer in perm and r.delta_loss == r.delta_loss}
        if m in methods and other:
            wins = sum(perm[x] < d for x, d in other.items())
            parts.append(f"it costs less than {m} at {wins} of {len(other)} layers")
    return "<p><b>Reading</b>: " + _e("; ".join(parts)) + ".</p>"


def _stages(stages) -> str:
    rows = [[k, f"{w:.1f}", f"{c:.1f}"] for k, w, c in stages.rows()]
    rows.append(["total", f"{sum(stages.wall.values()):.1f}", f"{sum(stages.cpu.values()):.1f}"])
    return ("<details><summary>stage times</summary>"
            + _table(["stage", "wall s", "CPU s"], rows)
            + "<p class='muted'>CPU: this process, all threads; cached stages take seconds on "
              "a re-run.</p></details>")


def write_report(out: Path, suite, atlas, graphs: dict, cfg, stages, steering, deactivation,
                 permutations=None) -> Path:
    """``out/report.html`` from the demo's results: ``graphs`` per theme (seed, graph, svg,
    fires_on), ``stages`` a ``demo.Stages`` (wall and CPU seconds so far), ``steering`` a
    ``SteerEvalResult``, ``deactivation`` a ``DeactivationResult`` (saved under
    ``out/deactivation``), ``permutations`` a ``demo.PermutationStage`` or None."""
    widths = sorted(set(atlas.widths.values()))
    secs = ", ".join(f"{k} {v:.0f} s" for k, v in stages.wall.items())
    spec = suite.root if cfg.quick and suite.root else cfg.suite
    body = [
        f"<h1>saeflow report: {_e(suite.name)}</h1>",
        "<p>Sparse autoencoders (SAEs) split a language model's activations into features. This "
        "report follows features through the model without any data: each feature is matched to "
        "the features of the layer before and of the MLP and attention blocks in between by the "
        "cosine of their SAE decoder rows. From those matches it tells where each feature comes "
        "from (section 2), draws a feature's ancestors and descendants as a flow graph (3), "
        "checks causally that switching a matched predecessor off switches the feature off "
        "(4), steers generation with whole flow graphs instead of one vector (5), and follows "
        "one-to-one permutations over depth: layer pruning and feature persistence (6).</p>",
        f"<p class='muted'>model {_e(atlas.model)}; {len(suite)} SAEs at "
        f"{len(atlas.layers)} layers (res, mlp, att), widths {_e(widths)}; stage times: "
        f"{_e(secs)}{' (--quick: a small suite for CI)' if cfg.quick else ''}</p>",
        _stages(stages),
        "<h2>1. The SAEs</h2>", _quality(suite),
        "<h2>2. Where features come from: lineage over depth</h2>", _lineage(atlas, out),
        "<h2>3. Flow graphs of the theme seeds</h2>", _graphs(graphs, cfg),
        "<h2>4. Do the matches hold causally?</h2>",
        _deactivation(deactivation, out / "deactivation"),
        "<h2>5. Steering with whole flow graphs</h2>", _steering(steering),
        "<h2>6. Permutations over depth: pruning and persistence</h2>",
        _permutations(permutations, out),
        "<h2>Explore</h2><p>Open the atlas in the viewer: <code>saeflow view "
        f"{_e(atlas.root)}</code>, then http://127.0.0.1:8765. Raw results are beside this "
        "file: <code>steering/</code>, <code>deactivation/</code>, <code>graphs/</code>, "
        "<code>permutation/</code>. The full pruning and persistence runs: <code>saeflow prune "
        f"{_e(spec)}</code> and <code>saeflow permute {_e(spec)} --persistence</code> (the "
        "demo reads what they store).</p>",
    ]
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>saeflow report</title>"
            f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>")
    path = out / "report.html"
    write_text(path, page)
    return path
