"""``saeflow demo``: the whole method on the embedded default, ending in one HTML report."""

from __future__ import annotations

from saeflow.commands import add_model_args
from saeflow.demo import DEFAULT_THEMES, DemoConfig


def add(subparsers) -> None:
    d = DemoConfig()
    p = subparsers.add_parser(
        "demo", help="run the whole method on the embedded default and write an HTML report",
        description="Trains the SmolLM2 starter suite if it is not cached, computes the atlas, "
                    "finds seed features for a few themes, traces their flow graphs, runs a "
                    "small causal check and a small steering comparison, and writes "
                    "OUT/report.html plus the raw results. Re-running reuses everything cached.")
    p.add_argument("--out", default=d.out, help="output folder (default ./%(default)s)")
    p.add_argument("--suite", default=d.suite,
                   help="suite: 'starter' (default), a folder, a spec file or a preset")
    p.add_argument("--theme", action="append", default=None,
                   help=f"a theme (repeatable; default: {', '.join(DEFAULT_THEMES)})")
    p.add_argument("--quick", action="store_true",
                   help="a four-layer suite trained on few tokens and tiny stages (for CI)")
    p.add_argument("--res-threshold", type=float, default=d.res_threshold,
                   help="flow graphs: stop the residual chain below this cosine (%(default)s, "
                        "the paper's)")
    p.add_argument("--block-threshold", type=float, default=d.block_threshold,
                   help="flow graphs: drop MLP/attention nodes below this cosine (%(default)s)")
    add_model_args(p, dtype_help="model weights dtype (default auto: bfloat16, the dtype the "
                                  "starter SAEs are trained in, where bf16 products are fast; "
                                  "else float32)")
    p.set_defaults(func=run)


def run(args) -> int:
    from saeflow.demo import run_demo
    themes = args.theme or (DEFAULT_THEMES[:1] if args.quick else DEFAULT_THEMES)
    cfg = DemoConfig(out=args.out, suite=args.suite, model=args.model, themes=tuple(themes),
                     quick=args.quick, device=args.device, dtype=args.dtype,
                     res_threshold=args.res_threshold, block_threshold=args.block_threshold)
    result = run_demo(cfg)
    print(f"\nreport: {result.report.resolve()}")
    print(f"raw results: {result.out.resolve()}")
    print(f"open the report in a browser; explore the atlas with: saeflow view {result.atlas}")
    return 0
