"""The steering evaluation over themes (``saeflow steer-eval``; the sweep and the scores are
``saeflow.evaluate``).

For each theme: its text, split in two disjoint halves (``saeflow.themes.split_theme``): the
seed feature is chosen on one (``rank_features``, with the evidence of its specificity and
relevance kept), the topic scorer is calibrated on the other. Then the seed's flow graph,
magnitudes and calibrated scorers (``setup_theme`` -> ``ThemeSetup``; its deterministic parts,
the ranking's statistics, the magnitudes and both calibrations, are kept in the cache directory
under their inputs, ``saeflow.memo``, so a re-run reads them), a resumable sweep of modes,
layers and coefficients against unsteered and prompting baselines on the selection
prompts and seeds, and each mode's best cell again on the held-out report prompts and seeds
(``saeflow.evaluate``). ``run_steer_eval`` returns a ``SteerEvalResult`` and writes per-theme
``results.json`` + ``scores.png`` and ``summary.csv``, ``summary.json``, ``overview.png``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple
from typing import TYPE_CHECKING

from saeflow.configs import SweepConfig
from saeflow.flow import FlowGraph
from saeflow.recipes import Log, config_default, slug
from saeflow.recipes.steering import PlanOptions, read_examples, trace_graph
from saeflow.sites import Feature

if TYPE_CHECKING:
    from saeflow.atlas import Atlas
    from saeflow.evaluate import CoherenceScorer, TopicScorer
    from saeflow.memo import Memo
    from saeflow.models import LM
    from saeflow.suite import Suite


MAGNITUDES_VERSION = 1  # bumped when the stored magnitudes mean something else (memo keys)
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
    report_prompts: tuple[str, ...] = _sweep("report_prompts")
    report_seeds: tuple[int, ...] | None = _sweep("report_seeds")
    equal_norm: bool = _sweep("equal_norm")
    judge_sample: int = _sweep("judge_sample")
    n_theme: int = 32  # theme paragraphs retrieved (half choose the seed, half calibrate topic)
    n_background: int = 96
    max_new_tokens: int = _sweep("max_new_tokens")
    temperature: float = _sweep("temperature")
    top_p: float = _sweep("top_p")
    baseline_prompt: str = _sweep("baseline_prompt")
    rescore: bool = False
    judge_url: str | None = None
    judge_model: str | None = None
    plan: PlanOptions = PlanOptions()
    ray: str | None = None  # the cells on Ray: "local", "auto" or an address (recipes.distribute)

    def __post_init__(self):
        if self.feature and len(self.themes) > 1:
            raise ValueError("--feature names one seed, so it goes with one --theme")
        if bool(self.judge_url) != bool(self.judge_model):
            raise ValueError("the judge needs both --judge-url and --judge-model")

    def sweep(self, layers: Sequence[int]) -> SweepConfig:
        p = self.plan
        return SweepConfig(modes=self.modes, layers=tuple(layers), coefficients=self.coefficients,
                           prompts=self.prompts, seeds=self.seeds, samples=self.samples,
                           report_prompts=self.report_prompts, report_seeds=self.report_seeds,
                           equal_norm=self.equal_norm, judge_sample=self.judge_sample,
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
    results: list  # evaluate.CellResult of stage 1 (selection prompts and seeds), sweep order
    comparison: dict  # evaluate.compare_modes
    heldout: list = []  # evaluate.CellResult of stage 2 (report prompts and seeds)


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


def stored_magnitudes(memo: Memo | None, lm: LM, suite: Suite, features: Sequence[Feature],
                      how: str, texts: Sequence[str]) -> dict[Feature, float]:
    """``feature_magnitudes``, with ``memo`` stored under the model's fingerprint, those of the
    features' SAEs, the features, the kind and the texts."""
    from saeflow.memo import model_fingerprint, sae_fingerprint, texts_digest
    from saeflow.steer import feature_magnitudes
    if memo is None:
        return feature_magnitudes(lm, suite, features, how, texts)
    feats = sorted({Feature.parse(f) for f in features})
    got = memo("magnitudes", {
        "version": MAGNITUDES_VERSION, "model": model_fingerprint(lm), "how": how,
        "saes": {str(s): sae_fingerprint(suite[s]) for s in sorted({f.site for f in feats})},
        "features": [str(f) for f in feats], "texts": texts_digest(texts)},
        lambda: {str(f): v for f, v in feature_magnitudes(lm, suite, feats, how, texts).items()})
    return {Feature.parse(f): v for f, v in got.items()}


def setup_theme(cfg: SteerEvalConfig, suite: Suite, lm: LM, atlas: Atlas, description: str,
                embed, log: Log = print, memo: Memo | None = None) -> ThemeSetup:
    """Theme text, seed feature, flow graph, magnitudes and calibrated scorers for a theme;
    ``memo`` keeps the ranking's statistics, the magnitudes and the calibrations (a re-run
    computes none of them again while their inputs are unchanged)."""
    from saeflow.evaluate import calibrate_coherence, calibrate_topic
    from saeflow.models import dtype_name
    from saeflow.steer import graph_features
    from saeflow.themes import build_theme, rank_features, split_theme
    opts = cfg.plan
    theme = build_theme(description, read_examples(opts.examples), source=opts.source,
                        n_theme=cfg.n_theme, n_background=cfg.n_background, embed=embed)
    seed_half, topic_half = split_theme(theme)
    ranked = rank_features(lm, suite, seed_half, site=opts.site, top=5, atlas=atlas, embed=embed,
                           memo=memo)
    seed = Feature.parse(cfg.feature) if cfg.feature else ranked[0].feature
    log(f"seed candidates ({len(seed_half.texts)} theme vs {len(seed_half.background)} "
        "background paragraphs; topic is calibrated on the other half):")
    for r in ranked:
        log(f"  {r.feature}  score {r.seed_score:6.2f}  t {r.score:6.2f}  specificity "
            f"{r.specificity:.2f}  relevance {r.relevance:.2f}  fires on "
            f"{', '.join(r.fires_on)}")
    graph = trace_graph(opts, atlas, seed, log)
    feats = graph_features(graph)
    mags = (stored_magnitudes(memo, lm, suite, feats, opts.magnitude, seed_half.background[:32])
            if opts.action == "activate" else None)
    topic = calibrate_topic(topic_half.texts, topic_half.background, embed,
                            description=description, memo=memo)
    coherence = calibrate_coherence(lm, topic_half.background, cfg.max_new_tokens, memo=memo)
    layers = auto_layers(graph) if cfg.layers is None else list(cfg.layers)
    have = sorted({f.layer for f in feats})
    if any(layer not in have for layer in layers):
        raise ValueError(f"--layers {','.join(map(str, layers))}: the flow graph of {seed} "
                         f"({description}) has features only at layers {have}")
    info = {"seed": str(seed), "seed_label": atlas.label(seed),
            "model": f"{lm.name} {dtype_name(lm.dtype)}",
            "ranked": [r.evidence() for r in ranked],
            "seed_evidence": next((r.evidence() for r in ranked if r.feature == seed), None),
            "theme_split": {"seed_texts": len(seed_half.texts),
                            "seed_background": len(seed_half.background),
                            "topic_texts": len(topic_half.texts),
                            "topic_background": len(topic_half.background)},
            "graph_features": [str(f) for f in feats],
            "graph_layers": sorted({f.layer for f in feats}),
            "magnitude": opts.magnitude, "topic": topic.info(), "coherence": coherence.info(),
            "theme_texts": [t[:100] for t in seed_half.texts[:8]],
            "topic_texts": [t[:100] for t in topic_half.texts[:8]]}
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
                   log: Log = print, loader=None, memo: Memo | None = None) -> SteerEvalResult:
    """Run (or resume) the sweep of every theme; write per-theme ``results.json`` and
    ``scores.png``, and ``summary.csv``, ``summary.json`` and ``overview.png`` in ``out``.
    With ``cfg.ray`` the cells are generated on Ray workers, which open the model and suite
    with ``loader`` (``distribute.SuiteLoader``; default: ship ``lm`` and ``suite``); the
    theme setup, the scoring and the files stay here. The theme setups are kept in ``memo``
    (default ``setup_memo()``)."""
    from saeflow import plots
    from saeflow.evaluate import compare_modes, run_heldout, run_sweep
    from saeflow.io import write_json_atomic
    from saeflow.memo import setup_memo
    from saeflow.themes import sentence_embedder
    out = Path(cfg.out)
    embed = embed or sentence_embedder()
    memo = memo or setup_memo()
    fan_out = None
    if cfg.ray is not None:
        from saeflow.recipes.distribute import Given, Pool
        fan_out = Pool(cfg.ray, loader or Given(lm, suite)).fan_out("steer-eval cells")
    runs, rows = [], []
    for description in cfg.themes:
        log(f"\n== {description}")
        setup = setup_theme(cfg, suite, lm, atlas, description, embed, log, memo)
        log(f"seed {setup.info['seed']} ({setup.info['seed_label']}); sweeping layers "
            f"{setup.layers}")
        folder = out / slug(description)
        sweep = cfg.sweep(setup.layers)
        results = run_sweep(lm, suite, description, setup.graph, sweep, folder / "results.json",
                            setup.topic, setup.coherence, setup.magnitudes, setup.info,
                            rescore=cfg.rescore, fan_out=fan_out)
        heldout = run_heldout(lm, suite, description, setup.graph, sweep,
                              folder / "results.json", setup.topic, setup.coherence,
                              setup.magnitudes, make_judge(cfg, description), fan_out=fan_out)
        unit = MAGNITUDE_UNITS[cfg.plan.magnitude]
        plots.steering_scores(folder / "scores.png", description, results,
                              "r" if cfg.plan.action == "suppress" else "coefficient" + unit)
        rows += [r.row() for r in results + heldout]
        runs.append(ThemeRun(description, folder, setup, results,
                             compare_modes(results, heldout), heldout))
    log(f"theme setups: {sum(memo.hits.values())} stored parts read, "
        f"{sum(memo.misses.values())} computed ({memo.folder})")
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
    """Every cell of the evaluation as a text table (stage: sel = selection, rep = report)."""
    lines = [f"{'theme':<12} {'stage':<5} {'cell':<26} {'n':>3} {'norm':>7} {'topic':>6} "
             f"{'coher':>6} {'score':>6} {'+-':>5} {'nll':>5} {'gain':>5} {'rep':>5}"]
    for r in rows:
        norm = "-" if r.get("added_norm") is None else f"{r['added_norm']:7.1f}"
        lines.append(f"{r['theme'][:12]:<12} {r.get('stage', 'selection')[:3]:<5} "
                     f"{r['cell']:<26} {r['n']:>3} {norm:>7} {r['topic']:6.3f} "
                     f"{r['coherence']:6.3f} {r['score']:6.3f} {r['score_se']:5.3f} "
                     f"{r['nll']:5.2f} {r['gain']:5.2f} {r['repetition']:5.2f}")
    return "\n".join(lines)


def _pm(x: float | None, se: float | None) -> str:
    if x is None or x != x:
        return "-"
    return f"{x:.3f}" + ("" if se is None or se != se else f" ± {se:.3f}")


def format_comparison(comparison: dict) -> str:
    """Per theme: the held-out score (report prompts and seeds) of the baselines and of each
    mode's best cell (chosen on the selection prompts and seeds), its paired difference against
    unsteered, and the equal-norm comparison of cumulative against single over the grid."""
    lines = ["held-out score ± SE (best cell per mode chosen on other prompts and seeds); "
             "[paired difference against unsteered ± SE]"]
    for theme, c in comparison.items():
        lines.append(f"{theme}:")
        for m in ("unsteered", "prompting", "single", "cumulative", "cumulative_norm"):
            if m not in c:
                continue
            x = c[m]
            diff = "" if m == "unsteered" else f"  [{_pm(x['vs_unsteered'], x['vs_unsteered_se'])}]"
            norm = "" if x.get("added_norm") is None else f", added norm {x['added_norm']:.1f}"
            cell = "" if m in ("unsteered", "prompting") else f" ({x['cell']}{norm})"
            lines.append(f"  {m:<16} {_pm(x['heldout'], x['heldout_se']):>16}{diff}{cell}")
        if "cumulative_vs_single" in c:
            d = c["cumulative_vs_single"]
            lines.append(f"  cumulative - single, paired on held-out: {_pm(d['diff'], d['se'])}")
        if "equal_norm" in c:
            e = c["equal_norm"]
            lines.append(f"  cumulative - single at equal added norm, over the grid "
                         f"({len(e['cells'])} cells, {e['n']} paired generations): "
                         f"{_pm(e['diff'], e['diff_se'])}")
    return "\n".join(lines)
