"""Permutations over depth and layer pruning (``saeflow permute``, ``saeflow prune``; the
algorithms are ``saeflow.permutation``, ``saeflow.persistence`` and ``saeflow.prune``): which
pairs are matched, the held-out states the persistence, ablation and pruning runs share, and the
tables, JSON files and plots they leave in the permutation folder."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

from saeflow.configs import PRUNE_METHODS, HeldoutConfig, PermutationConfig, PersistenceConfig
from saeflow.recipes import Log


@dataclass(frozen=True)
class PermuteRun:
    """What ``saeflow permute`` computes beyond the permutations themselves."""
    pairs: str | None = None  # extra pairs "A:B,..." (permutation.parse_pairs)
    consecutive: bool = True  # every consecutive residual pair
    spans: tuple[int, ...] = ()  # start layers of the composition check
    persistence: PersistenceConfig | None = None  # None: no persistence run
    ablation: tuple[int, ...] = ()  # layers u of the folding x objective ablation
    judge_url: str | None = None  # optional LLM judge of matched pairs (persistence)
    judge_model: str | None = None
    text: HeldoutConfig = field(default_factory=HeldoutConfig)


class PermuteResult(NamedTuple):
    folder: Path  # the setting's folder of the permutation store
    pairs: list  # permutation.PairResult
    composition: list  # permutation.AgreementRow
    persistence: list  # persistence.PersistenceRow
    ablation: list  # persistence.AblationRow


def heldout_states(lm, text: HeldoutConfig, layers, full=(), progress: bool = True):
    """``prune.HeldoutStates`` of ``layers`` on the held-out text."""
    from saeflow import prune
    return prune.collect_states(lm, layers, prune.text_batches(lm.tokenizer, text),
                                text.outlier_factor, full=full, progress=progress)


def run_permute(suite, cfg: PermutationConfig, run: PermuteRun, out: str | None = None,
                max_distance: int = PersistenceConfig.max_distance, device: str = "cpu",
                dtype: str = "float32", progress: bool = True, log: Log = print
                ) -> PermuteResult:
    """Match the pairs (resumably), then the composition check, persistence and ablation that
    ``run`` asks for, each saved as JSON (and a plot) in the store's folder."""
    from saeflow import permutation as pm
    from saeflow.io import write_json_atomic
    if max_distance < 1:
        raise ValueError(f"--max-distance must be >= 1, got {max_distance}")
    store = pm.PermutationStore(suite, cfg, out)
    pairs = pm.consecutive_pairs(suite.sites()) if run.consecutive else []
    pairs += [p for p in pm.parse_pairs(run.pairs) if p not in pairs]
    if not pairs and not (run.spans or run.persistence or run.ablation):
        raise ValueError(f"suite {suite.name!r}: nothing to match (no consecutive residual "
                         "pairs and no --pairs)")
    results = store.compute(pairs, progress=progress)
    if results:
        log(f"permutations of {suite.name} ({cfg.tag}) in {store.folder}")
        log(pm.pair_table(results))
    composition = []
    if run.spans:
        composition = pm.composition_agreement(store, run.spans, max_distance, progress=progress)
        log("\ncomposition: direct P(s -> s+d) vs composed consecutive permutations")
        log(pm.agreement_table(composition))
        write_json_atomic(store.folder / "composition.json", [r._asdict() for r in composition])
    persistence, ablation = [], []
    if not (run.persistence or run.ablation):
        return PermuteResult(store.folder, results, composition, persistence, ablation)
    from saeflow import persistence as ps
    from saeflow import prune
    from saeflow.pair_judge import make_pair_judge
    judge = make_pair_judge(run.judge_url, run.judge_model)  # both or neither, before the model
    lm = suite.load_model(device=device, dtype=dtype)
    layers = sorted({s.layer for s in suite.sites("res")})
    data = heldout_states(lm, run.text, layers, progress=progress)
    text = run.text
    if run.persistence:
        pcfg = run.persistence
        persistence, dist = ps.run_persistence(lm, suite, store, data, pcfg, judge=judge,
                                               progress=progress)
        n_tok = len(next(iter(data.states.values())))
        log(f"\npersistence over depth ({n_tok} evaluated tokens of {text.source}/{text.split})")
        log(ps.persistence_table(persistence, dist))
        write_json_atomic(store.folder / "persistence.json",
                          {"settings": {**asdict(pcfg), "text": asdict(text)},
                           "rows": [r._asdict() for r in persistence], "distances": dist})
        plot = ps.plot_persistence(persistence, store.folder / "persistence.png",
                                   title=f"Feature persistence: {suite.name} ({cfg.tag})")
        log(f"saved: {store.folder / 'persistence.json'}; plot: {plot}")
    if run.ablation:
        layers = prune.prunable_layers(suite, run.ablation)
        ablation = ps.run_ablation(suite, store.root, cfg, layers, data, progress=progress)
        log(f"\nablation: folding x objective on pairs (u-1, u), u in {layers} "
            f"(means over the layers)")
        log(ps.ablation_table(ablation))
        write_json_atomic(store.root / "ablation.json",
                          {"text": asdict(text), "rows": [r._asdict() for r in ablation]})
        log(f"saved: {store.root / 'ablation.json'}")
    return PermuteResult(store.folder, results, composition, persistence, ablation)


class PruneResult(NamedTuple):
    rows: list  # prune.PruneRow
    folder: Path  # prune.json and prune.csv are here
    plot: Path


def run_prune(suite, cfg: PermutationConfig, text: HeldoutConfig, layers: str | None = None,
              methods: str = ",".join(PRUNE_METHODS), with_loss: bool = True,
              out: str | None = None, plot: str | None = None, device: str = "cpu",
              dtype: str = "float32", progress: bool = True, log: Log = print) -> PruneResult:
    """Layer pruning of ``layers`` (a spec such as ``1-29``; default: every prunable layer),
    resumable per layer, with its table, CSV and plot."""
    from saeflow import prune
    from saeflow.permutation import PermutationStore
    chosen = [m.strip() for m in methods.split(",") if m.strip()]
    bad = [m for m in chosen if m not in PRUNE_METHODS]
    if bad or not chosen:
        raise ValueError(f"--methods: unknown {bad}; known: {', '.join(PRUNE_METHODS)}")
    pruned = prune.prunable_layers(suite, prune.parse_layers(layers))
    if not pruned:
        raise ValueError(f"suite {suite.name!r} has no two consecutive residual SAEs to prune "
                         "between")
    store = PermutationStore(suite, cfg, out)
    lm = suite.load_model(device=device, dtype=dtype)
    needed = sorted({u - 1 for u in pruned} | set(pruned))
    data = heldout_states(lm, text, needed, full=needed if with_loss else [],
                          progress=progress)
    rows = prune.run_pruning(lm, suite, store, pruned, data, chosen, with_loss, out=store.folder,
                             settings={"text": asdict(text), "model_dtype": dtype},
                             progress=progress)
    log(f"layer pruning on {suite.name} ({lm.name}): {len(data.states[pruned[0]])} evaluated "
        f"tokens of {text.source}/{text.split}, permutations {cfg.tag}")
    log(prune.table(rows))
    prune.write_csv(rows, store.folder / "prune.csv")
    path = Path(plot) if plot else store.folder / "prune.png"
    prune.plot(rows, path, title=f"Layer pruning: {suite.name} ({cfg.tag})")
    log(f"saved: {store.folder / 'prune.json'}, prune.csv; plot: {path}")
    return PruneResult(rows, store.folder, path)
