"""The steering evaluation over themes (``saeflow steer-eval``; the sweep and the scores are
``saeflow.evaluate``).

For each theme: its text and top feature (``saeflow.themes``), the seed's flow graph, magnitudes
and calibrated scorers (``setup_theme`` -> ``ThemeSetup``), then a resumable sweep of modes,
layers and coefficients against unsteered and prompting baselines, and the comparison of each
mode's best cell on held-out samples. ``run_steer_eval`` returns a ``SteerEvalResult`` and writes
per-theme ``results.json`` + ``scores.png`` and ``summary.csv``, ``summary.json``,
``overview.png``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple
from typing import TYPE_CHECKING

from saeflow.evaluate import CoherenceScorer, SweepConfig, TopicScorer
from saeflow.flow import FlowGraph
from saeflow.recipes import Log, config_default, slug
from saeflow.recipes.steering import PlanOptions, read_examples, trace_graph
from saeflow.sites import Feature

if TYPE_CHECKING:
    from saeflow.atlas import Atlas
    from saeflow.models import LM
    from saeflow.suite import Suite


MAGNITUDE_UNITS = {"res_norm": " (fraction of residual norm)",
                   "activation": " (x typical activation)", "theta": " (x threshold)",
                   "none": " (x decoder row)"}


def _sweep(name: str) -> Any:
    return field(default=config_default(SweepConfig, name))


@dataclass(frozen=True)
class SteerEvalConfig:
    """A steering evaluation over themes; the sweep settings default to ``SweepConfig``'s."""
    themes: tuple[str, ...]
    out: str = "steer-eval"
    feature: str | None = None  # a seed instead of the theme's top feature (one theme only)
    layers: tuple[int, ...] | None = None  # None: ``auto_layers``
    modes: tuple[str, ...] = _sweep("modes")
    coefficients: tuple[float, ...] = _sweep("coefficients")
    prompts: tuple[str, ...] = _sweep("prompts")
    seeds: tuple[int, ...] = _sweep("seeds")
    samples: int = _sweep("samples")
    max_new_tokens: int = _sweep("max_new_tokens")
    temperature: float = _sweep("temperature")
    top_p: float = _sweep("top_p")
    baseline_prompt: str = _sweep("baseline_prompt")
    rescore: bool = False
    judge_url: str | None = None
    judge_model: str | None = None
    plan: PlanOptions = PlanOptions()

    def __post_init__(self):
        if self.feature and len(self.themes) > 1:
            raise ValueError("--feature names one seed, so it goes with one --theme")
        if bool(self.judge_url) != bool(self.judge_model):
            raise ValueError("the judge needs both --judge-url and --judge-model")

    def sweep(self, layers: Sequence[int]) -> SweepConfig:
        p = self.plan
        return SweepConfig(modes=self.modes, layers=tuple(layers), coefficients=self.coefficients,
                           prompts=self.prompts, seeds=self.seeds, samples=self.samples,
                           max_new_tokens=self.max_new_tokens, schedule=p.schedule,
                           alpha=p.alpha, end_coefficient=p.end_coefficient, action=p.action,
                           temperature=self.temperature, top_p=self.top_p,
                           baseline_prompt=self.baseline_prompt)


class ThemeSetup(NamedTuple):
    """Everything one theme's sweep needs, and what of it is recorded (``info``)."""
    graph: FlowGraph
    magnitudes: dict | None  # per graph feature (None when suppressing)
    topic: TopicScorer
    coherence: CoherenceScorer
    layers: list[int]  # steering layers swept
    info: dict  # seed, ranked features, graph, scorer calibration (saved with the results)


class ThemeRun(NamedTuple):
    theme: str
    folder: Path  # results.json and scores.png
    setup: ThemeSetup
    results: list  # evaluate.CellResult, sweep order
    comparison: dict  # evaluate.compare_modes


class SteerEvalResult(NamedTuple):
    out: Path
    runs: list[ThemeRun]
    rows: list[dict]  # every cell of every theme (summary.csv)

    @property
    def comparison(self) -> dict:
        return {r.theme: r.comparison for r in self.runs}


def auto_layers(graph: FlowGraph) -> list[int]:
    """The seed's layer and the midpoints towards the graph's first and last layers."""
    from saeflow.steer import graph_features
    layers = sorted({f.layer for f in graph_features(graph)})
    seed = graph.seed.layer
    picks = {seed, (layers[0] + seed) // 2, (seed + layers[-1] + 1) // 2}
    return sorted(x for x in picks if x in layers) or [seed]


def setup_theme(cfg: SteerEvalConfig, suite: Suite, lm: LM, atlas: Atlas, description: str,
                embed,
                log: Log = print) -> ThemeSetup:
    """Theme text, seed feature, flow graph, magnitudes and calibrated scorers for a theme."""
    from saeflow.evaluate import calibrate_coherence, calibrate_topic
    from saeflow.steer import feature_magnitudes, graph_features
    from saeflow.themes import build_theme, rank_features
    opts = cfg.plan
    theme = build_theme(description, read_examples(opts.examples), source=opts.source,
                        embed=embed)
    ranked = rank_features(lm, suite, theme, site=opts.site, top=5, atlas=atlas)
    seed = Feature.parse(cfg.feature) if cfg.feature else ranked[0].feature
    graph = trace_graph(opts, atlas, seed, log)
    feats = graph_features(graph)
    mags = (feature_magnitudes(lm, suite, feats, opts.magnitude, theme.background[:32])
            if opts.action == "activate" else None)
    topic = calibrate_topic(theme.texts, theme.background, embed)
    coherence = calibrate_coherence(lm, theme.background[:48], cfg.max_new_tokens)
    layers = auto_layers(graph) if cfg.layers is None else list(cfg.layers)
    have = sorted({f.layer for f in feats})
    if any(layer not in have for layer in layers):
        raise ValueError(f"--layers {','.join(map(str, layers))}: the flow graph of {seed} "
                         f"({description}) has features only at layers {have}")
    info = {"seed": str(seed), "seed_label": atlas.label(seed),
            "ranked": [{"feature": str(r.feature), "t": r.score, "top_token": r.top_token}
                       for r in ranked],
            "graph_features": [str(f) for f in feats],
            "graph_layers": sorted({f.layer for f in feats}),
            "magnitude": opts.magnitude, "topic": topic.info(), "coherence": coherence.info(),
            "theme_texts": [t[:100] for t in theme.texts[:8]]}
    return ThemeSetup(graph, mags, topic, coherence, layers, info)


def make_judge(cfg: SteerEvalConfig, theme: str):
    """``text -> (topic, coherence)`` through the configured endpoint, or None."""
    url, model = cfg.judge_url, cfg.judge_model
    if not url or not model:
        return None
    from saeflow.evaluate import judge
    key = os.environ.get("SAEFLOW_JUDGE_API_KEY")
    return lambda text: judge(url, model, theme, text, key)


def run_steer_eval(cfg: SteerEvalConfig, suite: Suite, lm: LM, atlas: Atlas, embed=None,
                   log: Log = print) -> SteerEvalResult:
    """Run (or resume) the sweep of every theme; write per-theme ``results.json`` and
    ``scores.png``, and ``summary.csv``, ``summary.json`` and ``overview.png`` in ``out``."""
    from saeflow import plots
    from saeflow.evaluate import compare_modes, run_sweep
    from saeflow.io import write_json_atomic
    from saeflow.themes import sentence_embedder
    out = Path(cfg.out)
    embed = embed or sentence_embedder()
    runs, rows = [], []
    for description in cfg.themes:
        log(f"\n== {description}")
        setup = setup_theme(cfg, suite, lm, atlas, description, embed, log)
        log(f"seed {setup.info['seed']} ({setup.info['seed_label']}); sweeping layers "
            f"{setup.layers}")
        folder = out / slug(description)
        results = run_sweep(lm, suite, description, setup.graph, cfg.sweep(setup.layers),
                            folder / "results.json", setup.topic, setup.coherence,
                            setup.magnitudes, setup.info, make_judge(cfg, description),
                            rescore=cfg.rescore)
        unit = MAGNITUDE_UNITS[cfg.plan.magnitude]
        plots.steering_scores(folder / "scores.png", description, results,
                              "r" if cfg.plan.action == "suppress" else "coefficient" + unit)
        rows += [r.row() for r in results]
        runs.append(ThemeRun(description, folder, setup, results, compare_modes(results)))
    result = SteerEvalResult(out, runs, rows)
    write_csv(out / "summary.csv", rows)
    write_json_atomic(out / "summary.json", {"rows": rows, "comparison": result.comparison})
    plots.steering_overview(out / "overview.png", result.comparison)
    return result


def write_csv(path: Path, rows: list[dict]) -> None:
    import csv
    import io

    from saeflow.io import write_text
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    write_text(path, buf.getvalue())


def format_rows(rows: list[dict]) -> str:
    """Every cell of the evaluation as a text table."""
    lines = [f"{'theme':<12} {'cell':<22} {'n':>3} {'topic':>6} {'coher':>6} {'score':>6} "
             f"{'+-':>5} {'nll':>5} {'gain':>5} {'rep':>5}"]
    for r in rows:
        lines.append(f"{r['theme'][:12]:<12} {r['cell']:<22} {r['n']:>3} {r['topic']:6.3f} "
                     f"{r['coherence']:6.3f} {r['score']:6.3f} {r['score_se']:5.3f} "
                     f"{r['nll']:5.2f} {r['gain']:5.2f} {r['repetition']:5.2f}")
    return "\n".join(lines)


def format_comparison(comparison: dict) -> str:
    """Held-out scores of the baselines and each mode's best cell, per theme."""
    lines = ["score on held-out samples (best cell per mode chosen on the other samples)",
             f"{'theme':<12} {'unsteered':>9} {'prompting':>9} {'single':>22} "
             f"{'cumulative':>22} {'grid mean s/c':>14}"]
    for theme, c in comparison.items():
        def best(m):
            return f"{c[m]['heldout']:.3f} ({c[m]['cell']})" if m in c else "-"
        grid = "/".join(f"{c[m]['grid_mean']:.3f}" for m in ("single", "cumulative") if m in c)
        lines.append(f"{theme[:12]:<12} {c['unsteered']['heldout']:9.3f} "
                     f"{c['prompting']['heldout']:9.3f} {best('single'):>22} "
                     f"{best('cumulative'):>22} {grid:>14}")
    return "\n".join(lines)
