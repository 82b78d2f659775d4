"""``saeflow match A B``: match the features of two SAEs, by top-k decoder cosine
(many-to-one) or by permutation (one-to-one)."""

from __future__ import annotations

import argparse

from saeflow.commands import add_model_args
from saeflow.configs import DEFAULT_BLOCK, PermutationConfig


def add(subparsers) -> None:
    p = subparsers.add_parser(
        "match", help="match the features of two SAEs (cosine top-k or permutation)",
        description="Data-free matching of two SAEs: for each feature of A its top-k decoder "
                    "cosine matches in B, or (--permutation) a one-to-one assignment minimising "
                    "the squared distance of folded decoder rows.")
    p.add_argument("a", help="an SAE folder, or a site of --suite (e.g. 11/res)")
    p.add_argument("b", help="an SAE folder, or a site of --suite (e.g. 12/res)")
    p.add_argument("--suite", default=None, help="read A and B as sites of this suite")
    p.add_argument("--k", type=int, default=1, help="matches per feature of A (default 1)")
    p.add_argument("--permutation", action="store_true", help="one-to-one matching (LAP)")
    p.add_argument("--encoder", action="store_true",
                   help="permutation: add the encoder columns to the cost")
    P = PermutationConfig
    p.add_argument("--solver", default=P.solver, choices=["auto", "dense", "sparse"],
                   help=f"permutation solver (auto: dense up to {P.dense_limit:,} features)")
    p.add_argument("--knn", type=int, default=P.knn, help="sparse solver: neighbours per feature")
    p.add_argument("--block", type=int, default=DEFAULT_BLOCK,
                   help="tile size of the blocked matmul")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--out", default=None, help="write the matches as CSV to this file")
    add_model_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from saeflow.recipes.match import match_pair
    print(match_pair(args.a, args.b, args.suite, args.model, permutation=args.permutation,
                     k=args.k, encoder=args.encoder, solver=args.solver, knn=args.knn,
                     block=args.block, precision=args.precision, out=args.out,
                     device=args.device, dtype=args.dtype))
    return 0
