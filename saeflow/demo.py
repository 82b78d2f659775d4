"""``saeflow demo``: the whole method on one model, ending in one self-contained HTML report.

Stages (each reuses the command that does it on its own, and each is cached or resumable, so a
re-run takes seconds to a few minutes):
  1. the suite: the SmolLM2 starter suite (trained first if missing) or the one given;
     ``--quick`` trains a four-layer suite on a few thousand tokens instead (for CI);
  2. the atlas: data-free matching and lineage classes for every layer (``saeflow atlas``);
  3. themes and steering: for each theme a seed feature, its flow graph, and a small steering
     comparison (unsteered / prompting / single-layer / cumulative; ``saeflow steer-eval``);
  4. flow graphs of the seeds, rendered (``saeflow graph``);
  5. a small causal check of the matches (``saeflow deactivate``);
  6. ``report.html`` plus the raw results under ``--out``.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

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

    def flow_args(self) -> list[str]:
        return ["--res-threshold", str(self.res_threshold),
                "--block-threshold", str(self.block_threshold)]

    def stage_args(self) -> dict[str, list[str]]:
        """Command lines of the stages (without the suite and --out)."""
        if self.quick:
            return {
                "steer-eval": ["--coefficients", "0.2", "--seeds", "0", "--samples", "1",
                               "--max-new-tokens", "12", "--prompt", "I think", "--layers", "auto"],
                "deactivate": ["--layers", "2,3", "--n-texts", "4", "--tokens-per-text", "3",
                               "--strategies", "top1,random5,pearson", "--corr-tokens", "512"],
            }
        return {
            "steer-eval": ["--coefficients", "0.05,0.25", "--seeds", "0,1", "--samples", "2",
                           "--prompt", "I think", "--prompt", "Yesterday,"],
            "deactivate": ["--layers", "6,12,18", "--n-texts", "12", "--tokens-per-text", "4",
                           "--strategies", "top1,top5,random5,pearson"],
        }


@dataclass
class DemoResult:
    out: Path
    report: Path
    atlas: Path
    timings: dict[str, float] = field(default_factory=dict)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "theme"


def _run_command(argv: list[str]) -> None:
    """Run one saeflow command in this process; a failure stops the demo with its message."""
    from saeflow.cli import build_parser
    args = build_parser().parse_args(argv)
    code = int(args.func(args) or 0)
    if code:
        raise RuntimeError(f"demo: stage `saeflow {' '.join(argv)}` failed with exit code {code}")


def _suite_spec(cfg: DemoConfig) -> str:
    if not cfg.quick:
        return cfg.suite
    from saeflow.models import cache_dir
    from saeflow.train import train_quick
    folder = cache_dir() / "suites" / "smollm2-quick"
    print(f"saeflow demo --quick: a small suite ({QUICK_SITES}) in {folder}")
    return str(train_quick(folder, sites=QUICK_SITES))


def run_demo(cfg: DemoConfig) -> DemoResult:
    from saeflow.atlas import ensure_atlas
    from saeflow.atomic import write_text
    from saeflow.export import render
    from saeflow.flow import trace
    from saeflow.lineage import plot_fractions
    from saeflow.report import write_report
    from saeflow.sites import Feature
    from saeflow.steer import graph_features
    from saeflow.suite import load_suite, write_json_atomic

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    common = ["--device", cfg.device, "--dtype", cfg.dtype]
    if cfg.model:
        common += ["--model", cfg.model]
    stage = cfg.stage_args()

    t = time.perf_counter()
    spec = _suite_spec(cfg)
    suite = load_suite(spec, model=cfg.model)  # trains the starter suite on first use
    timings["suite"] = time.perf_counter() - t

    t = time.perf_counter()
    print("\n== atlas: data-free matching and lineage of every residual feature")
    _run_command(["atlas", spec, *common])
    atlas = ensure_atlas(suite)
    plot_fractions(atlas.class_fractions(), out / "lineage.png",
                   title=f"Lineage of residual features over depth ({suite.name})")
    timings["atlas"] = time.perf_counter() - t

    t = time.perf_counter()
    print("\n== steering: seeds for the themes, flow graphs, single-layer vs cumulative")
    themes_argv = [a for th in cfg.themes for a in ("--theme", th)]
    _run_command(["steer-eval", spec, *themes_argv, "--out", str(out / "steering"),
                  *stage["steer-eval"], *cfg.flow_args(), *common])
    timings["steering"] = time.perf_counter() - t

    t = time.perf_counter()
    graphs = {}
    for theme in cfg.themes:
        res = json.loads((out / "steering" / slug(theme) / "results.json").read_text())
        seed = Feature.parse(res["setup"]["seed"])
        # the graph steering used: the seed's top-1 residual chain and its MLP/attention parts
        graph = trace(atlas, seed, cfg.res_threshold, cfg.block_threshold, children=False)
        if [str(f) for f in graph_features(graph)] != res["setup"]["graph_features"]:
            raise RuntimeError(f"demo: the flow graph of {seed} differs from the one steer-eval "
                               f"used for {theme!r}; is the atlas in {atlas.root} newer?")
        svg = render(graph, "svg")
        write_json_atomic(out / "graphs" / f"{seed.site.slug}-{seed.index}.json", graph.to_json())
        write_text(out / "graphs" / f"{seed.site.slug}-{seed.index}.svg", svg)
        top = next((r.get("top_token") for r in res["setup"].get("ranked", [])
                    if r["feature"] == str(seed)), None)
        graphs[theme] = {"seed": str(seed), "graph": graph, "svg": svg, "fires_on": top}
    timings["graphs"] = time.perf_counter() - t

    t = time.perf_counter()
    print("\n== causal check: deactivate matched predecessors, does the target die?")
    _run_command(["deactivate", spec, "--out", str(out / "deactivation"),
                  *stage["deactivate"], *common])
    timings["deactivation"] = time.perf_counter() - t

    report = write_report(out, suite, atlas, graphs, cfg, timings)
    write_json_atomic(out / "demo.json", {"config": asdict(cfg), "suite": spec,
                                          "atlas": str(atlas.root), "timings": timings,
                                          "seeds": {k: v["seed"] for k, v in graphs.items()}})
    return DemoResult(out, report, atlas.root, timings)
