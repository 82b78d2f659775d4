"""Benchmark: the whole atlas on a Gemma Scope 2B 16k-shaped planted suite, versus the plain way.

    python bench/bench_atlas.py                 # 26 layers x (res, mlp, att), 16384 x 2304
    python bench/bench_atlas.py --layers 3      # a quick subset

Measured in the same run:
  1. this machine's matmul peak (best of a few 4096 x 2304 x 4096 products, bf16 and fp32);
  2. ``compute_atlas`` over the suite (labels off: no model): wall time, matching time, peak
     resident memory, the matching's GFLOP/s and its share of the bf16 peak, and how well the
     planted parents and lineage classes are recovered;
  3. the plain approach on the first ``--baseline-layers`` layers: the full fp32 similarity
     matrix of each pair, then argmax along both axes; versus the blocked pair on the same
     operands (time per pair, peak memory of the step, top-1 agreement).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from saeflow.atlas import compute_atlas  # noqa: E402
from saeflow.match import Operand, cosine_topk_pair, residual_decoder  # noqa: E402
from saeflow.sites import Site  # noqa: E402
from saeflow.synthetic import planted_suite  # noqa: E402


def peak_gflops(dtype: torch.dtype, reps: int = 4) -> float:
    a = torch.randn(4096, 2304).to(dtype)
    b = torch.randn(4096, 2304).to(dtype)
    out = torch.empty(4096, 4096, dtype=dtype)
    torch.matmul(a, b.T, out=out)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.matmul(a, b.T, out=out)
        best = min(best, time.perf_counter() - t0)
    return 2 * 4096 * 4096 * 2304 / best / 1e9


def reset_peak_rss() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2 ** 20
    return float("nan")


def plain_pair(R: torch.Tensor, S: torch.Tensor):
    sim = R @ S.T  # [F_R, F_S] fp32: the whole matrix
    return sim.max(1), sim.max(0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--layers", type=int, default=26)
    ap.add_argument("--width", type=int, default=16384)
    ap.add_argument("--d-model", type=int, default=2304)
    ap.add_argument("--baseline-layers", type=int, default=2)
    ap.add_argument("--block", type=int, default=4096)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--out", default=None, help="atlas folder (default: a temporary one)")
    args = ap.parse_args()

    threads = torch.get_num_threads()
    load0 = os.getloadavg()[0]
    pk_bf16, pk_fp32 = peak_gflops(torch.bfloat16), peak_gflops(torch.float32)
    print(f"machine: {threads} threads, load average {load0:.1f}; matmul peak bf16 "
          f"{pk_bf16:.0f} GFLOP/s, fp32 {pk_fp32:.0f} GFLOP/s (ratio {pk_bf16 / pk_fp32:.2f})")

    suite, truth = planted_suite(args.layers, args.width, args.d_model, lazy=True,
                                 name=f"planted-{args.layers}x{args.width}")
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench-atlas-"))
    reset_peak_rss()
    t0 = time.perf_counter()
    atlas = compute_atlas(suite, out, k=args.k, block=args.block, labels=False)
    wall = time.perf_counter() - t0
    rss = peak_rss_gb()
    ms, mf = atlas.info["match_seconds"], atlas.info["match_flops"]
    pairs = sum(len(atlas.sources(L)) for L in atlas.layers)
    acc, par = [], []
    for L in atlas.layers:
        acc.append((atlas.lineage_codes(L) == truth.classes[L]).mean())
        for kind, parents in (("res", truth.parent_res), ("mlp", truth.parent_mlp),
                              ("att", truth.parent_att)):
            col = atlas.column(L, f"pred_{kind}_idx")
            has = parents[L] >= 0
            if col is not None and has.any():
                par.append((np.asarray(col[:, 0])[has] == parents[L][has]).mean())
    stats = {}
    for L in atlas.layers:
        part = json.loads((out / "layers" / f"{L:03d}" / "part.json").read_text())
        for s in part["stats"].values():
            for key in ("rows", "rescored", "exact_rows"):
                stats[key] = stats.get(key, 0) + s.get(key, 0)

    # ---- the plain approach vs the blocked pair, on the same operands ----------------------
    rows = []
    for L in range(1, min(args.baseline_layers, args.layers - 1) + 1):
        R32 = residual_decoder(suite, Site(L, "res"))
        for kind in ("res", "mlp", "att"):
            src = Site(L - 1, "res") if kind == "res" else Site(L, kind)
            S32 = residual_decoder(suite, src)
            reset_peak_rss()
            base_rss = peak_rss_gb()
            t1 = time.perf_counter()
            (bv, bi), (cv, ci) = plain_pair(R32, S32)
            t_plain = time.perf_counter() - t1
            m_plain = peak_rss_gb() - base_rss
            reset_peak_rss()
            base_rss = peak_rss_gb()
            t1 = time.perf_counter()
            R, S = Operand.cosine(R32, "bf16"), Operand.cosine(S32, "bf16")
            fwd, back = cosine_topk_pair(R, S, k=args.k, block=args.block)
            t_block = time.perf_counter() - t1
            m_block = peak_rss_gb() - base_rss
            agree = ((fwd.indices[:, 0] == bi).float().mean().item(),
                     (back.indices[:, 0] == ci).float().mean().item())
            rows.append((f"{L}/res vs {src}", t_plain, t_block, m_plain, m_block, agree))
            del R, S, fwd, back

    # the machine may be shared: take the best peak seen before and after (a conservative share)
    pk_bf16 = max(pk_bf16, peak_gflops(torch.bfloat16))
    pk_fp32 = max(pk_fp32, peak_gflops(torch.float32))
    load1 = os.getloadavg()[0]
    flops_pair = 2 * args.width * args.width * args.d_model
    print()
    print(f"peak (best of before/after): bf16 {pk_bf16:.0f} GFLOP/s, fp32 {pk_fp32:.0f} GFLOP/s; "
          f"load average {load0:.1f} at start, {load1:.1f} at end")
    print(f"## Atlas of a planted {args.layers}-layer suite, {args.width} features x "
          f"{args.d_model} per site ({pairs} matched pairs, k={args.k}, block {args.block})")
    print()
    print("| measure | value |")
    print("|---|---|")
    print(f"| wall time (incl. generating the planted SAEs) | {wall:.1f} s |")
    print(f"| matching time (pairs + nulls) | {ms:.1f} s ({ms / pairs:.2f} s per pair) |")
    print(f"| matching throughput | {mf / ms / 1e9:.0f} GFLOP/s = "
          f"{mf / ms / 1e9 / pk_bf16:.0%} of the measured bf16 peak |")
    print(f"| peak resident memory of the process | {rss:.2f} GB |")
    print(f"| rows re-scored on the whole shortlist / recomputed exactly | "
          f"{stats.get('rescored', 0) / max(stats.get('rows', 1), 1):.2%} / "
          f"{stats.get('exact_rows', 0) / max(stats.get('rows', 1), 1):.3%} |")
    print(f"| planted parents recovered (top-1) | {np.mean(par):.2%} |")
    print(f"| lineage class accuracy | {np.mean(acc):.2%} |")
    if rows:
        print()
        print("## Plain (full fp32 matrix, argmax both axes) vs blocked bf16 + fp32 re-scoring")
        print()
        print("| pair | plain s | blocked s | speed-up | plain extra memory | blocked extra "
              "memory | top-1 agreement (fwd, back) |")
        print("|---|---|---|---|---|---|---|")
        for name, tp, tb, mp, mb, ag in rows:
            print(f"| {name} | {tp:.2f} | {tb:.2f} | {tp / tb:.2f}x | {mp:.2f} GB | {mb:.2f} GB "
                  f"| {ag[0]:.4%}, {ag[1]:.4%} |")
        tp, tb = sum(r[1] for r in rows), sum(r[2] for r in rows)
        print(f"| all | {tp:.2f} | {tb:.2f} | {tp / tb:.2f}x | | | |")
        print(f"\nplain: {flops_pair * len(rows) / tp / 1e9:.0f} GFLOP/s "
              f"({flops_pair * len(rows) / tp / 1e9 / pk_fp32:.0%} of fp32 peak); blocked: "
              f"{flops_pair * len(rows) / tb / 1e9:.0f} GFLOP/s")
    print(f"\natlas written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
