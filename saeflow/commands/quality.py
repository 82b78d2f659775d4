"""``saeflow quality SUITE``: FVU, L0, dead fraction and loss recovered per SAE."""

from __future__ import annotations

import argparse

from saeflow.commands import add_model_args, from_args
from saeflow.recipes.quality import QualityOptions


def add(subparsers) -> None:
    d = QualityOptions()
    p = subparsers.add_parser(
        "quality", help="evaluate every SAE of a suite on held-out text",
        description="Per SAE on held-out text: FVU, L0, dead fraction and LM loss recovered "
                    "(ablation: zeros for mlp/att, the mean residual for res), and the "
                    "convergence diagnostics from the weights (rows' cosine to their init, "
                    "cross-seed stability, adjacent-layer matching). Prints a table; "
                    "for a suite folder also updates suite.json, quality.csv and quality.png.")
    add_model_args(p, dtype_help="model weights dtype (default auto: bfloat16 on a GPU and on "
                                  "CPUs with fast bf16 products, float32 elsewhere, as "
                                  "saeflow train chooses)")
    p.set_defaults(func=run)
    p.add_argument("suite", help="a suite folder, spec file, preset or 'starter'")
    p.add_argument("--sites", default=None, help="only these sites (e.g. 0-3/res,12/mlp)")
    p.add_argument("--tokens", type=int, default=d.tokens,
                   help="held-out tokens for FVU, L0 and dead fraction (default %(default)s)")
    p.add_argument("--loss-tokens", type=int, default=d.loss_tokens,
                   help="held-out tokens for loss recovered (default %(default)s)")
    p.add_argument("--source", default=d.source, help="held-out text source (default: %(default)s)")
    p.add_argument("--res-ablation", default=d.res_ablation, choices=["mean", "zero"],
                   help="baseline for res sites in loss recovered (default %(default)s)")
    p.add_argument("--workers", type=int, default=d.workers,
                   help="worker threads (default %(default)s)")
    p.add_argument("--cached", action="store_true",
                   help="print the table stored in suite.json instead of recomputing it")
    p.add_argument("--no-save", action="store_true", help="do not write into the suite folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from saeflow import convergence, quality
    from saeflow.catalog import load_suite
    from saeflow.recipes.quality import run_quality, stored_quality
    suite = load_suite(args.suite, model=args.model)
    if args.cached:
        rows, report, saved = stored_quality(suite)
    else:
        from saeflow.compute import model_dtype
        dtype = model_dtype(args.dtype, args.device)
        lm = suite.load_model(device=args.device, dtype=dtype)
        rows, report, saved = run_quality(suite, lm, from_args(QualityOptions, args), args.sites,
                                          not args.no_save, dtype, not args.quiet)
    print(quality.format_table(rows))
    if report:
        print(convergence.format_report(report))
    if saved:
        print(f"saved: {saved}, quality.csv, quality.png")
    return 0
