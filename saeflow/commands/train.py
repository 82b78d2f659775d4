"""``saeflow train``: train a suite of TopK SAEs (by default the SmolLM2 starter suite)."""

from __future__ import annotations

import argparse

from saeflow.commands import add_model_args

# option -> (TrainConfig field, type, help with the starter's value); unset: the profile's value
_OPTIONS = {
    "tokens": ("tokens", int, "training tokens (starter: {:,})"),
    "width": ("width", int, "latents per SAE ({})"),
    "k": ("k", int, "active latents per token ({})"),
    "batch_size": ("batch_tokens", int, "tokens per model forward, rounded to whole sequences "
                   "({})"),
    "sae_batch": ("sae_batch", int, "rows per SAE Adam step (starter: {})"),
    "reuse": ("reuse", float, "times each token is used on average (starter: {:g})"),
    "buffer_tokens": ("buffer_tokens", int, "per-site shuffle buffer in tokens; 0: one step per "
                      "forward on its own rows (starter: {})"),
    "seed_sites": ("seed_sites", str, "sites trained a second time with another seed, for the "
                   "cross-seed stability diagnostic ('' for none; starter: {})"),
    "lr": ("lr", float, "Adam learning rate ({:g})"),
    "seq_len": ("seq_len", int, "packed sequence length ({})"),
    "source": ("source", str, "text: default (Wikipedia + BBC), wiki, bbc, or a .txt file/folder"),
    "seed": ("seed", int, None),
    "workers": ("workers", int, "worker threads ({})"),
    "kernels": ("kernels", str, "SAE step: auto (compiled when numba is installed and the "
                "device is the CPU), numba, or torch ({})"),
    "checkpoint_every": ("checkpoint_every", int, "model forwards between checkpoints ({})"),
    "checkpoint_minutes": ("checkpoint_minutes", float, "and at least this many minutes of "
                           "training since the last one (0: forwards alone; {:g})"),
    "eval_tokens": ("eval_tokens", int, "held-out tokens for the quality table (0 skips it; {})"),
}


def add(subparsers) -> None:
    from saeflow.trainconfig import PROFILES, STARTER_CONFIG
    p = subparsers.add_parser(
        "train", help="train TopK SAEs at many sites while streaming text through the model",
        description="Train one TopK SAE per site (streaming, no activation cache). With no "
                    "options: the SmolLM2 starter suite (all 30 layers x res, mlp, att), cached "
                    "and reused. Interrupted runs resume from their last checkpoint.")
    add_model_args(p, dtype_help="dtype of the model whose activations the SAEs learn (default "
                                  "auto: bfloat16 on a GPU and on CPUs with fast bf16 products, "
                                  "float32 elsewhere; suite.json records it)")
    p.set_defaults(func=run)
    p.add_argument("--profile", default="starter", choices=list(PROFILES),
                   help="a named budget: " + "; ".join(f"{n}: {pr.config.tokens:,} tokens, "
                                                       f"{pr.about}" for n, pr in PROFILES.items())
                   + " (default starter); the options below change it")
    p.add_argument("--sites", default="all",
                   help="sites to train: all, */res, 0-3/res,0-3/mlp, 12/att ... (default all)")
    for option, (name, kind, text) in _OPTIONS.items():
        p.add_argument("--" + option.replace("_", "-"), type=kind, default=None,
                       help=text and text.format(getattr(STARTER_CONFIG, name)))
    p.add_argument("--out", default=None,
                   help="output folder (default: the profile's cache folder, or a cache "
                        "folder named after the settings)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true",
                   help="require an interrupted run in the output folder and continue it "
                        "(continuing is also what happens without this flag)")
    g.add_argument("--restart", action="store_true",
                   help="discard an interrupted run in the output folder and start over")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from saeflow import quality
    from saeflow.recipes.training import train
    changes = {name: getattr(args, option) for option, (name, _, _) in _OPTIONS.items()
               if getattr(args, option) is not None}
    done = train(args.profile, args.sites, changes, args.model, args.device, args.dtype, args.out,
                 args.resume, args.restart, progress=not args.quiet)
    rows = quality.rows_from_json(done.info.get("quality") or [])
    if rows and (done.reused or args.quiet):  # a fresh run printed its table already
        print(quality.format_table(rows) if not args.quiet else
              "\n".join(f"{k}: " + ", ".join(f"{m}={v:.3f}" for m, v in s.items())
                        for k, s in quality.summarize(rows).items()))
    t = done.info.get("training", {})
    if t.get("wall_seconds"):
        print(f"trained {t.get('tokens_trained', 0):,} tokens in {t['wall_seconds']:.0f} s "
              f"({t.get('tokens_per_second', 0):.0f} tok/s, {t.get('cpu_seconds', 0):.0f} "
              f"CPU-seconds); suite: {done.folder}")
    else:
        print(f"suite: {done.folder}")
    return 0
