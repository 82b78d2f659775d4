"""``saeflow contexts ATLAS``: top activating corpus contexts of every feature, stored beside the
atlas (``contexts.safetensors``) for the viewer's feature pages and search. Resumes if
interrupted."""

from __future__ import annotations

import argparse

from saeflow.commands import add_fields, add_model_args, from_args
from saeflow.configs import ContextSettings


def add(subparsers) -> None:
    d = ContextSettings()
    p = subparsers.add_parser(
        "contexts", help="find each feature's top activating contexts in the corpus",
        description="Run the model over corpus text, encode every site with its SAE and keep "
                    "each feature's top-k sequences (at most one context per sequence, first "
                    "token skipped). Stored beside the atlas; an interrupted run resumes.")
    p.add_argument("atlas", metavar="ATLAS",
                   help="an atlas folder, or a suite whose atlas is in the cache")
    p.add_argument("--suite", default=None,
                   help="the suite whose SAEs are encoded (default: the atlas's own)")
    p.add_argument("--source", default=d.source,
                   help="corpus: default, wiki, bbc, or a path to .txt files (default: default)")
    add_fields(p, ContextSettings, {
        "n_tokens": ("--tokens", "tokens to read (more finds rarer features)"),
        "seq_len": "tokens per sequence", "batch_size": "sequences per forward pass",
        "top_k": ("--top", "contexts kept per feature"), "seed": "corpus shuffling seed"})
    p.add_argument("--sites", default=None,
                   help="comma-separated sites (e.g. 10-14/res,12/mlp); default: all the atlas's")
    add_model_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from saeflow.recipes.contexts import run_contexts
    done = run_contexts(args.atlas, from_args(ContextSettings, args), args.suite, args.model,
                        args.sites, args.device, args.dtype)
    print(f"contexts for {len(done.info['sites'])} sites from {done.info['n_sequences']} "
          f"sequences of {args.seq_len} tokens in {done.seconds:.1f} s -> {done.path}")
    return 0
