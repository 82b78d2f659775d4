"""``saeflow prune SUITE``: layer pruning by SAE matching (Mechanistic Permutability, eq. 5):
explained variance and loss change when block u is replaced by an estimate from h_(u-1)."""

from __future__ import annotations

import argparse

from saeflow.commands import add_fields, add_model_args, from_args
from saeflow.configs import OBJECTIVES, PRUNE_METHODS, HeldoutConfig, PermutationConfig


def add_text_args(p: argparse.ArgumentParser) -> None:
    """Held-out text options (``HeldoutConfig``), shared with ``saeflow permute``."""
    H = HeldoutConfig
    p.add_argument("--source", default=H.source,
                   help="text: default, wiki, bbc (their held-out split) or a .txt file/folder")
    p.add_argument("--split", default=H.split, choices=["heldout", "train"],
                   help=f"corpus split to read (default {H.split})")
    add_fields(p, H, {"n_seqs": "sequences of text", "seq_len": "tokens per sequence",
                      "batch_size": "sequences per forward pass",
                      "outlier_factor": "tokens whose norm exceeds this x the batch median are "
                                        "not evaluated"})


def add_permutation_args(p: argparse.ArgumentParser) -> None:
    """Matching options (``PermutationConfig``), shared with ``saeflow permute``."""
    P = PermutationConfig
    p.add_argument("--objective", default=P.objective, choices=OBJECTIVES,
                   help=f"what is matched: decoder rows, encoder columns or both (default "
                        f"{P.objective})")
    p.add_argument("--no-fold", dest="fold", action="store_false",
                   help="match unfolded weights (JumpReLU thresholds not folded in)")
    p.add_argument("--solver", default=P.solver, choices=["auto", "dense", "sparse"],
                   help=f"assignment solver (auto: dense up to {P.dense_limit:,} features)")
    p.add_argument("--knn", type=int, default=P.knn,
                   help=f"sparse solver: neighbours per feature (default {P.knn})")
    p.add_argument("--out", default=None,
                   help="permutation folder (default ~/.cache/saeflow/permutations/<suite name>)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_text_args(p)
    add_model_args(p)


def add(subparsers) -> None:
    p = subparsers.add_parser(
        "prune", help="layer pruning: replace a block by encode -> permute -> decode",
        description="For each pruned layer u: the estimate of h_u from h_(u-1) by the stored "
                    "permutation (encode with SAE u-1, permute, decode with SAE u), the top-1 "
                    "cosine mapping, the SAE u-1 reconstruction and skipping the block; "
                    "explained variance and delta L (nats) on held-out text. Resumes per layer.")
    p.add_argument("suite", help="'starter', a suite folder, a .json/.toml spec or a preset")
    p.add_argument("--layers", default=None,
                   help="pruned layers u, e.g. 1-29 or 5,10,15 (default: every layer with "
                        "residual SAEs at u-1 and u)")
    p.add_argument("--methods", default=",".join(PRUNE_METHODS),
                   help="estimates to compare (default: all four)")
    p.add_argument("--no-loss", action="store_true",
                   help="explained variance only (no patched forward passes)")
    p.add_argument("--plot", default=None, help="PNG path (default OUT/<setting>/prune.png)")
    add_permutation_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from saeflow.catalog import load_suite
    from saeflow.recipes.permutation import run_prune
    text, cfg = from_args(HeldoutConfig, args), from_args(PermutationConfig, args)
    run_prune(load_suite(args.suite, model=args.model), cfg, text, args.layers, args.methods,
              not args.no_loss, args.out, args.plot, args.device, args.dtype, not args.quiet)
    return 0
