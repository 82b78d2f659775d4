"""``saeflow quality SUITE``: FVU, L0, dead fraction and loss recovered per SAE."""

from __future__ import annotations

import argparse

from saeflow.commands import add_model_args


def add(subparsers) -> None:
    p = subparsers.add_parser(
        "quality", help="evaluate every SAE of a suite on held-out text",
        description="Per SAE on held-out text: FVU, L0, dead fraction and LM loss recovered "
                    "(ablation: zeros for mlp/att, the mean residual for res), and the "
                    "convergence diagnostics from the weights (rows' cosine to their init, "
                    "cross-seed stability, adjacent-layer matching). Prints a table; "
                    "for a suite folder also updates suite.json, quality.csv and quality.png.")
    add_model_args(p)
    p.set_defaults(dtype="bfloat16", func=run)
    p.add_argument("suite", help="a suite folder, spec file, preset or 'starter'")
    p.add_argument("--sites", default=None, help="only these sites (e.g. 0-3/res,12/mlp)")
    p.add_argument("--tokens", type=int, default=8192,
                   help="held-out tokens for FVU, L0 and dead fraction (default 8192)")
    p.add_argument("--loss-tokens", type=int, default=2048,
                   help="held-out tokens for loss recovered (default 2048)")
    p.add_argument("--source", default="default", help="held-out text source (default: default)")
    p.add_argument("--res-ablation", default="mean", choices=["mean", "zero"],
                   help="baseline for res sites in loss recovered (default mean)")
    p.add_argument("--workers", type=int, default=2, help="worker threads (default 2)")
    p.add_argument("--cached", action="store_true",
                   help="print the table stored in suite.json instead of recomputing it")
    p.add_argument("--no-save", action="store_true", help="do not write into the suite folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from saeflow import convergence, quality
    from saeflow.catalog import load_suite
    from saeflow.recipes.quality import quality_sites, store_quality
    suite = load_suite(args.suite, model=args.model)
    if args.cached:
        rows = quality.rows_from_json(suite.info.get("quality") or [])
        if not rows:
            raise ValueError(f"suite {suite.name!r} has no stored quality table; run without "
                             "--cached to compute it")
        print(quality.format_table(rows))
        if suite.info.get("convergence"):
            print(convergence.format_report(suite.info["convergence"]))
        return 0
    lm = suite.load_model(device=args.device, dtype=args.dtype)
    sites = quality_sites(suite, args.sites, lm.n_layers)
    rows = quality.evaluate(lm, {s: suite[s] for s in sites}, source=args.source,
                            tokens=args.tokens, loss_tokens=args.loss_tokens,
                            res_ablation=args.res_ablation, workers=args.workers,
                            progress=not args.quiet)
    print(quality.format_table(rows))
    if not args.sites:
        print(convergence.format_report(convergence.for_suite(suite)))
    settings = {"tokens": args.tokens, "loss_tokens": args.loss_tokens, "source": args.source,
                "res_ablation": args.res_ablation, "model_dtype": args.dtype}
    saved = None if args.no_save else store_quality(
        suite, rows, settings, f"{suite.name} ({lm.name})", merge=bool(args.sites))
    if saved:
        print(f"saved: {saved}, quality.csv, quality.png")
    return 0
