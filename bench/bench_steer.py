"""Steering overhead: generation and forward speed with a 30-layer multi-feature plan vs unsteered.

    .venv/bin/python bench/bench_steer.py [--suite PATH] [--features-per-layer 3] [--repeats 3]

Uses the SmolLM2 starter suite when it exists (never trains it), else random TopK SAEs of the
starter's shape (width 4608, k 32) at every residual site; the cost of an activation plan does
not depend on the SAE's weights. Variants run interleaved, and each row is the median of the
repeats; the ratio is against the unsteered run of the same benchmark in the same process.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from saeflow.hooks import hook_count  # noqa: E402
from saeflow.models import cache_dir, load_model  # noqa: E402
from saeflow.sae import SAE  # noqa: E402
from saeflow.sites import Site  # noqa: E402
from saeflow.steer import SteeringPlan, generate  # noqa: E402
from saeflow.catalog import load_suite  # noqa: E402
from saeflow.suite import Suite  # noqa: E402

PROMPTS = ["I think", "Let me tell you about", "Yesterday,", "The best thing"]


def random_suite(n_layers: int, d: int, width: int = 4608, k: int = 32) -> Suite:
    g = torch.Generator().manual_seed(0)
    saes = {}
    for layer in range(n_layers):
        W_dec = torch.randn(width, d, generator=g) / d ** 0.5
        saes[Site(layer, "res")] = SAE(W_enc=W_dec.T.contiguous(), b_enc=torch.zeros(width),
                                       W_dec=W_dec, b_dec=torch.zeros(d), activation="topk", k=k)
    return Suite.from_saes(saes, name="random-topk")


def plans(suite: Suite, per_layer: int) -> dict[str, SteeringPlan]:
    res = suite.sites("res")
    terms = [(site.feature(i * 97 + 13), 0.01) for site in res for i in range(per_layer)]
    return {"unsteered": None,
            f"activate {len(terms)} feats / {len(res)} layers": SteeringPlan(terms),
            f"suppress {len(terms)} feats / {len(res)} layers":
                SteeringPlan([(f, 0.0) for f, _ in terms], action="suppress")}


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--suite", default=str(cache_dir() / "suites" / "smollm2-starter"))
    ap.add_argument("--features-per-layer", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=36)
    ap.add_argument("--samples", type=int, default=2, help="per prompt (4 prompts): batch of 8")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()

    lm = load_model("smollm2", dtype=args.dtype)
    if (Path(args.suite) / "suite.json").exists():
        suite = load_suite(args.suite)
    else:
        print(f"(no suite at {args.suite}: random TopK SAEs of the starter's shape)")
        suite = random_suite(lm.n_layers, lm.d_model)
    variants = plans(suite, args.features_per_layer)
    ids = torch.randint(1000, 20000, (8, 128), generator=torch.Generator().manual_seed(0))
    runs: dict[str, dict[str, list[float]]] = {name: {"gen": [], "fwd": []} for name in variants}
    generate(lm, PROMPTS[:1], None, 4)  # warm-up
    for _ in range(args.repeats):
        for name, plan in variants.items():
            out = []
            t = timed(lambda: out.extend(generate(lm, PROMPTS, plan, args.max_new_tokens,
                                                  suite=suite, samples=args.samples, seed=0)))
            runs[name]["gen"].append(sum(len(g.new_ids) for g in out) / t)

            def fwd(plan=plan):
                with torch.no_grad():
                    if plan is None:
                        lm.model(input_ids=ids, use_cache=False)
                    else:
                        with plan.apply(lm, suite):
                            lm.model(input_ids=ids, use_cache=False)
            runs[name]["fwd"].append(ids.numel() / timed(fwd))
    assert hook_count(lm.model) == 0
    base = {k: statistics.median(runs["unsteered"][k]) for k in ("gen", "fwd")}
    print(f"\nSmolLM2 {args.dtype}, {torch.get_num_threads()} threads, {args.repeats} repeats "
          f"(median), suite {suite.name}")
    print(f"{'variant':<34} {'generate tok/s':>15} {'ratio':>6} {'forward tok/s':>14} {'ratio':>6}")
    for name in variants:
        g, f = (statistics.median(runs[name][k]) for k in ("gen", "fwd"))
        print(f"{name:<34} {g:15.1f} {g / base['gen']:6.3f} {f:14.1f} {f / base['fwd']:6.3f}")
    print(f"(generate: batch of {len(PROMPTS) * args.samples} sampled sequences x "
          f"{args.max_new_tokens} new tokens; forward: 8 x 128 tokens, no cache)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
