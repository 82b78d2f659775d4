"""The causal check of the matches (``saeflow deactivate``; the experiment itself is
``saeflow.deactivate``): which texts it runs on, the run, and its saved tables and plots."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from saeflow.configs import DeactivationConfig
from saeflow.plots import DEACTIVATION_LABELS
from saeflow.recipes import Log


@dataclass(frozen=True)
class DeactivationRun:
    """Which texts the deactivation check runs on, and where its results go."""
    config: DeactivationConfig = DeactivationConfig()
    texts: str | None = None  # own texts (default: the bundled corpus, held-out split)
    corr_texts: str | None = None  # texts for the Pearson baseline
    n_texts: int = 35  # evaluation texts
    out: str = "deactivation"
    plots: bool = True
    ray: str | None = None  # the block re-runs on Ray: "local", "auto" or an address
    ray_units: int = 8  # Ray units per layer (its batches of re-runs dealt among them)

    def __post_init__(self):
        if self.n_texts < 1:
            raise ValueError(f"--n-texts must be >= 1, got {self.n_texts}")
        if self.ray_units < 1:
            raise ValueError(f"--ray-units must be >= 1, got {self.ray_units}")


def choose_texts(run: DeactivationRun) -> tuple[list[str], list[str]]:
    """(evaluation texts, the rest for the Pearson baseline), shuffled with the run's seed."""
    from saeflow.corpus import load_texts
    seed = run.config.seed

    def everything(path):  # a user's file: both splits
        return load_texts(path, split="train") + load_texts(path, split="heldout")

    if run.texts:
        texts = everything(run.texts)
        random.Random(seed).shuffle(texts)
        ev, rest = texts[:run.n_texts], texts[run.n_texts:]
    else:
        ev = load_texts(split="heldout")
        random.Random(seed).shuffle(ev)
        ev, rest = ev[:run.n_texts], []
    if run.corr_texts:
        rest = everything(run.corr_texts)
    elif not run.texts:
        rest = load_texts(split="train")
    random.Random(seed + 1).shuffle(rest)
    return ev, rest


def run_deactivation_check(run: DeactivationRun, suite, lm, log: Log = print, loader=None):
    """Tokenise the texts and run ``saeflow.deactivate.run_deactivation`` (resumable from
    ``out/checkpoints``); returns its ``DeactivationResult``. With ``run.ray`` the block
    re-runs of each layer run on Ray workers, which open the model and suite with ``loader``
    (``distribute.SuiteLoader``; default: ship ``lm`` and ``suite``)."""
    from saeflow.deactivate import run_deactivation, tokenize_texts
    cfg = run.config
    ev, rest = choose_texts(run)
    ids = tokenize_texts(lm, ev, cfg.max_len)
    corr_ids = []
    if "pearson" in cfg.strategies:
        n = 0
        for text in rest:  # tokenised lazily: the train split is large
            for x in tokenize_texts(lm, [text], cfg.max_len):
                corr_ids.append(x)
                n += len(x) - 1
            if n >= cfg.corr_tokens:
                break
        if not corr_ids:
            raise ValueError("the pearson baseline needs texts beyond the evaluation texts: give "
                             "--corr-texts, more --texts, or drop pearson from --strategies")
    log(f"saeflow deactivate: {len(ids)} texts x {cfg.tokens_per_text} tokens, layers "
        f"{','.join(map(str, cfg.layers))}, strategies {','.join(cfg.strategies)}, "
        f"r {','.join(f'{r:g}' for r in cfg.rs)}")
    ckpt = Path(run.out) / "checkpoints"
    fan_out = None
    if run.ray is not None:
        from saeflow.recipes.distribute import Given, Pool, deactivation_fan_out
        fan_out = deactivation_fan_out(Pool(run.ray, loader or Given(lm, suite)), cfg,
                                       run.ray_units, ckpt)
    return run_deactivation(lm, suite, ids, corr_ids, cfg, checkpoint_dir=ckpt, fan_out=fan_out)


def save_deactivation(result, out: Path, plots: bool = True) -> list[Path]:
    """``summary.csv``, ``pairs.csv``, ``summary.json`` and (``plots``) the two PNGs."""
    import math

    from saeflow import plots as plotting
    from saeflow.deactivate import PairOutcome, SummaryRow
    from saeflow.io import write_json_atomic, write_text
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "summary.csv", rows_csv(result.summary, SummaryRow._fields))
    write_text(out / "pairs.csv", rows_csv(result.pairs, PairOutcome._fields))

    def clean(row):  # NaN (no oracle run) is not valid JSON: write null
        return {k: None if isinstance(v, float) and math.isnan(v) else v
                for k, v in row._asdict().items()}
    write_json_atomic(out / "summary.json", {"summary": [clean(r) for r in result.summary],
                                             "info": result.info})
    paths = [out / "summary.csv", out / "pairs.csv", out / "summary.json"]
    if plots and result.summary:
        paths += plotting.deactivation_plots(result.summary,
                                             list(result.info["settings"]["layers"]), out)
    return paths


def rows_csv(rows, header) -> str:
    """Named tuples as CSV text (floats to 6 significant digits)."""
    import csv
    import io
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    for r in rows:
        w.writerow([f"{v:.6g}" if isinstance(v, float) else v for v in r])
    return buf.getvalue()


def pearson_power(info: dict) -> dict | None:
    """The Pearson sample of a run (tokens, median firings of the targets, ``underpowered``),
    pooled over layers, or None when the baseline did not run."""
    stats = [v["pearson"] for v in info.get("layers", {}).values() if "pearson" in v]
    if not stats:
        return None
    return {"tokens": min(s["tokens"] for s in stats),
            "target_fires_median": min(s["target_fires_median"] for s in stats),
            "underpowered": any(s["underpowered"] for s in stats)}


def strategy_label(strategy: str, info: dict | None = None) -> str:
    """The table label of a strategy; Pearson on too few tokens says it is underpowered."""
    label = DEACTIVATION_LABELS[strategy]
    power = pearson_power(info or {}) if strategy == "pearson" else None
    return label + (" (underpowered)" if power and power["underpowered"] else "")


def format_table(summary, layers, info: dict | None = None) -> str:
    """One block per r: strategy rows; overall, per layer and per kind success / change /
    pre-activation drop (n)."""
    cell = {(s.strategy, s.r, s.layer, s.kind): s for s in summary}
    lines = []
    w = 26
    for r in sorted({s.r for s in summary}):
        cols = [("all", "all")] + [(str(L), "all") for L in layers] + \
               [("all", k) for k in ("res", "mlp", "att")]
        names = ["all"] + [f"L{L}" for L in layers] + ["res", "mlp", "att"]
        names.append("oracle, same pairs")
        lines.append(f"r = {r:g}: success rate / mean activation change / mean pre-activation "
                     f"drop (pairs); last column: the exhaustive oracle on the same targets and "
                     f"kinds (success / change)")
        lines.append(f"{'strategy':<32}" + "".join(f"{n:>{w}}" for n in names))
        for strat in DEACTIVATION_LABELS:
            if not any(k[0] == strat and k[1] == r for k in cell):
                continue
            parts = []
            for col in cols:
                c = cell.get((strat, r, *col))
                parts.append(f"{c.success_rate:>4.0%} / {c.mean_change:5.2f} / "
                             f"{c.mean_pre_drop:5.2f} ({c.n})" if c else "-")
            c = cell[(strat, r, "all", "all")]
            parts.append("-" if c.oracle_success_rate != c.oracle_success_rate else
                         f"{c.oracle_success_rate:>6.0%} / {c.oracle_mean_change:5.2f}")
            lines.append(f"{strategy_label(strat, info):<32}" + "".join(f"{x:>{w}}" for x in parts))
        lines.append("")
    power = pearson_power(info or {})
    if power:
        lines.append(f"top-1 Pearson: {power['tokens']:,} correlation tokens, the median target "
                     f"fires {power['target_fires_median']:g} times"
                     + (" (underpowered: fewer than 100,000 tokens)" if power["underpowered"]
                        else ""))
    return "\n".join(lines)
