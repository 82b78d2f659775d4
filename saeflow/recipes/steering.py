"""Steering plans and generations (``saeflow steer``, ``saeflow themes``, the viewer).

``build_plan(PlanOptions, suite, lm, ...)`` returns the ``saeflow.steer.SteeringPlan`` of a plan
file, a flow-graph file, a theme (its top feature's flow graph) or listed features, with
magnitudes measured on a fixed held-out corpus sample (``magnitude_texts``); ``steer_pairs``
generates unsteered and steered continuations with the same random seed.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from saeflow.configs import ACTIONS, MAGNITUDES, SCHEDULES
from saeflow.flow import BLOCK_THRESHOLD, RES_THRESHOLD, FlowGraph
from saeflow.recipes import Log
from saeflow.sites import Feature

if TYPE_CHECKING:
    from saeflow.atlas import Atlas
    from saeflow.models import LM
    from saeflow.steer import SteeringPlan
    from saeflow.suite import Suite


PLAN_MODES = ("cumulative", "single", "features")


@dataclass(frozen=True)
class PlanOptions:
    """How a steering plan is built. ``mode``, ``layer`` and ``coefficient`` are for
    ``saeflow steer``; the steering evaluation sweeps those itself."""
    mode: str = "cumulative"  # cumulative (graph features at layers <= layer), single, features
    layer: int | None = None  # steering layer (None: the seed's)
    coefficient: float = 0.2  # s, or r when suppressing
    schedule: str = "constant"
    alpha: float = -0.05  # exponential schedule rate
    end_coefficient: float | None = None  # linear schedule end value
    action: str = "activate"
    magnitude: str = "res_norm"
    site: str | None = None  # where a theme looks for features (None: middle residual site)
    atlas: str | None = None  # atlas folder (None: the suite's cached atlas)
    res_threshold: float = RES_THRESHOLD
    block_threshold: float = BLOCK_THRESHOLD
    children: bool = False
    source: str = "default"  # corpus for theme retrieval and magnitudes
    examples: str | None = None  # a .txt file of theme examples
    from_token: int = 0  # steer only tokens at positions >= this (``SteeringPlan.from_token``)
    generated_only: bool = False  # steer only generated tokens (``SteeringPlan.generated_only``)

    def __post_init__(self):
        for name, allowed in (("mode", PLAN_MODES), ("schedule", SCHEDULES),
                              ("action", ACTIONS), ("magnitude", MAGNITUDES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name}: {getattr(self, name)!r} is not one of "
                                 f"{', '.join(allowed)}")
        if self.from_token < 0:
            raise ValueError(f"--from-token must be >= 0, got {self.from_token}")


@dataclass(frozen=True)
class GenerationOptions:
    max_new_tokens: int = 36
    samples: int = 1  # continuations per prompt
    seed: int = 0
    temperature: float = 1.27
    top_p: float = 0.7
    greedy: bool = False


def read_examples(path: str | None) -> list[str] | None:
    """Paragraphs (separated by blank lines) of an examples file, or None without one."""
    if not path:
        return None
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--examples {path}: no such file")
    paras = [" ".join(b.split()) for b in p.read_text().split("\n\n") if b.strip()]
    if not paras:
        raise ValueError(f"--examples {path}: no paragraphs found")
    return paras


def magnitude_texts(source: str, n: int = 32, seed: int = 0) -> list[str]:
    """A fixed sample of held-out corpus paragraphs for measuring magnitudes."""
    from saeflow.corpus import load_texts
    texts = load_texts(source, "heldout")
    return random.Random(seed).sample(texts, min(n, len(texts)))


def trace_graph(opts: PlanOptions, atlas: Atlas, seed: Feature, log: Log = print) -> FlowGraph:
    """The flow graph of ``seed`` under the options' thresholds, with a hint when it is tiny."""
    from saeflow.flow import trace
    graph = trace(atlas, seed, res_threshold=opts.res_threshold,
                  block_threshold=opts.block_threshold, children=opts.children)
    layers = graph.layers
    log(f"flow graph of {seed}: {len(graph.nodes)} features over layers "
        f"{layers[0]}..{layers[-1]}")
    if len(layers) < 3:
        log(f"  (few layers: matches below --res-threshold {opts.res_threshold} end the chain; "
            "suites trained on little text match weakly, see docs/steering.md)")
    return graph


def theme_seed(opts: PlanOptions, suite: Suite, lm: LM, description: str,
               atlas: Atlas | None = None, log: Log = print):
    """``(theme, ranked)``: the theme's text and its top features, printed."""
    from saeflow.memo import setup_memo
    from saeflow.themes import build_theme, rank_features, sentence_embedder
    examples = read_examples(opts.examples)
    try:  # retrieval needs the embedder; with examples it only adds the relevance evidence
        embed = sentence_embedder()
    except FileNotFoundError:
        if not examples:
            raise
        embed = None
    theme = build_theme(description, examples, source=opts.source, embed=embed)
    ranked = rank_features(lm, suite, theme, site=opts.site, top=5, atlas=atlas, embed=embed,
                           memo=setup_memo())
    log(f"theme {description!r}: top features at {ranked[0].feature.site} (seed score = t x "
        "specificity excess x relevance)")
    for r in ranked:
        log(f"  {r.feature}  score={r.seed_score:6.2f}  t={r.score:6.2f}  specificity "
            f"{r.specificity:.2f}  relevance {r.relevance:.2f}  fires on {r.theme_frac:.0%} of "
            f"theme texts vs {r.background_frac:.0%}, most on {', '.join(r.fires_on)!r}  "
            f"{r.label}")
    return theme, ranked


def build_plan(opts: PlanOptions, suite: Suite, lm: LM, *, features: Sequence[str] = (),
               theme: str | None = None, plan_file: str | None = None,
               graph_file: str | None = None, log: Log = print) -> SteeringPlan:
    """The plan of a plan file, a flow-graph file, a theme or the listed features; the
    options' token window (``from_token``, ``generated_only``), when set, replaces the plan's."""
    plan = _build_plan(opts, suite, lm, features, theme, plan_file, graph_file, log)
    if opts.from_token or opts.generated_only:
        plan = dataclasses.replace(plan, from_token=opts.from_token,
                                   generated_only=opts.generated_only)
    return plan


def _build_plan(opts: PlanOptions, suite: Suite, lm: LM, features: Sequence[str],
                theme: str | None, plan_file: str | None, graph_file: str | None,
                log: Log) -> SteeringPlan:
    import json

    from saeflow.catalog import atlas_for
    from saeflow.steer import (SteeringPlan, feature_magnitudes, graph_features,
                               plan_from_features, plan_from_graph)
    if plan_file:
        return SteeringPlan.load(plan_file)
    graph = None
    if graph_file:
        graph = FlowGraph.from_json(json.loads(Path(graph_file).read_text()))
        feats = graph_features(graph)
    elif theme:
        atlas = atlas_for(suite, lm, opts.atlas) if opts.mode != "features" else None
        feats = [theme_seed(opts, suite, lm, theme, atlas, log)[1][0].feature]
    else:
        feats = [Feature.parse(f) for f in features]
    if graph is None and opts.mode != "features":
        if len(feats) != 1:
            raise ValueError("a flow graph starts from one --feature; use --mode features to "
                             "steer several features directly")
        graph = trace_graph(opts, atlas_for(suite, lm, opts.atlas), feats[0], log)
        feats = graph_features(graph)
    texts = magnitude_texts(opts.source) if opts.magnitude in ("res_norm", "activation") else None
    mags = (feature_magnitudes(lm, suite, feats, opts.magnitude, texts)
            if opts.action == "activate" else None)
    if graph is None:
        return plan_from_features(feats, opts.coefficient, opts.action, mags)
    return plan_from_graph(graph, opts.mode, opts.layer, opts.schedule, opts.coefficient,
                           alpha=opts.alpha, end_coefficient=opts.end_coefficient,
                           action=opts.action, magnitudes=mags)


def steer_pairs(lm: LM, suite: Suite, prompts: Sequence[str], plan: SteeringPlan,
                gen: GenerationOptions):
    """``[(unsteered, steered)]`` generations per prompt and sample, with the same seed."""
    from saeflow.steer import generate
    def run(p, s):
        return generate(lm, list(prompts), p, gen.max_new_tokens, suite=s, samples=gen.samples,
                        seed=gen.seed, temperature=gen.temperature, top_p=gen.top_p,
                        greedy=gen.greedy)
    base, steered = run(None, None), run(plan, suite)
    return list(zip(base, steered))


