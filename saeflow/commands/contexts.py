"""``saeflow contexts ATLAS``: top activating corpus contexts of every feature, stored beside the
atlas (``contexts.safetensors``) for the viewer's feature pages and search. Resumes if
interrupted."""

from __future__ import annotations

import argparse
import time


def add(subparsers) -> None:
    from saeflow.cli import add_model_args

    p = subparsers.add_parser(
        "contexts", help="find each feature's top activating contexts in the corpus",
        description="Run the model over corpus text, encode every site with its SAE and keep "
                    "each feature's top-k sequences (at most one context per sequence, first "
                    "token skipped). Stored beside the atlas; an interrupted run resumes.")
    p.add_argument("atlas", metavar="ATLAS",
                   help="an atlas folder, or a suite whose atlas is in the cache")
    p.add_argument("--suite", default=None,
                   help="the suite whose SAEs are encoded (default: the atlas's own)")
    p.add_argument("--source", default="default",
                   help="corpus: default, wiki, bbc, or a path to .txt files (default: default)")
    p.add_argument("--tokens", type=int, default=65_536,
                   help="tokens to read (default 65,536; more finds rarer features)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (8)")
    p.add_argument("--top", type=int, default=8, help="contexts kept per feature (default 8)")
    p.add_argument("--sites", default=None,
                   help="comma-separated sites (e.g. 10-14/res,12/mlp); default: all the atlas's")
    p.add_argument("--seed", type=int, default=0, help="corpus shuffling seed (default 0)")
    add_model_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from saeflow.commands.view import resolve_atlas
    from saeflow.contexts import ContextSettings, Contexts, compute_contexts
    from saeflow.sites import parse_sites
    from saeflow.suite import load_suite

    atlas, suite = resolve_atlas(args.atlas)
    if args.suite:
        suite = load_suite(args.suite, model=args.model)
    elif suite is None:
        root = (atlas.info.get("suite") or {}).get("root")
        if not root or not Path(root).exists():
            raise FileNotFoundError(f"the atlas {atlas.root} names no suite folder on this "
                                    "machine; pass --suite")
        suite = load_suite(root, model=args.model)
    if args.model:
        suite.model = args.model
    sites = [s for s in atlas.sites if s in suite]
    if args.sites:
        wanted = parse_sites(args.sites, n_layers=max(atlas.layers) + 1)
        unknown = [str(s) for s in wanted if s not in sites]
        if unknown:
            raise ValueError(f"--sites: {', '.join(unknown)} not in both the atlas and the suite")
        sites = wanted
    if not sites:
        raise ValueError(f"the suite {suite.name!r} has none of the atlas's sites")
    settings = ContextSettings(source=args.source, n_tokens=args.tokens, seq_len=args.seq_len,
                               batch_size=args.batch_size, top_k=args.top, seed=args.seed)
    lm = suite.load_model(device=args.device, dtype=args.dtype)
    t0 = time.perf_counter()
    path = compute_contexts(lm, suite, atlas.root, settings, sites=sites)
    info = Contexts(path).info()
    print(f"contexts for {len(info['sites'])} sites from {info['n_sequences']} sequences of "
          f"{args.seq_len} tokens in {time.perf_counter() - t0:.1f} s -> {path}")
    return 0
