"""``saeflow demo``: the whole method on one model, ending in one self-contained HTML report.

Stages (each calls the recipe its command calls, and each is cached or resumable, so a re-run
takes seconds to a few minutes; the model is loaded once):
  1. the suite: the SmolLM2 starter suite (trained first if missing) or the one given;
     ``--quick`` trains a four-layer suite on a few thousand tokens instead (for CI);
  2. the atlas: data-free matching and lineage classes for every layer (``saeflow atlas``);
  3. themes and steering: for each theme a seed feature, its flow graph, and a small steering
     comparison (unsteered / prompting / single-layer / cumulative; ``saeflow steer-eval``);
     a re-run reads each theme's ranking statistics, magnitudes and scorer calibrations from
     the cache directory (``saeflow.memo``) and its finished cells from ``--out``;
  4. flow graphs of the seeds (the graphs steering used), rendered (``saeflow graph``);
  5. a small causal check of the matches (``saeflow deactivate``);
  6. permutations over depth (``saeflow permute`` / ``saeflow prune``): layer pruning and
     feature persistence, read from what those commands stored for the suite when it is still
     valid, else computed small (a spread of layers, few features) into ``--out``;
  7. ``report.html``, rendered from the stages' result objects, plus the raw results under
     ``--out``. Every stage's wall and CPU seconds are printed at the end and shown in the
     report.
The sentence embedder is loaded once and passed to every stage that embeds text (theme
retrieval, seed relevance, topic scores, the persistence proxy).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

from saeflow.flow import BLOCK_THRESHOLD, RES_THRESHOLD
from saeflow.configs import PRUNE_METHODS, DeactivationConfig, HeldoutConfig, PersistenceConfig
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
    # auto (compute.model_dtype): bf16 on a GPU and on CPUs where bf16 products are fast, fp32
    # elsewhere, the rule the starter suite is trained with; the analysis commands keep fp32
    dtype: str = "auto"
    # flow-graph thresholds: the paper's (the retrained starter suite's seed graphs span
    # 19-30 layers at 0.5 / 0.15, docs/steering.md)
    res_threshold: float = RES_THRESHOLD
    block_threshold: float = BLOCK_THRESHOLD

    def __post_init__(self):
        if not self.themes or any(not t.strip() for t in self.themes):
            raise ValueError("demo: --theme needs non-empty theme descriptions")
        for name in ("res_threshold", "block_threshold"):
            if not -1.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"demo: --{name.replace('_', '-')} is a cosine, between -1 "
                                 f"and 1; got {getattr(self, name)}")

    def steering(self, out: Path) -> SteerEvalConfig:
        """The steering evaluation stage (small: a demo, not a benchmark). Full run: 2 prompts x
        1 seed x 2 samples per selection cell, the default 4 report prompts x 1 seed x 2
        samples per held-out cell, 32 new tokens (about a minute per theme on 2 idle cores)."""
        plan = PlanOptions(res_threshold=self.res_threshold, block_threshold=self.block_threshold)
        if self.quick:
            return SteerEvalConfig(themes=self.themes, out=str(out), coefficients=(0.2,),
                                   seeds=(0,), samples=1, max_new_tokens=12,
                                   prompts=("I think",), plan=plan)
        return SteerEvalConfig(themes=self.themes, out=str(out), coefficients=(0.05, 0.25),
                               seeds=(0,), samples=2, prompts=("I think", "Yesterday,"),
                               max_new_tokens=32, plan=plan)

    def deactivation(self, out: Path) -> DeactivationRun:
        """The causal-check stage."""
        if self.quick:
            cfg = DeactivationConfig(layers=(2, 3), tokens_per_text=3,
                                     strategies=("top1", "random5", "random_active", "pearson"),
                                     corr_tokens=512)
            return DeactivationRun(cfg, n_texts=4, out=str(out))
        # Pearson on 16k tokens (labelled underpowered; 100k adds minutes on 2 cores)
        cfg = DeactivationConfig(layers=(6, 12, 18), tokens_per_text=4, corr_tokens=16_384,
                                 strategies=("top1", "top5", "random5", "random_active",
                                             "pearson"))
        return DeactivationRun(cfg, n_texts=12, out=str(out))


    def pruning(self) -> tuple[HeldoutConfig, int, tuple[str, ...]]:
        """Held-out text of the pruning and persistence stage, how many pruned layers (spread
        over depth) it computes when nothing valid is stored, and the estimates compared."""
        if self.quick:
            return HeldoutConfig(n_seqs=1, seq_len=64, batch_size=1), 1, ("permutation", "skip")
        return HeldoutConfig(n_seqs=4), 6, PRUNE_METHODS

    def persistence(self, layers: list[int]) -> PersistenceConfig:
        """A small persistence run (the command's default follows 128 features from 4 starts
        with 4 contexts each: minutes of sentence embedding)."""
        if self.quick:
            return PersistenceConfig(starts=(layers[0],), max_distance=2, n_features=8,
                                     top_k=2, min_fires=1)
        starts = (layers[len(layers) // 6], layers[len(layers) // 2])
        return PersistenceConfig(starts=starts, max_distance=8, n_features=32, top_k=2)


class Stages:
    """Wall and CPU seconds of each stage (CPU: this process, every thread)."""

    def __init__(self):
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        t, c = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - t
            self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - c

    def rows(self) -> list[tuple[str, float, float]]:
        return [(k, self.wall[k], self.cpu[k]) for k in self.wall]

    def table(self) -> str:
        lines = [f"{'stage':<14} {'wall s':>8} {'CPU s':>8}"]
        lines += [f"{k:<14} {w:8.1f} {c:8.1f}" for k, w, c in self.rows()]
        lines.append(f"{'total':<14} {sum(self.wall.values()):8.1f} "
                     f"{sum(self.cpu.values()):8.1f}")
        return "\n".join(lines)


@dataclass
class DemoResult:
    out: Path
    report: Path
    atlas: Path
    timings: dict[str, float] = field(default_factory=dict)  # wall seconds per stage
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds per stage


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


class PermutationStage(NamedTuple):
    """Layer pruning and persistence over depth, and where each came from."""
    tag: str  # the permutation setting, e.g. both-folded
    pairs: list  # permutation.PairResult of the consecutive residual pairs
    prune: list  # prune.PruneRow
    prune_from: Path  # the prune.json the rows are in
    prune_text: dict  # the held-out text they were computed on
    persistence: list  # persistence.PersistenceRow
    distances: dict  # {start: {measure: {"half": d, "significant": d}}}
    persistence_from: Path
    persistence_settings: dict
    plots: dict[str, Path]


def _stored_prune(store, path: Path | None = None) -> tuple[list, dict] | None:
    """The rows of a prune.json (``saeflow prune``'s in the permutation folder by default)
    whose SAEs are unchanged, and its settings."""
    import json

    from saeflow.prune import PruneRow
    from saeflow.sites import Site
    path = path or store.folder / "prune.json"
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    rows = [PruneRow(**r) for u, v in data.get("layers", {}).items()
            if v.get("saes") == [store.fingerprint(Site(int(u) - 1, "res")),
                                 store.fingerprint(Site(int(u), "res"))] for r in v["rows"]]
    return (rows, data.get("settings", {})) if rows else None


def _stored_persistence(path: Path, newest_pair: float, settings: dict | None = None):
    """Rows, distances and settings of a persistence.json written after the newest stored
    permutation it follows (and, with ``settings``, under those), else None."""
    import json

    from saeflow.persistence import PersistenceRow
    if not path.exists() or path.stat().st_mtime < newest_pair:
        return None
    data = json.loads(path.read_text())
    if settings is not None and data.get("settings") != settings:
        return None
    return [PersistenceRow(*r) if isinstance(r, list) else PersistenceRow(**r)
            for r in data["rows"]], data["distances"], data["settings"]


def _permutations(cfg: DemoConfig, suite, lm, out: Path, embed) -> PermutationStage:
    """Stage 6 (module docstring): stored results first, else small ones into ``out``."""
    import json

    from saeflow import persistence as ps
    from saeflow import prune
    from saeflow.io import write_json_atomic
    from saeflow.permutation import PermutationStore, consecutive_pairs
    store = PermutationStore(suite)
    pairs = store.compute(consecutive_pairs(suite.sites()))
    newest = max((store._paths(p.a, p.b)[1].stat().st_mtime for p in pairs), default=0.0)
    text, n_layers, methods = cfg.pruning()
    layers = sorted({s.layer for s in suite.sites("res")})
    data = None

    def states():
        nonlocal data
        if data is None:
            data = prune.collect_states(lm, layers, prune.text_batches(lm.tokenizer, text),
                                        text.outlier_factor, full=layers)
        return data
    stored = _stored_prune(store)
    if stored:
        rows, settings = stored
        prune_from, prune_text = store.folder / "prune.json", settings.get("text", {})
    else:
        ok = prune.prunable_layers(suite)
        picks = sorted({ok[round(i * (len(ok) - 1) / max(1, n_layers - 1))]
                        for i in range(n_layers)}) if ok else []
        settings = {"text": asdict(text), "model_dtype": cfg.dtype}
        own = _stored_prune(store, out / "prune.json")  # a re-run: no forward pass needed
        rows = [r for r in own[0] if r.layer in picks] if own else []
        if not own or {r.layer for r in rows} != set(picks) or \
                own[1] != {**settings, "methods": list(methods), "with_loss": True,
                           "permutations": store.config.tag}:
            rows = prune.run_pruning(lm, suite, store, picks, states(), methods, out=out,
                                     settings=settings)
        prune_from, prune_text = out / "prune.json", asdict(text)
    plots = {"prune": prune.plot(rows, out / "prune.png",
                                 title=f"Layer pruning: {suite.name} ({store.config.tag})")}
    pcfg = cfg.persistence(layers)
    mine = json.loads(json.dumps({**asdict(pcfg), "text": asdict(text)}))  # as stored
    found, pfrom = _stored_persistence(store.folder / "persistence.json", newest), store.folder
    if not found:
        found, pfrom = _stored_persistence(out / "persistence.json", newest, mine), out
    if found:
        prows, dist, psettings = found
        pfrom = pfrom / "persistence.json"
    else:
        prows, dist = ps.run_persistence(lm, suite, store, states(), pcfg, embed=embed)
        psettings, pfrom = mine, out / "persistence.json"
        write_json_atomic(pfrom, {"settings": mine, "rows": [r._asdict() for r in prows],
                                  "distances": dist})
    plots["persistence"] = ps.plot_persistence(
        prows, out / "persistence.png", title=f"Feature persistence: {suite.name} "
                                              f"({store.config.tag})")
    return PermutationStage(store.config.tag, pairs, rows, prune_from, prune_text, prows,
                            dist, pfrom, psettings, plots)


def run_demo(cfg: DemoConfig) -> DemoResult:
    from saeflow.catalog import load_suite
    from saeflow.io import write_json_atomic
    from saeflow.lineage import fraction_table, plot_fractions
    from saeflow.models import dtype_name
    from saeflow.recipes.atlas import AtlasOptions, build_atlas
    from saeflow.recipes.deactivation import (format_table, run_deactivation_check,
                                              save_deactivation)
    from saeflow.recipes.steer_eval import format_comparison, run_steer_eval
    from saeflow.report import write_report
    from saeflow.themes import sentence_embedder

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    stage = Stages()

    with stage("suite"):
        spec = _suite_spec(cfg)
        suite = load_suite(spec, model=cfg.model)  # trains the starter suite on first use
        from saeflow.compute import model_dtype
        lm = suite.load_model(device=cfg.device, dtype=model_dtype(cfg.dtype, cfg.device))
        print(f"model weights: {dtype_name(lm.dtype)}")

    with stage("atlas"):
        print("\n== atlas: data-free matching and lineage of every residual feature")
        atlas = build_atlas(suite, AtlasOptions(), lm).atlas
        print(f"atlas in {atlas.root}; thresholds: {atlas.info['threshold_rule']}")
        print(fraction_table(atlas.class_fractions(), atlas.thresholds))
        plot_fractions(atlas.class_fractions(), out / "lineage.png",
                       title=f"Lineage of residual features over depth ({suite.name})")

    with stage("steering"):
        print("\n== steering: seeds for the themes, flow graphs, single-layer vs cumulative")
        embed = sentence_embedder()
        steering = run_steer_eval(cfg.steering(out / "steering"), suite, lm, atlas, embed=embed)
        print("\n" + format_comparison(steering.comparison))

    with stage("graphs"):
        graphs = _graphs(steering, out)

    with stage("deactivation"):
        print("\n== causal check: deactivate matched predecessors, does the target die?")
        check = cfg.deactivation(out / "deactivation")
        deactivation = run_deactivation_check(check, suite, lm)
        print(format_table(deactivation.summary, check.config.layers, deactivation.info))
        save_deactivation(deactivation, Path(check.out))

    with stage("permutations"):
        print("\n== permutations over depth: layer pruning and feature persistence")
        perm = _permutations(cfg, suite, lm, out / "permutation", embed)
        print(f"pruning from {perm.prune_from}, persistence from {perm.persistence_from}")

    with stage("report"):
        report = write_report(out, suite, atlas, graphs, cfg, stage, steering, deactivation,
                              perm)
    write_json_atomic(out / "demo.json", {
        "config": asdict(cfg), "suite": spec, "atlas": str(atlas.root),
        "timings": stage.wall, "cpu_seconds": stage.cpu,
        "seeds": {k: v["seed"] for k, v in graphs.items()}})
    print("\nstage times (wall and CPU seconds of this process; the report shows them too):")
    print(stage.table())
    return DemoResult(out, report, atlas.root, dict(stage.wall), dict(stage.cpu))
