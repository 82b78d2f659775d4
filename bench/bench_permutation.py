"""Benchmark: permutation matching (one-to-one, LAP) at 4k, 16k and 65k features.

    python bench/bench_permutation.py          # 4096, 16384 (dense + sparse), 65536 (sparse)
    python bench/bench_permutation.py --widths 4096 --d-model 576

Each width: a random JumpReLU SAE and a copy with shuffled, rescaled (same function) and
slightly noised features, so the right answer is known. The dense solver (scipy
``linear_sum_assignment`` on the full cost matrix) is the baseline, measured in the same run
wherever its F^2 float64 matrix fits (``--dense-max``); the sparse solver (kNN graph of both
directions + ``min_weight_full_bipartite_matching``) runs at every width. Reported: seconds,
peak resident memory of the step, the share of the planted permutation recovered, and the
sparse solution's cost relative to the dense optimum.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from saeflow.match import permutation_match  # noqa: E402
from saeflow.synthetic import jumprelu_sae, permuted_copy  # noqa: E402


def reset_peak_rss() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def rss_gb(field: str = "VmHWM:") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 2 ** 20
    return float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--widths", default="4096,16384,65536")
    ap.add_argument("--d-model", type=int, default=2304)
    ap.add_argument("--dense-max", type=int, default=16384,
                    help="largest width for the dense baseline (8 F^2 bytes of memory)")
    ap.add_argument("--knn", type=int, default=16)
    ap.add_argument("--noise", type=float, default=0.05)
    args = ap.parse_args()

    rows = []
    for F in [int(w) for w in args.widths.split(",")]:
        a = jumprelu_sae(F, args.d_model, seed=F)
        b, planted = permuted_copy(a, seed=F + 1, noise=args.noise, rescale=True)
        results = {}
        for solver in ("dense", "sparse"):
            if solver == "dense" and F > args.dense_max:
                continue
            reset_peak_rss()
            base = rss_gb("VmRSS:")
            t0 = time.perf_counter()
            res = permutation_match(a, b, solver=solver, knn=args.knn)
            sec = time.perf_counter() - t0
            results[solver] = res
            rows.append((F, solver, res.solver, sec, rss_gb() - base,
                         (res.perm == planted).float().mean().item(), res.cost))
            print(f"  {F} {solver}: {sec:.1f} s", file=sys.stderr)
        del a, b
    dense_cost = {F: c for F, s, _, _, _, _, c in rows if s == "dense"}
    print(f"\n## Permutation matching, d_model {args.d_model} (knn {args.knn}, noise "
          f"{args.noise})\n")
    print("| features | solver | seconds | peak extra memory | planted recovered | "
          "cost / dense optimum |")
    print("|---|---|---|---|---|---|")
    for F, _, used, sec, mem, rec, cost in rows:
        rel = f"{cost / dense_cost[F]:.6f}" if F in dense_cost else "(no dense baseline)"
        print(f"| {F} | {used} | {sec:.1f} | {mem:.2f} GB | {rec:.2%} | {rel} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
