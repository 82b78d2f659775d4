"""``saeflow match A B``: match the features of two SAEs, by top-k decoder cosine
(many-to-one) or by permutation (one-to-one)."""

from __future__ import annotations

import argparse
import sys

from saeflow.commands import add_model_args
from saeflow.match import DEFAULT_BLOCK


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
    p.add_argument("--solver", default="auto", choices=["auto", "dense", "sparse"],
                   help="permutation solver (auto: dense up to 20k features)")
    p.add_argument("--knn", type=int, default=16, help="sparse solver: neighbours per feature")
    p.add_argument("--block", type=int, default=DEFAULT_BLOCK,
                   help="tile size of the blocked matmul")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--out", default=None, help="write the matches as CSV to this file")
    add_model_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from saeflow.match import cosine_topk_pair, permutation_match
    from saeflow.recipes.match import open_pair, write_csv

    saes, dirs, names = open_pair(args.a, args.b, args.suite, args.model, args.permutation,
                                  args.device, args.dtype)
    if args.permutation:
        res = permutation_match(saes[0], saes[1], use_encoder=args.encoder, solver=args.solver,
                                knn=args.knn, block=args.block, precision=args.precision)
        ua = saes[0].unit_decoder()
        ub = saes[1].unit_decoder()[res.perm]
        cos = (ua * ub).sum(1)
        print(f"permutation {names[0]} -> {names[1]}: {len(res.perm)} pairs, solver {res.solver}, "
              f"{res.seconds:.1f} s; total squared distance {res.cost:.4g}; mean cosine "
              f"{res.mean_cos:.3f}; cosine > 0.5 for {(cos > 0.5).float().mean():.1%}")
        if args.out:
            write_csv(args.out, ["index_a", "index_b", "cos"],
                       ([i, int(j), f"{c:.6f}"] for i, (j, c) in enumerate(zip(res.perm, cos))))
        return 0
    assert dirs is not None  # (None only for --permutation)
    stats: dict = {}
    fwd, back = cosine_topk_pair(dirs[0], dirs[1], k=args.k, block=args.block,
                                 precision=args.precision, stats=stats)
    top = fwd.values[:, 0]
    mutual = (back.indices[fwd.indices[:, 0], 0] == torch.arange(len(top))).float().mean()
    q = torch.quantile(top, torch.tensor([0.1, 0.5, 0.9]))
    print(f"{names[0]} ({len(top)}) -> {names[1]} ({len(back.values)}): top-1 cosine "
          f"p10 {q[0]:.3f}, median {q[1]:.3f}, p90 {q[2]:.3f}; > 0.5 for "
          f"{(top > 0.5).float().mean():.1%}; mutual best {mutual:.1%} "
          f"[{stats.get('precision')}]", file=sys.stdout)
    if args.out:
        rows = ([i, r, int(fwd.indices[i, r]), f"{float(fwd.values[i, r]):.6f}"]
                for i in range(len(top)) for r in range(fwd.indices.shape[1]))
        write_csv(args.out, ["index_a", "rank", "index_b", "cos"], rows)
    return 0
