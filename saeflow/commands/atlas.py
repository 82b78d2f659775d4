"""``saeflow atlas SUITE``: compute (or resume) a suite's flow atlas, print its lineage table
and write the atlas plot."""

from __future__ import annotations

import argparse
from pathlib import Path

from saeflow.commands import add_model_args, add_ray_arg, from_args
from saeflow.recipes.atlas import AtlasOptions


def add(subparsers) -> None:
    d = AtlasOptions()
    p = subparsers.add_parser(
        "atlas", help="match every feature across layers and classify its lineage",
        description="Data-free flow atlas of a suite: top-k decoder-cosine matches of each "
                    "residual feature against R_{L-1}, M_L and A_L, per-layer thresholds, lineage "
                    "classes and labels (what each feature fires on, from top activating contexts of the "
                    "bundled corpus, and the tokens it promotes). Resumes if interrupted.")
    p.add_argument("suite", help="'starter', a suite folder, a .json/.toml spec or a preset")
    p.add_argument("--out", default=None,
                   help="atlas folder (default: the cache, ~/.cache/saeflow/atlases/<suite name>)")
    p.add_argument("--thresholds", default=d.thresholds,
                   help="override the null rule: a number (all scores), res=0.5,mlp=0.2,att=0.2, "
                        "or a .json file with per-layer values {\"12\": 0.4, ...}")
    p.add_argument("--quantile", type=float, default=d.quantile,
                   help="quantile of the null that counts as high (default %(default)s)")
    p.add_argument("--null", default=d.null, choices=["gaussian", "rotation", "reference"],
                   help="the null distribution of scores (default %(default)s; reference needs "
                        "--null-suite)")
    p.add_argument("--min-cos", type=float, default=d.min_cos,
                   help="the minimum effect size: no threshold below this cosine (default "
                        "%(default)s)")
    p.add_argument("--null-suite", default=d.null_suite,
                   help="a suite with SAEs of the same residual sites trained with another seed "
                        "(the reference null)")
    p.add_argument("--calibrate", default=d.calibrate, metavar="DEACTIVATION",
                   help="thresholds calibrated on a deactivation run: the folder `saeflow "
                        "deactivate --out` wrote, or its pairs.csv")
    p.add_argument("--calibrate-level", type=float, default=d.calibrate_level,
                   help="the top-1 success rate the calibrated threshold reaches (default "
                        "%(default)s)")
    p.add_argument("--k", type=int, default=d.k, help="matches stored per feature (%(default)s)")
    p.add_argument("--block", type=int, default=d.block, help="tile size of the blocked matmul")
    p.add_argument("--precision", default=d.precision, choices=["auto", "bf16", "fp32"],
                   help="matmul precision for the shortlist (results are exact fp32 either way)")
    p.add_argument("--null-samples", type=int, default=d.null_samples,
                   help="features sampled per layer for the null distribution (%(default)s)")
    p.add_argument("--no-labels", action="store_true",
                   help="skip promoted-token labels (then no model is loaded unless att_z SAEs "
                        "need it)")
    p.add_argument("--no-contexts", action="store_true",
                   help="skip the top activating contexts behind the 'fires on' labels (then "
                        "features are labelled by the tokens they promote)")
    p.add_argument("--explanations", default=d.explanations, metavar="DIR",
                   help="label features with Neuronpedia's explanation exports under DIR (the "
                        "folder holding v1/{modelId}/{source}/explanations/); the suite must name "
                        "its Neuronpedia ids")
    p.add_argument("--plot", default=None, help="where to write the PNG (default OUT/lineage.png)")
    add_ray_arg(p, "layers' matching")
    add_model_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from saeflow.catalog import load_suite
    from saeflow.lineage import fraction_table
    from saeflow.recipes.atlas import atlas_model, build_atlas
    from saeflow.recipes.distribute import SuiteLoader

    opts = from_args(AtlasOptions, args, labels=not args.no_labels,
                     contexts=not args.no_contexts)
    suite = load_suite(args.suite, model=args.model)
    lm = atlas_model(suite, opts.labels, device=args.device, dtype=args.dtype)
    loader = SuiteLoader(args.suite, args.model, args.device, args.dtype, lm=None)
    atlas, seconds = build_atlas(suite, opts, lm, out=args.out, loader=loader)
    s = atlas.info["settings"]
    print(f"atlas of {suite.name} ({len(atlas.sites)} sites, layers {atlas.layers[0]}.."
          f"{atlas.layers[-1]}) in {atlas.root}  [{seconds:.1f} s; matching "
          f"{atlas.info['match_seconds']:.1f} s in {s['precision']}; k={s['k']}]")
    print(f"thresholds: {atlas.info['threshold_rule']}")
    print(fraction_table(atlas.class_fractions(), atlas.thresholds))
    plot = Path(args.plot) if args.plot else atlas.root / "lineage.png"
    atlas.plot(plot, title=f"Lineage of residual features: {suite.name}")
    print(f"plot: {plot}")
    return 0
