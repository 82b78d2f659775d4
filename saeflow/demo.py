"""``saeflow demo``: the whole method on one model, ending in one self-contained HTML report.

Stages (each calls the recipe its command calls, and each is cached or resumable, so a re-run
takes seconds to a few minutes; the model is loaded once):
  1. the suite: the SmolLM2 starter suite (trained first if missing) or the one given;
     ``--quick`` trains a four-layer suite on a few thousand tokens instead (for CI);
  2. the atlas: data-free matching and lineage classes for every layer (``saeflow atlas``);
  3. themes and steering: for each theme a seed feature, its flow graph, and a small steering
     comparison (unsteered / prompting / single-layer / cumulative; ``saeflow steer-eval``);
  4. flow graphs of the seeds (the graphs steering used), rendered (``saeflow graph``);
  5. a small causal check of the matches (``saeflow deactivate``);
  6. ``report.html``, rendered from the stages' result objects, plus the raw results under
     ``--out``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from saeflow.deactivate import DeactivationConfig
from saeflow.recipes.deactivation import DeactivationRun
from saeflow.recipes.steer_eval import SteerEvalConfig
from saeflow.recipes.steering import PlanOptions

QUICK_SITES = "0-3/res,0-3/mlp,0-3/att"
DEFAULT_THEMES = ("weddings", "sports", "religion")


@dataclass(frozen=True)
class DemoConfig:
    out: str = "saeflow-demo"
    suite: str = "starter"
    model: str | None = None
    themes: tuple[str, ...] = DEFAULT_THEMES
    quick: bool = False
    device: str = "cpu"
    dtype: str = "float32"
    # flow-graph thresholds: the starter suite's cross-layer matches are weaker than Gemma
    # Scope's (median top-1 cosine ~0.33), so the paper's 0.5 leaves graphs of 1-2 nodes
    res_threshold: float = 0.3
    block_threshold: float = 0.2

    def __post_init__(self):
        if not self.themes or any(not t.strip() for t in self.themes):
            raise ValueError("demo: --theme needs non-empty theme descriptions")
        for name in ("res_threshold", "block_threshold"):
            if not -1.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"demo: --{name.replace('_', '-')} is a cosine, between -1 "
                                 f"and 1; got {getattr(self, name)}")

    def steering(self, out: Path) -> SteerEvalConfig:
        """The steering evaluation stage (small: a demo, not a benchmark)."""
        plan = PlanOptions(res_threshold=self.res_threshold, block_threshold=self.block_threshold)
        if self.quick:
            return SteerEvalConfig(themes=self.themes, out=str(out), coefficients=(0.2,),
                                   seeds=(0,), samples=1, max_new_tokens=12,
                                   prompts=("I think",), plan=plan)
        return SteerEvalConfig(themes=self.themes, out=str(out), coefficients=(0.05, 0.25),
                               seeds=(0, 1), samples=2, prompts=("I think", "Yesterday,"),
                               plan=plan)

    def deactivation(self, out: Path) -> DeactivationRun:
        """The causal-check stage."""
        if self.quick:
            cfg = DeactivationConfig(layers=(2, 3), tokens_per_text=3,
                                     strategies=("top1", "random5", "pearson"), corr_tokens=512)
            return DeactivationRun(cfg, n_texts=4, out=str(out))
        # Pearson on 16k tokens (labelled underpowered; 100k adds minutes on 2 cores)
        cfg = DeactivationConfig(layers=(6, 12, 18), tokens_per_text=4, corr_tokens=16_384,
                                 strategies=("top1", "top5", "random5", "random_active",
                                             "pearson"))
        return DeactivationRun(cfg, n_texts=12, out=str(out))


@dataclass
class DemoResult:
    out: Path
    report: Path
    atlas: Path
    timings: dict[str, float] = field(default_factory=dict)


def _suite_spec(cfg: DemoConfig) -> str:
    if not cfg.quick:
        return cfg.suite
    from saeflow.models import cache_dir
    from saeflow.train import train_quick
    folder = cache_dir() / "suites" / "smollm2-quick"
    print(f"saeflow demo --quick: a small suite ({QUICK_SITES}) in {folder}")
    return str(train_quick(folder, sites=QUICK_SITES))


def _graphs(steering, out: Path) -> dict:
    """Each theme's seed and the flow graph steering used, saved as JSON and SVG."""
    from saeflow.export import render
    from saeflow.io import write_json_atomic, write_text
    from saeflow.sites import Feature
    graphs = {}
    for run in steering.runs:
        seed, graph = Feature.parse(run.setup.info["seed"]), run.setup.graph
        svg = str(render(graph, "svg"))
        name = f"{seed.site.slug}-{seed.index}"
        write_json_atomic(out / "graphs" / f"{name}.json", graph.to_json())
        write_text(out / "graphs" / f"{name}.svg", svg)
        top = next((r.get("top_token") for r in run.setup.info.get("ranked", [])
                    if r["feature"] == str(seed)), None)
        graphs[run.theme] = {"seed": str(seed), "graph": graph, "svg": svg, "fires_on": top}
    return graphs


def run_demo(cfg: DemoConfig) -> DemoResult:
    from saeflow.catalog import load_suite
    from saeflow.io import write_json_atomic
    from saeflow.lineage import fraction_table, plot_fractions
    from saeflow.recipes.atlas import AtlasOptions, build_atlas
    from saeflow.recipes.deactivation import (format_table, run_deactivation_check,
                                              save_deactivation)
    from saeflow.recipes.steer_eval import format_comparison, run_steer_eval
    from saeflow.report import write_report

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    t = time.perf_counter()
    spec = _suite_spec(cfg)
    suite = load_suite(spec, model=cfg.model)  # trains the starter suite on first use
    lm = suite.load_model(device=cfg.device, dtype=cfg.dtype)
    timings["suite"] = time.perf_counter() - t

    t = time.perf_counter()
    print("\n== atlas: data-free matching and lineage of every residual feature")
    atlas = build_atlas(suite, AtlasOptions(), lm).atlas
    print(f"atlas in {atlas.root}; thresholds: {atlas.info['threshold_rule']}")
    print(fraction_table(atlas.class_fractions(), atlas.thresholds))
    plot_fractions(atlas.class_fractions(), out / "lineage.png",
                   title=f"Lineage of residual features over depth ({suite.name})")
    timings["atlas"] = time.perf_counter() - t

    t = time.perf_counter()
    print("\n== steering: seeds for the themes, flow graphs, single-layer vs cumulative")
    steering = run_steer_eval(cfg.steering(out / "steering"), suite, lm, atlas)
    print("\n" + format_comparison(steering.comparison))
    timings["steering"] = time.perf_counter() - t

    t = time.perf_counter()
    graphs = _graphs(steering, out)
    timings["graphs"] = time.perf_counter() - t

    t = time.perf_counter()
    print("\n== causal check: deactivate matched predecessors, does the target die?")
    check = cfg.deactivation(out / "deactivation")
    deactivation = run_deactivation_check(check, suite, lm)
    print(format_table(deactivation.summary, check.config.layers))
    save_deactivation(deactivation, Path(check.out))
    timings["deactivation"] = time.perf_counter() - t

    report = write_report(out, suite, atlas, graphs, cfg, timings, steering, deactivation)
    write_json_atomic(out / "demo.json", {"config": asdict(cfg), "suite": spec,
                                          "atlas": str(atlas.root), "timings": timings,
                                          "seeds": {k: v["seed"] for k, v in graphs.items()}})
    return DemoResult(out, report, atlas.root, timings)
