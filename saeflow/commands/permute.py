"""``saeflow permute SUITE``: permutations for every consecutive residual pair (and named
pairs), composition over spans, persistence over depth and the folding x objective ablation
(Mechanistic Permutability)."""

from __future__ import annotations

import argparse

from saeflow.commands import add_fields, from_args
from saeflow.configs import HeldoutConfig, PermutationConfig, PersistenceConfig


def add(subparsers) -> None:
    from saeflow.commands.prune import add_permutation_args
    C = PersistenceConfig
    p = subparsers.add_parser(
        "permute", help="one-to-one feature permutations over depth, composition, persistence",
        description="Permutation matching (LAP on folded weights) of every consecutive residual "
                    "pair and of --pairs, stored resumably with the folded MSE per pair. "
                    "--spans compares direct and composed permutations; --persistence follows "
                    "features along composed permutations on held-out text (co-activation and a "
                    "context-embedding proxy); --ablation compares folding x objective.")
    p.add_argument("suite", help="'starter', a suite folder, a .json/.toml spec or a preset")
    p.add_argument("--pairs", default=None,
                   help="extra pairs A:B of equal-width sites, e.g. 3/res:7/res,12/mlp:13/mlp")
    p.add_argument("--no-consecutive", action="store_true",
                   help="only the --pairs (and what --spans/--persistence need)")
    p.add_argument("--spans", default=None,
                   help="start layers for composition, e.g. 5,10,15: direct vs composed "
                        "permutation to each later layer up to --max-distance")
    p.add_argument("--persistence", action="store_true",
                   help="persistence over depth on held-out text (loads the model)")
    p.add_argument("--starts", default=None,
                   help="persistence start layers (default: four spread over depth)")
    add_fields(p, C, {"max_distance": "longest span in layers",
                      "n_features": "persistence: features sampled per start",
                      "top_k": "persistence: top contexts per feature embedded",
                      "level": "persistence: the half distance is where the excess over chance "
                               "falls below this fraction of its value at distance 1",
                      "judge_pairs": "persistence: pairs judged per start and distance"})
    p.add_argument("--no-semantic", dest="semantic", action="store_false",
                   help="persistence: co-activation only (no sentence embeddings)")
    p.add_argument("--judge-url", default=None,
                   help="persistence: OpenAI-compatible endpoint of an optional LLM judge of "
                        "matched pairs (API key from $SAEFLOW_JUDGE_API_KEY if set)")
    p.add_argument("--judge-model", default=None, help="persistence: the judge's model name")
    p.add_argument("--ablation", default=None, metavar="LAYERS",
                   help="folding x objective ablation on the pairs (u-1, u) for these u, e.g. "
                        "5,10,15,20 (loads the model)")
    add_permutation_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from saeflow.catalog import load_suite
    from saeflow.prune import parse_layers
    from saeflow.recipes.permutation import PermuteRun, run_permute
    spans, starts, ablation = (tuple(parse_layers(getattr(args, name), "--" + name))
                               for name in ("spans", "starts", "ablation"))
    persistence = from_args(PersistenceConfig, args, starts=starts) if args.persistence else None
    run = PermuteRun(args.pairs, not args.no_consecutive, spans, persistence, ablation,
                     args.judge_url, args.judge_model, from_args(HeldoutConfig, args))
    cfg = from_args(PermutationConfig, args)
    run_permute(load_suite(args.suite, model=args.model), cfg, run, args.out, args.max_distance,
                args.device, args.dtype, not args.quiet)
    return 0
