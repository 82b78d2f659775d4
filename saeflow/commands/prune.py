"""``saeflow prune SUITE``: layer pruning by SAE matching (Mechanistic Permutability, eq. 5):
explained variance and loss change when block u is replaced by an estimate from h_(u-1)."""

from __future__ import annotations

import argparse

from saeflow.commands import add_model_args


def add_text_args(p: argparse.ArgumentParser) -> None:
    """Held-out text options (``HeldoutConfig``), shared with ``saeflow permute``."""
    from saeflow.prune import HeldoutConfig as H
    p.add_argument("--source", default=H.source,
                   help="text: default, wiki, bbc (their held-out split) or a .txt file/folder")
    p.add_argument("--split", default=H.split, choices=["heldout", "train"],
                   help=f"corpus split to read (default {H.split})")
    p.add_argument("--n-seqs", type=int, default=H.n_seqs,
                   help=f"sequences of text (default {H.n_seqs})")
    p.add_argument("--seq-len", type=int, default=H.seq_len,
                   help=f"tokens per sequence (default {H.seq_len})")
    p.add_argument("--batch-size", type=int, default=H.batch_size,
                   help=f"sequences per forward pass (default {H.batch_size})")
    p.add_argument("--outlier-factor", type=float, default=H.outlier_factor,
                   help="tokens whose norm exceeds this x the batch median are not evaluated "
                        f"(default {H.outlier_factor:g})")


def add_permutation_args(p: argparse.ArgumentParser) -> None:
    """Matching options (``PermutationConfig``), shared with ``saeflow permute``."""
    from saeflow.permutation import OBJECTIVES
    from saeflow.permutation import PermutationConfig as P
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


def heldout_config(args):
    from saeflow.commands import from_args
    from saeflow.prune import HeldoutConfig
    return from_args(HeldoutConfig, args)


def permutation_config(args):
    from saeflow.commands import from_args
    from saeflow.permutation import PermutationConfig
    return from_args(PermutationConfig, args)


def add(subparsers) -> None:
    from saeflow.prune import METHODS

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
    p.add_argument("--methods", default=",".join(METHODS),
                   help="estimates to compare (default: all four)")
    p.add_argument("--no-loss", action="store_true",
                   help="explained variance only (no patched forward passes)")
    p.add_argument("--plot", default=None, help="PNG path (default OUT/<setting>/prune.png)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_permutation_args(p)
    add_text_args(p)
    add_model_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dataclasses import asdict
    from pathlib import Path

    from saeflow import prune
    from saeflow.permutation import PermutationStore
    from saeflow.catalog import load_suite

    text = heldout_config(args)
    store_cfg = permutation_config(args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in prune.METHODS]
    if bad or not methods:
        raise ValueError(f"--methods: unknown {bad}; known: {', '.join(prune.METHODS)}")
    suite = load_suite(args.suite, model=args.model)
    layers = prune.prunable_layers(suite, prune.parse_layers(args.layers))
    if not layers:
        raise ValueError(f"suite {suite.name!r} has no two consecutive residual SAEs to prune "
                         "between")
    store = PermutationStore(suite, store_cfg, args.out)
    lm = suite.load_model(device=args.device, dtype=args.dtype)
    batches = prune.text_batches(lm.tokenizer, text)
    needed = sorted({u - 1 for u in layers} | set(layers))
    data = prune.collect_states(lm, needed, batches, text.outlier_factor,
                                full=[] if args.no_loss else needed, progress=not args.quiet)
    rows = prune.run_pruning(lm, suite, store, layers, data, methods, not args.no_loss,
                             out=store.folder, settings={"text": asdict(text),
                                                          "model_dtype": args.dtype},
                             progress=not args.quiet)
    print(f"layer pruning on {suite.name} ({lm.name}): {len(data.states[layers[0]])} evaluated "
          f"tokens of {text.source}/{text.split}, permutations {store_cfg.tag}")
    print(prune.table(rows))
    prune.write_csv(rows, store.folder / "prune.csv")
    plot = Path(args.plot) if args.plot else store.folder / "prune.png"
    prune.plot(rows, plot, title=f"Layer pruning: {suite.name} ({store_cfg.tag})")
    print(f"saved: {store.folder / 'prune.json'}, prune.csv; plot: {plot}")
    return 0
