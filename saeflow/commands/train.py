"""``saeflow train``: train a suite of TopK SAEs (by default the SmolLM2 starter suite)."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json

from saeflow.commands import add_model_args


def add(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train TopK SAEs at many sites while streaming text through the model",
        description="Train one TopK SAE per site (streaming, no activation cache). With no "
                    "options: the SmolLM2 starter suite (all 30 layers x res, mlp, att), cached "
                    "and reused. Interrupted runs resume from their last checkpoint.")
    add_model_args(p)
    p.set_defaults(dtype="bfloat16", func=run)
    from saeflow.trainconfig import PROFILES, STARTER_CONFIG as c
    p.add_argument("--profile", default="starter", choices=list(PROFILES),
                   help="a named budget: " + "; ".join(f"{n}: {pr.config.tokens:,} tokens, "
                                                       f"{pr.about}" for n, pr in PROFILES.items())
                   + " (default starter); the options below change it")
    p.add_argument("--sites", default="all",
                   help="sites to train: all, */res, 0-3/res,0-3/mlp, 12/att ... (default all)")
    p.add_argument("--tokens", type=int, default=None,
                   help=f"training tokens (starter: {c.tokens:,})")
    p.add_argument("--width", type=int, default=None, help=f"latents per SAE ({c.width})")
    p.add_argument("--k", type=int, default=None, help=f"active latents per token ({c.k})")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"tokens per model forward, rounded to whole sequences ({c.batch_tokens})")
    p.add_argument("--sae-batch", type=int, default=None,
                   help=f"rows per SAE Adam step (starter: {c.sae_batch})")
    p.add_argument("--reuse", type=float, default=None,
                   help=f"times each token is used on average (starter: {c.reuse:g})")
    p.add_argument("--buffer-tokens", type=int, default=None,
                   help=f"per-site shuffle buffer in tokens; 0: one step per forward on its own "
                        f"rows (starter: {c.buffer_tokens})")
    p.add_argument("--seed-sites", default=None,
                   help=f"sites trained a second time with another seed, for the cross-seed "
                        f"stability diagnostic ('' for none; starter: {c.seed_sites})")
    p.add_argument("--lr", type=float, default=None, help=f"Adam learning rate ({c.lr:g})")
    p.add_argument("--seq-len", type=int, default=None,
                   help=f"packed sequence length ({c.seq_len})")
    p.add_argument("--source", default=None,
                   help="text: default (Wikipedia + BBC), wiki, bbc, or a .txt file/folder")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--workers", type=int, default=None, help=f"worker threads ({c.workers})")
    p.add_argument("--checkpoint-every", type=int, default=None,
                   help="model forwards between checkpoints")
    p.add_argument("--eval-tokens", type=int, default=None,
                   help=f"held-out tokens for the quality table (0 skips it; {c.eval_tokens})")
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


_FLAGS = {"tokens": "tokens", "width": "width", "k": "k", "batch_size": "batch_tokens",
          "sae_batch": "sae_batch", "reuse": "reuse", "buffer_tokens": "buffer_tokens",
          "seed_sites": "seed_sites", "lr": "lr", "seq_len": "seq_len", "source": "source", "seed": "seed",
          "workers": "workers", "checkpoint_every": "checkpoint_every",
          "eval_tokens": "eval_tokens"}


def _default_out(model: str, sites: str, cfg, prof):
    """The profile's folder for the profile's settings, else a cache folder named after them."""
    from saeflow.models import cache_dir
    from saeflow.trainconfig import RESULT_FIELDS
    same = all(getattr(cfg, f) == getattr(prof.config, f) for f in RESULT_FIELDS)
    if model == prof.model and sites == prof.sites and same:
        return prof.folder
    key = json.dumps({"model": model, "sites": sites,
                      **{f: getattr(cfg, f) for f in RESULT_FIELDS}}, sort_keys=True)
    tag = hashlib.sha1(key.encode()).hexdigest()[:8]
    model_tag = "".join(c if c.isalnum() else "_" for c in model.split("/")[-1])[:32]
    return cache_dir() / "suites" / f"{model_tag}-w{cfg.width}-k{cfg.k}-{tag}"


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from saeflow import quality
    from saeflow.sites import parse_sites
    from saeflow.train import (CHECKPOINT, TRAINED, discard_run, ensure_trained, is_complete,
                               profile)
    prof = profile(args.profile)
    changes = {field: getattr(args, flag) for flag, field in _FLAGS.items()
               if getattr(args, flag) is not None}
    cfg = dataclasses.replace(prof.config, **changes)
    model = args.model or prof.model
    device = prof.device if args.device == "cpu" else args.device
    parse_sites(args.sites, 10**6)  # syntax check before loading anything
    out = Path(args.out).expanduser() if args.out else _default_out(model, args.sites, cfg, prof)
    reused = is_complete(out)
    if reused:
        print(f"saeflow train: {out} already holds a trained suite (delete it or pick another "
              "--out to train again)")
    else:
        if args.restart:
            discard_run(out)
        elif args.resume and not ((out / CHECKPOINT).exists() or (out / TRAINED).exists()):
            raise FileNotFoundError(f"--resume: no interrupted run in {out} "
                                    f"(no {CHECKPOINT}); drop --resume to start one")
        print(f"saeflow train: {args.sites} of {model} -> {out}\n  settings: "
              + ", ".join(f"{f.name}={getattr(cfg, f.name)}" for f in dataclasses.fields(cfg)))
        ensure_trained(out, args.sites, cfg, model, device=device, dtype=args.dtype,
                       name=out.name, progress=not args.quiet)
    info = json.loads((out / "suite.json").read_text())
    rows = quality.rows_from_json(info.get("quality") or [])
    if rows and (reused or args.quiet):  # a fresh run printed its table already
        print(quality.format_table(rows) if not args.quiet else
              "\n".join(f"{k}: " + ", ".join(f"{m}={v:.3f}" for m, v in s.items())
                        for k, s in quality.summarize(rows).items()))
    t = info.get("training", {})
    if t.get("wall_seconds"):
        print(f"trained {t.get('tokens_trained', 0):,} tokens in {t['wall_seconds']:.0f} s "
              f"({t.get('tokens_per_second', 0):.0f} tok/s, {t.get('cpu_seconds', 0):.0f} "
              f"CPU-seconds); suite: {out}")
    else:
        print(f"suite: {out}")
    return 0
