"""``saeflow steer-eval SUITE --theme weddings --theme sports ...``: sweep steering modes, layers
and coefficients for each theme against an unsteered and a prompting baseline; print and save a
table (CSV/JSON), plots (PNG), and a comparison of single-layer vs cumulative steering on
held-out prompts and seeds. Re-running the same command resumes where it stopped."""

from __future__ import annotations

from saeflow.commands import add_model_args, add_ray_arg, from_args, joined, numbers
from saeflow.commands.steer import add_plan_args
from saeflow.recipes.steer_eval import SteerEvalConfig
from saeflow.recipes.steering import PlanOptions


def add(subparsers) -> None:
    d = SteerEvalConfig(themes=("",))
    p = subparsers.add_parser(
        "steer-eval", help="evaluate flow-graph steering for themes (sweep, table, plots)",
        description="For each theme: find its seed feature, trace its flow graph, and generate "
                    "from fixed prompts under single-layer and cumulative steering at several "
                    "layers and coefficients, plus unsteered and prompting baselines. Scores: "
                    "topic (calibrated embedding similarity), coherence (calibrated perplexity "
                    "under the unsteered model, times a repetition penalty), score = topic x "
                    "coherence. Results are saved after every cell; re-run to resume.")
    p.add_argument("suite", metavar="SUITE",
                   help="suite folder or spec file, 'starter', or a preset")
    p.add_argument("--theme", action="append", required=True, help="a theme (repeatable)")
    p.add_argument("--feature", default=d.feature,
                   help="seed feature to use instead of the theme's top feature (one theme only)")
    p.add_argument("--out", default=d.out, help="output folder (default ./%(default)s)")
    p.add_argument("--modes", default=",".join(d.modes), help="comma list (default %(default)s)")
    p.add_argument("--layers", default="auto",
                   help="comma-separated layers, or auto: the seed's layer and the midpoints "
                        "towards the flow graph's first and last layers")
    p.add_argument("--coefficients", default=joined(d.coefficients),
                   help="steering coefficients, comma-separated (default %(default)s)")
    p.add_argument("--prompt", action="append", default=None,
                   help=f"prompt (repeatable; default: {', '.join(map(repr, d.prompts))})")
    p.add_argument("--seeds", default=joined(d.seeds),
                   help="sampling seeds (comma-separated; default %(default)s)")
    p.add_argument("--samples", type=int, default=d.samples,
                   help="continuations per prompt and seed (%(default)s)")
    p.add_argument("--report-prompt", action="append", default=None,
                   help="held-out prompt the best cells are reported on (repeatable; default: "
                        f"{', '.join(map(repr, d.report_prompts))}); never a --prompt")
    p.add_argument("--report-seeds", default=None,
                   help="held-out sampling seeds (default: as many as --seeds, after them)")
    p.add_argument("--no-equal-norm", action="store_true",
                   help="skip the cumulative cells rescaled to single-layer's added norm")
    p.add_argument("--judge-sample", type=int, default=d.judge_sample,
                   help="held-out generations the judge rates to validate the automatic scores "
                        "(%(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--top-p", type=float, default=d.top_p)
    p.add_argument("--baseline-prompt", default=d.baseline_prompt,
                   help="prompting baseline template with {theme} and {prompt}")
    p.add_argument("--rescore", action="store_true",
                   help="recompute the scores of saved generations (after a scorer change) "
                        "before resuming")
    p.add_argument("--judge-url", default=d.judge_url,
                   help="OpenAI-compatible endpoint for an optional LLM judge (API key from "
                        "$SAEFLOW_JUDGE_API_KEY if set)")
    p.add_argument("--judge-model", default=d.judge_model, help="model name for the judge")
    add_ray_arg(p, "cells")
    add_plan_args(p)
    add_model_args(p)
    p.set_defaults(func=run)


def config(args) -> SteerEvalConfig:
    """The evaluation the arguments describe."""
    return from_args(
        SteerEvalConfig, args, themes=tuple(args.theme),
        layers=None if args.layers == "auto" else numbers(args.layers, "--layers", int),
        modes=tuple(args.modes.split(",")),
        coefficients=numbers(args.coefficients, "--coefficients"),
        prompts=tuple(args.prompt) if args.prompt else SteerEvalConfig.prompts,
        seeds=numbers(args.seeds, "--seeds", int), plan=from_args(PlanOptions, args),
        report_prompts=tuple(args.report_prompt) if args.report_prompt
        else SteerEvalConfig.report_prompts,
        report_seeds=numbers(args.report_seeds, "--report-seeds", int) if args.report_seeds
        else None, equal_norm=not args.no_equal_norm)


def run(args) -> int:
    from saeflow.catalog import atlas_for, open_suite
    from saeflow.recipes.distribute import SuiteLoader
    from saeflow.recipes.steer_eval import format_comparison, format_rows, run_steer_eval
    cfg = config(args)
    suite, lm = open_suite(args.suite, args.model, args.device, args.dtype)
    result = run_steer_eval(cfg, suite, lm, atlas_for(suite, lm, cfg.plan.atlas),
                            loader=SuiteLoader(args.suite, args.model, args.device, args.dtype))
    print("\n" + format_rows(result.rows))
    print("\n" + format_comparison(result.comparison))
    out = result.out
    print(f"\nsaved {out / 'summary.csv'}, {out / 'summary.json'}, {out / 'overview.png'} and "
          f"per-theme results.json + scores.png")
    return 0
