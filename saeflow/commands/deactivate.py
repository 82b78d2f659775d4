"""``saeflow deactivate SUITE``: causal validation of the data-free matches (method.md sec. 5).

Writes to ``--out`` (atomically): ``summary.csv`` and ``summary.json`` (success rate and mean
activation change per strategy, r, layer and predecessor kind, with counts, plus the run's
settings and notes), ``pairs.csv`` (every pair), ``success_by_layer.png`` and
``change_vs_r.png``; finished layers are kept in ``checkpoints/`` so an interrupted run resumes.
"""

from __future__ import annotations

import argparse

from saeflow.commands import add_model_args, add_ray_arg, joined, numbers
from saeflow.configs import STRATEGIES, DeactivationConfig
from saeflow.recipes.deactivation import DeactivationRun


def add(subparsers) -> None:
    d, r = DeactivationConfig(), DeactivationRun()
    p = subparsers.add_parser(
        "deactivate", help="check that matched predecessors feed their targets (deactivation)",
        description="Deactivate the matched predecessors of active residual features, one token "
                    "at a time, and measure how often the target feature turns off.")
    p.add_argument("suite", help="a suite: 'starter', a folder or a spec file")
    p.add_argument("--texts", default=r.texts,
                   help="a .txt file or folder of your own texts (default: the bundled corpus, "
                        "held-out split); the texts not used for evaluation feed the Pearson "
                        "baseline")
    p.add_argument("--corr-texts", default=r.corr_texts,
                   help="texts for the Pearson baseline (default: the corpus' train split, or "
                        "the rest of --texts)")
    p.add_argument("--layers", default=joined(d.layers),
                   help="target layers (default %(default)s)")
    p.add_argument("--n-texts", type=int, default=r.n_texts,
                   help="evaluation texts (default %(default)s)")
    p.add_argument("--tokens-per-text", type=int, default=d.tokens_per_text,
                   help="sampled tokens per text")
    p.add_argument("--max-len", type=int, default=d.max_len,
                   help="tokens kept per text (default %(default)s)")
    p.add_argument("--max-pairs", type=int, default=d.max_pairs,
                   help="at most this many pairs over all layers (whole targets are dropped)")
    p.add_argument("--strategies", default=",".join(d.strategies),
                   help=f"comma list from {','.join(STRATEGIES)} (default: all)")
    p.add_argument("--r", default=joined(d.rs),
                   help="rescale factor(s), e.g. 0 or 0,-1,0.5 (default %(default)s)")
    p.add_argument("--corr-tokens", type=int, default=d.corr_tokens,
                   help="tokens for the Pearson correlations (default %(default)s; fewer than "
                        "100,000 are reported as underpowered)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", default=r.out, help="output folder (default ./%(default)s)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    add_ray_arg(p, "block re-runs of each layer")
    p.add_argument("--ray-units", type=int, default=r.ray_units,
                   help="Ray units per layer: its batches of block re-runs dealt among them "
                        "(default %(default)s)")
    add_model_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from saeflow.catalog import open_suite
    from saeflow.recipes.deactivation import (format_table, run_deactivation_check,
                                              save_deactivation)
    from saeflow.recipes.distribute import SuiteLoader

    cfg = DeactivationConfig(layers=numbers(args.layers, "--layers", int),
                             strategies=tuple(s.strip() for s in args.strategies.split(",")
                                              if s.strip()),
                             rs=numbers(args.r, "--r"), tokens_per_text=args.tokens_per_text,
                             max_len=args.max_len, max_pairs=args.max_pairs,
                             corr_tokens=args.corr_tokens, seed=args.seed)
    run = DeactivationRun(cfg, texts=args.texts, corr_texts=args.corr_texts,
                          n_texts=args.n_texts, out=args.out, plots=not args.no_plots,
                          ray=args.ray, ray_units=args.ray_units)
    suite, lm = open_suite(args.suite, args.model, args.device, args.dtype)
    result = run_deactivation_check(run, suite, lm, loader=SuiteLoader(
        args.suite, args.model, args.device, args.dtype))
    print(format_table(result.summary, cfg.layers, result.info))
    for info in result.info["layers"].values():
        for note in info["notes"]:
            print(f"note: {note}")
    for p in save_deactivation(result, Path(run.out), plots=run.plots):
        print(f"wrote {p}")
    return 0
