"""``saeflow steer SUITE --prompt ... (--feature F | --theme T | --plan FILE | --graph FILE)``:
generate unsteered and steered continuations side by side, with the same random seed."""

from __future__ import annotations

import shutil
import textwrap
from itertools import zip_longest


def add_plan_args(p) -> None:
    """Options that shape a steering plan (shared with ``steer-eval``)."""
    p.add_argument("--schedule", default="constant", choices=["constant", "exponential", "linear"],
                   help="coefficient over layers: constant s, s*exp(alpha*l), or linear from s at "
                        "the first steered layer to --end-coefficient at the last")
    p.add_argument("--alpha", type=float, default=-0.05, help="exponential schedule rate (-0.05)")
    p.add_argument("--end-coefficient", type=float, default=None, help="linear schedule end value")
    p.add_argument("--action", default="activate", choices=["activate", "suppress"],
                   help="activate: add s*v; suppress: h + (r-1)*a*v with r the coefficient")
    p.add_argument("--magnitude", default="res_norm",
                   choices=["res_norm", "activation", "theta", "none"],
                   help="per-feature scale of v: res_norm (default; s is a fraction of the layer's "
                        "typical residual norm), activation (typical firing level), theta "
                        "(JumpReLU threshold), none (raw decoder row)")
    p.add_argument("--site", default=None,
                   help="site where --theme looks for features (default: middle residual site)")
    p.add_argument("--atlas", default=None,
                   help="atlas folder for flow graphs and labels (default: the suite's cached "
                        "atlas, computed if missing)")
    p.add_argument("--res-threshold", type=float, default=0.5,
                   help="flow graph: stop the residual chain below this cosine (0.5)")
    p.add_argument("--block-threshold", type=float, default=0.15,
                   help="flow graph: drop MLP/attention nodes below this cosine (0.15)")
    p.add_argument("--children", action="store_true",
                   help="flow graph: also follow every later feature whose top-1 predecessor is "
                        "on the chain (off: one top-1 residual chain, as steering wants)")
    p.add_argument("--source", default="default",
                   help="corpus for theme retrieval and magnitudes (default, wiki, bbc, or a path)")
    p.add_argument("--examples", default=None,
                   help="a .txt file of theme examples (paragraphs separated by blank lines)")


def add(subparsers) -> None:
    from saeflow.cli import add_model_args
    p = subparsers.add_parser(
        "steer", help="steer generation with features, a theme's flow graph or a plan file",
        description="Generate unsteered and steered continuations side by side (same seed). "
                    "A plan comes from --plan, from a flow graph (--graph, or traced from "
                    "--feature/--theme in the atlas) in --mode single or cumulative, or from the "
                    "listed features alone (--mode features).")
    p.add_argument("suite", metavar="SUITE",
                   help="suite folder or spec file, 'starter', or a preset")
    p.add_argument("--prompt", action="append", required=True, help="prompt (repeatable)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--feature", action="append", help="seed feature such as 12/res/4111 "
                     "(repeatable with --mode features)")
    src.add_argument("--theme", help="a theme description; its top feature seeds the graph")
    src.add_argument("--plan", help="a steering plan JSON file")
    src.add_argument("--graph", help="a flow graph JSON file (from saeflow graph)")
    p.add_argument("--mode", default="cumulative", choices=["cumulative", "single", "features"],
                   help="cumulative: graph features at layers <= --layer; single: at --layer only; "
                        "features: only the given features (no graph)")
    p.add_argument("--layer", type=int, default=None, help="steering layer (default: the seed's)")
    p.add_argument("--coefficient", type=float, default=0.2, help="s, or r when suppressing (0.2)")
    add_plan_args(p)
    p.add_argument("--max-new-tokens", type=int, default=36)
    p.add_argument("--samples", type=int, default=1, help="continuations per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=1.27)
    p.add_argument("--top-p", type=float, default=0.7)
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    p.add_argument("--save-plan", default=None, help="write the plan used to this JSON file")
    add_model_args(p)
    p.set_defaults(func=run)


def open_suite(args):
    """The suite and its model, from the common arguments."""
    from saeflow.suite import load_suite
    suite = load_suite(args.suite, model=args.model)
    lm = suite.load_model(device=args.device, dtype=args.dtype)
    return suite, lm


def open_atlas(args, suite, lm):
    from saeflow import atlas as atlas_mod
    if args.atlas:
        return atlas_mod.Atlas.load(args.atlas)
    return atlas_mod.ensure_atlas(suite, lm)


def read_examples(path: str | None) -> list[str] | None:
    if not path:
        return None
    from pathlib import Path
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--examples {path}: no such file")
    paras = [" ".join(b.split()) for b in p.read_text().split("\n\n") if b.strip()]
    if not paras:
        raise ValueError(f"--examples {path}: no paragraphs found")
    return paras


def magnitude_texts(source: str, n: int = 32, seed: int = 0) -> list[str]:
    """A fixed sample of held-out corpus paragraphs for measuring magnitudes."""
    import random

    from saeflow.corpus import load_texts
    texts = load_texts(source, "heldout")
    return random.Random(seed).sample(texts, min(n, len(texts)))


def trace_graph(args, atlas, seed):
    """The flow graph of ``seed`` under the command's thresholds, with a hint when it is tiny."""
    from saeflow.flow import trace
    graph = trace(atlas, seed, res_threshold=args.res_threshold,
                  block_threshold=args.block_threshold, children=args.children)
    layers = graph.layers
    print(f"flow graph of {seed}: {len(graph.nodes)} features over layers "
          f"{layers[0]}..{layers[-1]}")
    if len(layers) < 3:
        print(f"  (few layers: matches below --res-threshold {args.res_threshold} end the chain; "
              "suites trained on little text match weakly, see docs/steering.md)")
    return graph


def theme_seed(args, suite, lm, description: str, atlas=None):
    """The best feature for a theme, printed with its runners-up."""
    from saeflow.themes import build_theme, rank_features
    theme = build_theme(description, read_examples(args.examples), source=args.source)
    ranked = rank_features(lm, suite, theme, site=args.site, top=5, atlas=atlas)
    print(f"theme {description!r}: top features at {ranked[0].feature.site}")
    for r in ranked:
        print(f"  {r.feature}  t={r.score:6.2f}  fires on {r.theme_frac:.0%} of theme texts "
              f"vs {r.background_frac:.0%}  top token {r.top_token!r}  {r.label}")
    return theme, ranked


def build_plan(args, suite, lm):
    """The plan the arguments describe (see the command's description)."""
    from saeflow.steer import (SteeringPlan, feature_magnitudes, graph_features,
                               plan_from_features, plan_from_graph)
    if args.plan:
        return SteeringPlan.load(args.plan)
    graph = None
    if args.graph:
        import json
        from pathlib import Path

        from saeflow.flow import FlowGraph
        graph = FlowGraph.from_json(json.loads(Path(args.graph).read_text()))
        feats = graph_features(graph)
    elif args.theme:
        atlas = open_atlas(args, suite, lm) if args.mode != "features" else None
        feats = [theme_seed(args, suite, lm, args.theme, atlas)[1][0].feature]
    else:
        from saeflow.sites import Feature
        feats = [Feature.parse(f) for f in args.feature]
    if graph is None and args.mode != "features":
        if len(feats) != 1:
            raise ValueError("a flow graph starts from one --feature; use --mode features to "
                             "steer several features directly")
        graph = trace_graph(args, open_atlas(args, suite, lm), feats[0])
        feats = graph_features(graph)
    texts = magnitude_texts(args.source) if args.magnitude in ("res_norm", "activation") else None
    mags = (feature_magnitudes(lm, suite, feats, args.magnitude, texts)
            if args.action == "activate" else None)
    if graph is None:
        return plan_from_features(feats, args.coefficient, args.action, mags)
    return plan_from_graph(graph, args.mode, args.layer, args.schedule, args.coefficient,
                           alpha=args.alpha, end_coefficient=args.end_coefficient,
                           action=args.action, magnitudes=mags)


def side_by_side(left: str, right: str, titles=("unsteered", "steered")) -> str:
    width = shutil.get_terminal_size((120, 24)).columns
    col = max(30, (width - 3) // 2)
    a, b = textwrap.wrap(left, col) or [""], textwrap.wrap(right, col) or [""]
    lines = [f"{titles[0]:<{col}} | {titles[1]}", f"{'-' * col}-+-{'-' * col}"]
    lines += [f"{x:<{col}} | {y}" for x, y in zip_longest(a, b, fillvalue="")]
    return "\n".join(lines)


def run(args) -> int:
    from saeflow.steer import generate
    suite, lm = open_suite(args)
    plan = build_plan(args, suite, lm)
    coefs = [c for _, c in plan.terms]
    print(f"plan: {plan.action} {len(plan.terms)} features at {len(plan.sites)} sites, layers "
          f"{plan.layers[0]}..{plan.layers[-1]}, coefficients {min(coefs):.3g}..{max(coefs):.3g}"
          + (f" ({plan.info.get('mode')} from {plan.info['seed']})" if "seed" in plan.info else ""))
    if args.save_plan:
        print(f"plan saved to {plan.save(args.save_plan)}")
    kw = dict(samples=args.samples, seed=args.seed, temperature=args.temperature,
              top_p=args.top_p, greedy=args.greedy)
    base = generate(lm, args.prompt, None, args.max_new_tokens, **kw)
    steered = generate(lm, args.prompt, plan, args.max_new_tokens, suite=suite, **kw)
    for b, s in zip(base, steered):
        print(f"\nprompt: {b.prompt!r}")
        print(side_by_side(b.prompt + b.text, s.prompt + s.text))
    return 0
