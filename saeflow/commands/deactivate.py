"""``saeflow deactivate SUITE``: causal validation of the data-free matches (method.md sec. 5).

Writes to ``--out`` (atomically): ``summary.csv`` and ``summary.json`` (success rate and mean
activation change per strategy, r, layer and predecessor kind, with counts, plus the run's
settings and notes), ``pairs.csv`` (every pair), ``success_by_layer.png`` and
``change_vs_r.png``; finished layers are kept in ``checkpoints/`` so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
from pathlib import Path

from saeflow.atomic import atomic_path, write_text

LABELS = {"top1": "top-1 cosine", "top5": "top-5 cosine (all)", "random5": "random of top-5",
          "permutation": "permutation", "pearson": "top-1 Pearson", "exhaustive": "exhaustive"}


def add(subparsers) -> None:
    from saeflow.cli import add_model_args
    from saeflow.deactivate import STRATEGIES

    p = subparsers.add_parser(
        "deactivate", help="check that matched predecessors feed their targets (deactivation)",
        description="Deactivate the matched predecessors of active residual features, one token "
                    "at a time, and measure how often the target feature turns off.")
    p.add_argument("suite", help="a suite: 'starter', a folder or a spec file")
    p.add_argument("--texts", default=None,
                   help="a .txt file or folder of your own texts (default: the bundled corpus, "
                        "held-out split); the texts not used for evaluation feed the Pearson "
                        "baseline")
    p.add_argument("--corr-texts", default=None,
                   help="texts for the Pearson baseline (default: the corpus' train split, or "
                        "the rest of --texts)")
    p.add_argument("--layers", default="6,12,18", help="target layers (default 6,12,18)")
    p.add_argument("--n-texts", type=int, default=35, help="evaluation texts (default 35)")
    p.add_argument("--tokens-per-text", type=int, default=5, help="sampled tokens per text")
    p.add_argument("--max-len", type=int, default=64, help="tokens kept per text (default 64)")
    p.add_argument("--max-pairs", type=int, default=None,
                   help="at most this many pairs over all layers (whole targets are dropped)")
    p.add_argument("--strategies", default=",".join(STRATEGIES),
                   help=f"comma list from {','.join(STRATEGIES)} (default: all)")
    p.add_argument("--r", default="0", help="rescale factor(s), e.g. 0 or 0,-1,0.5 (default 0)")
    p.add_argument("--corr-tokens", type=int, default=4096,
                   help="tokens for the Pearson correlations (default 4096)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="deactivation", help="output folder (default ./deactivation)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    add_model_args(p)
    p.set_defaults(func=run)


def _floats(text: str, what: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"{what}: expected comma-separated numbers, got {text!r}") from None


def _ints(text: str, what: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"{what}: expected comma-separated integers, got {text!r}") from None


def _texts(args, seed: int) -> tuple[list[str], list[str]]:
    import random

    from saeflow.corpus import load_texts
    def everything(path):  # a user's file: both splits
        return load_texts(path, split="train") + load_texts(path, split="heldout")

    if args.texts:
        texts = everything(args.texts)
        random.Random(seed).shuffle(texts)
        ev, rest = texts[:args.n_texts], texts[args.n_texts:]
    else:
        ev = load_texts(split="heldout")
        random.Random(seed).shuffle(ev)
        ev, rest = ev[:args.n_texts], []
    if args.corr_texts:
        rest = everything(args.corr_texts)
    elif not args.texts:
        rest = load_texts(split="train")
    random.Random(seed + 1).shuffle(rest)
    return ev, rest


def to_csv(rows, header) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    for r in rows:
        w.writerow([f"{v:.6g}" if isinstance(v, float) else v for v in r])
    return buf.getvalue()


def format_table(summary, layers) -> str:
    """One block per r: strategy rows; overall, per layer and per kind success / change (n)."""
    cell = {(s.strategy, s.r, s.layer, s.kind): s for s in summary}
    lines = []
    for r in sorted({s.r for s in summary}):
        cols = [("all", "all")] + [(str(L), "all") for L in layers] + \
               [("all", k) for k in ("res", "mlp", "att")]
        names = ["all"] + [f"L{L}" for L in layers] + ["res", "mlp", "att"]
        names.append("oracle, same pairs")
        lines.append(f"r = {r:g}: success rate / mean activation change (pairs); last column: "
                     f"the exhaustive oracle on the same targets and kinds")
        lines.append(f"{'strategy':<20}" + "".join(f"{n:>20}" for n in names))
        for strat in LABELS:
            if not any(k[0] == strat and k[1] == r for k in cell):
                continue
            parts = []
            for col in cols:
                c = cell.get((strat, r, *col))
                parts.append(f"{c.success_rate:>6.0%} / {c.mean_change:5.2f} ({c.n})"
                             if c else "-")
            c = cell[(strat, r, "all", "all")]
            parts.append("-" if c.oracle_success_rate != c.oracle_success_rate else
                         f"{c.oracle_success_rate:>6.0%} / {c.oracle_mean_change:5.2f}")
            lines.append(f"{LABELS[strat]:<20}" + "".join(f"{x:>20}" for x in parts))
        lines.append("")
    return "\n".join(lines)


def plot(summary, layers, out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    strategies = [s for s in LABELS if any(x.strategy == s for x in summary)]
    rs = sorted({s.r for s in summary})
    r0 = 0.0 if 0.0 in rs else rs[0]
    cell = {(s.strategy, s.r, s.layer, s.kind): s for s in summary}
    written = []
    kinds = ["all"] + [k for k in ("res", "mlp", "att") if any(x.kind == k for x in summary)]
    fig, axes = plt.subplots(1, len(kinds), figsize=(3.2 * len(kinds) + 1.6, 3.6), sharey=True,
                             squeeze=False)
    w = 0.8 / max(len(strategies), 1)
    for ax, kind in zip(axes[0], kinds):
        for i, strat in enumerate(strategies):
            ys = [getattr(cell.get((strat, r0, str(L), kind)), "success_rate", np.nan)
                  for L in layers]
            ax.bar(np.arange(len(layers)) + i * w, ys, w, label=LABELS[strat])
        ax.set_xticks(np.arange(len(layers)) + w * (len(strategies) - 1) / 2)
        ax.set_xticklabels([f"L{L}" for L in layers])
        ax.set_title("all kinds (pooled)" if kind == "all" else f"predecessor at {kind}",
                     fontsize=9)
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel(f"success rate (r = {r0:g})")
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    written.append(_save_fig(fig, out / "success_by_layer.png"))
    fig, axes = plt.subplots(1, len(kinds), figsize=(3.2 * len(kinds) + 1.6, 3.6), sharey=True,
                             squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        for strat in strategies:
            ax.plot(rs, [getattr(cell.get((strat, r, "all", kind)), "mean_change", np.nan)
                         for r in rs], marker="o", label=LABELS[strat])
        ax.set_title("all kinds (pooled)" if kind == "all" else f"predecessor at {kind}",
                     fontsize=9)
        ax.set_xlabel("r (predecessor -> r x activation)")
    axes[0][0].set_ylabel("mean activation change 1 - z_new/z_old")
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    written.append(_save_fig(fig, out / "change_vs_r.png"))
    plt.close("all")
    return written


def _save_fig(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    return path


def save_result(result, out: Path, plots: bool = True) -> list[Path]:
    from saeflow.deactivate import PairOutcome, SummaryRow
    from saeflow.suite import write_json_atomic

    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "summary.csv", to_csv(result.summary, SummaryRow._fields))
    write_text(out / "pairs.csv", to_csv(result.pairs, PairOutcome._fields))
    def clean(row):  # NaN (no oracle run) is not valid JSON: write null
        return {k: None if isinstance(v, float) and math.isnan(v) else v
                for k, v in row._asdict().items()}
    write_json_atomic(out / "summary.json", {"summary": [clean(r) for r in result.summary],
                                             "info": result.info})
    paths = [out / "summary.csv", out / "pairs.csv", out / "summary.json"]
    if plots and result.summary:
        paths += plot(result.summary, list(result.info["settings"]["layers"]), out)
    return paths


def run(args: argparse.Namespace) -> int:
    from saeflow.deactivate import DeactivationConfig, run_deactivation, tokenize_texts
    from saeflow.models import load_model
    from saeflow.suite import load_suite

    cfg = DeactivationConfig(layers=_ints(args.layers, "--layers"),
                             strategies=tuple(s.strip() for s in args.strategies.split(",")
                                              if s.strip()),
                             rs=_floats(args.r, "--r"), tokens_per_text=args.tokens_per_text,
                             max_len=args.max_len, max_pairs=args.max_pairs,
                             corr_tokens=args.corr_tokens, seed=args.seed)
    if args.n_texts < 1:
        raise ValueError(f"--n-texts must be >= 1, got {args.n_texts}")
    suite = load_suite(args.suite)
    if args.model:
        lm = load_model(args.model, device=args.device, dtype=args.dtype)
        suite.check_widths(lm)
    else:
        lm = suite.load_model(device=args.device, dtype=args.dtype)
    ev, rest = _texts(args, args.seed)
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
    out = Path(args.out)
    print(f"saeflow deactivate: {len(ids)} texts x {cfg.tokens_per_text} tokens, layers "
          f"{','.join(map(str, cfg.layers))}, strategies {','.join(cfg.strategies)}, "
          f"r {','.join(f'{r:g}' for r in cfg.rs)}")
    result = run_deactivation(lm, suite, ids, corr_ids, cfg, checkpoint_dir=out / "checkpoints")
    print(format_table(result.summary, cfg.layers))
    for L, info in result.info["layers"].items():
        for note in info["notes"]:
            print(f"note: {note}")
    for p in save_result(result, out, plots=not args.no_plots):
        print(f"wrote {p}")
    return 0
