"""``saeflow steer SUITE --prompt ... (--feature F | --theme T | --plan FILE | --graph FILE)``:
generate unsteered and steered continuations side by side, with the same random seed."""

from __future__ import annotations

import shutil
import textwrap
from itertools import zip_longest

from saeflow.commands import add_model_args, from_args
from saeflow.recipes.steering import PLAN_MODES, GenerationOptions, PlanOptions
from saeflow.configs import ACTIONS, MAGNITUDES, SCHEDULES


def add_plan_args(p) -> None:
    """Options that shape a steering plan (shared with ``steer-eval``)."""
    d = PlanOptions()
    p.add_argument("--schedule", default=d.schedule, choices=SCHEDULES,
                   help="coefficient over layers: constant s, s*exp(alpha*l), or linear from s at "
                        "the first steered layer to --end-coefficient at the last")
    p.add_argument("--alpha", type=float, default=d.alpha,
                   help="exponential schedule rate (%(default)s)")
    p.add_argument("--end-coefficient", type=float, default=d.end_coefficient,
                   help="linear schedule end value")
    p.add_argument("--action", default=d.action, choices=ACTIONS,
                   help="activate: add s*v; suppress: h + (r-1)*a*v with r the coefficient")
    p.add_argument("--magnitude", default=d.magnitude, choices=MAGNITUDES,
                   help="per-feature scale of v: res_norm (default; s is a fraction of the layer's "
                        "typical residual norm), activation (typical firing level), theta "
                        "(JumpReLU threshold), none (raw decoder row)")
    p.add_argument("--site", default=d.site,
                   help="site where --theme looks for features (default: middle residual site)")
    p.add_argument("--atlas", default=d.atlas,
                   help="atlas folder for flow graphs and labels (default: the suite's cached "
                        "atlas, computed if missing)")
    p.add_argument("--res-threshold", type=float, default=d.res_threshold,
                   help="flow graph: stop the residual chain below this cosine (%(default)s)")
    p.add_argument("--block-threshold", type=float, default=d.block_threshold,
                   help="flow graph: drop MLP/attention nodes below this cosine (%(default)s)")
    p.add_argument("--children", action="store_true",
                   help="flow graph: also follow every later feature whose top-1 predecessor is "
                        "on the chain (off: one top-1 residual chain, as steering wants)")
    p.add_argument("--source", default=d.source,
                   help="corpus for theme retrieval and magnitudes (default, wiki, bbc, or a path)")
    p.add_argument("--examples", default=d.examples,
                   help="a .txt file of theme examples (paragraphs separated by blank lines)")


def add(subparsers) -> None:
    d, g = PlanOptions(), GenerationOptions()
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
    p.add_argument("--mode", default=d.mode, choices=PLAN_MODES,
                   help="cumulative: graph features at layers <= --layer; single: at --layer only; "
                        "features: only the given features (no graph)")
    p.add_argument("--layer", type=int, default=d.layer,
                   help="steering layer (default: the seed's)")
    p.add_argument("--coefficient", type=float, default=d.coefficient,
                   help="s, or r when suppressing (%(default)s)")
    add_plan_args(p)
    p.add_argument("--max-new-tokens", type=int, default=g.max_new_tokens)
    p.add_argument("--samples", type=int, default=g.samples, help="continuations per prompt")
    p.add_argument("--seed", type=int, default=g.seed)
    p.add_argument("--temperature", type=float, default=g.temperature)
    p.add_argument("--top-p", type=float, default=g.top_p)
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    p.add_argument("--from-token", type=int, default=d.from_token, metavar="N",
                   help="steer only tokens at positions >= N of each sequence (default 0: all)")
    p.add_argument("--generated-only", action="store_true",
                   help="steer only the generated tokens, not the prompt")
    p.add_argument("--save-plan", default=None, help="write the plan used to this JSON file")
    add_model_args(p)
    p.set_defaults(func=run)


def side_by_side(left: str, right: str, titles=("unsteered", "steered")) -> str:
    width = shutil.get_terminal_size((120, 24)).columns
    col = max(30, (width - 3) // 2)
    a, b = textwrap.wrap(left, col) or [""], textwrap.wrap(right, col) or [""]
    lines = [f"{titles[0]:<{col}} | {titles[1]}", f"{'-' * col}-+-{'-' * col}"]
    lines += [f"{x:<{col}} | {y}" for x, y in zip_longest(a, b, fillvalue="")]
    return "\n".join(lines)


def run(args) -> int:
    from saeflow.catalog import open_suite
    from saeflow.recipes.steering import build_plan, steer_pairs
    opts, gen = from_args(PlanOptions, args), from_args(GenerationOptions, args)
    suite, lm = open_suite(args.suite, args.model, args.device, args.dtype)
    plan = build_plan(opts, suite, lm, features=args.feature or (), theme=args.theme,
                      plan_file=args.plan, graph_file=args.graph)
    coefs = [c for _, c in plan.terms]
    print(f"plan: {plan.action} {len(plan.terms)} features at {len(plan.sites)} sites, layers "
          f"{plan.layers[0]}..{plan.layers[-1]}, coefficients {min(coefs):.3g}..{max(coefs):.3g}"
          + (f" ({plan.info.get('mode')} from {plan.info['seed']})" if "seed" in plan.info else "")
          + (f", tokens from position {plan.from_token}" if plan.from_token else "")
          + (", generated tokens only" if plan.generated_only else ""))
    if args.save_plan:
        print(f"plan saved to {plan.save(args.save_plan)}")
    for b, s in steer_pairs(lm, suite, args.prompt, plan, gen):
        print(f"\nprompt: {b.prompt!r}")
        print(side_by_side(b.prompt + b.text, s.prompt + s.text))
    return 0
