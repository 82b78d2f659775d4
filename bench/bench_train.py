"""TopK SAE training throughput against the GEMM floor, a textbook baseline and the old path.

    python bench/bench_train.py                   # per-SAE table (width 2304, k 32, d 576)
    python bench/bench_train.py --suite           # also short real runs over all 90 SmolLM2 sites
    python bench/bench_train.py --width 4608 --batch 4096 --threads 2

Part 1 measures this CPU's bf16 and fp32 GEMM peak on the encoder's own shape and the floor it
implies (the encoder's dense ``[B, d] x [d, F]`` product, 2 d F FLOP per row, at the peak of
the dtype training runs it in here: bf16 where bf16 products are fast, fp32 elsewhere),
then trains one SAE on the same synthetic batches with: (a) the textbook implementation (dense
fp32 encoder and decoder, top-k scattered into a dense code, autograd, torch Adam); (b) saeflow's
sparse kernels in torch with glibc's default allocator, what training first ran (every
weight-sized temporary is a fresh mmap, so each step pays page faults); (c) the same with
``tune_malloc`` (today's torch kernels); (d) the compiled step of ``saeflow.kernels`` (numba: a
radix top-k and one sparse backward with Adam fused in), (c) and (d) at the model-batch size
and at the starter's SAE-step size. Each row gives rows/s and the share of the floor. Part 2
(``--suite``) runs ``train_suite`` on every SmolLM2 site for a few forwards with the old recipe
(one 1,024-row step per 1,024-token forward) and the starter's (2,048-token forwards, small SAE
steps, tokens reused) on both kernels, beside the hooked model forward alone. The runs are too
short for any latent to count as dead, so AuxK does not run in them (a whole training run pays
about 10% more; docs/training.md). Throughput on a shared machine moves with the load: compare the
ratios within one run; CPU-seconds per 1k tokens are less sensitive to other jobs than wall time.
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import tempfile
import time

import torch

from saeflow.compute import bf16_is_fast, model_dtype
from saeflow.models import dtype_name
from saeflow.topk import (TopKParams, TopKTrainer, dense_topk_loss, init_params,
                          normalize_rows_, project_decoder_grad, tune_malloc)


def default_malloc() -> None:
    """glibc's default: blocks from 128 KiB up are mmapped and unmapped per allocation."""
    import ctypes
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 128 << 10)  # M_MMAP_THRESHOLD
    libc.mallopt(-1, 128 << 10)  # M_TRIM_THRESHOLD


def gemm_peak(B: int, d: int, F: int, dtype: torch.dtype, reps: int = 10) -> float:
    """GFLOP/s of the encoder's ``[B, d] x [d, F]`` product in ``dtype`` (best of ``reps``)."""
    a, w = torch.randn(B, d).to(dtype), torch.randn(F, d).to(dtype)
    a @ w.T
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ w.T
        best = min(best, time.perf_counter() - t0)
    return 2 * B * d * F / best / 1e9


def synthetic_batches(d: int, n: int, batch: int, seed: int = 0) -> list[torch.Tensor]:
    """Sparse sums of 4096 random directions plus noise (scaled like training inputs)."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.nn.functional.normalize(torch.randn(4096, d, generator=g), dim=-1)
    out = []
    for _ in range(n):
        idx = torch.randint(0, 4096, (batch, 24), generator=g)
        x = torch.einsum("bk,bkd->bd", torch.rand(batch, 24, generator=g) * 3, dirs[idx])
        out.append(x + 0.1 * torch.randn(batch, d, generator=g))
    return out


class DenseTopK:
    """The textbook implementation (autograd through dense tensors)."""

    def __init__(self, d, width, k, lr=1e-3):
        p = init_params(d, width, torch.Generator().manual_seed(0))
        self.p = TopKParams(*[t.clone().requires_grad_(True) for t in p])
        self.k = k
        self.opt = torch.optim.Adam(self.p, lr=lr)

    def step(self, x):
        loss = dense_topk_loss(x, self.p, self.k)
        self.opt.zero_grad()
        loss.backward()
        with torch.no_grad():
            W = self.p.W_dec_FD
            W.grad = project_decoder_grad(W, W.grad)
            self.opt.step()
            normalize_rows_(W)
        return float(loss.detach())


def time_steps(step, batches, warmup=2) -> tuple[float, float]:
    for x in batches[:warmup]:
        step(x)
    t0 = time.perf_counter()
    loss = 0.0
    for x in batches[warmup:]:
        loss = step(x)
    dt = time.perf_counter() - t0
    return sum(x.shape[0] for x in batches[warmup:]) / dt, loss


def bench_kernels(args) -> None:
    d, F, k, B = args.d, args.width, args.k, args.batch
    batches = synthetic_batches(d, args.steps + 2, B)
    bf16, fp32 = gemm_peak(B, d, F, torch.bfloat16), gemm_peak(B, d, F, torch.float32)
    # the encoder runs in the dtype training picks here (bf16 only where it is fast), and the
    # floor is that dtype's peak
    mm = torch.bfloat16 if bf16_is_fast(d, F) else torch.float32
    name = dtype_name(mm)
    floor = (bf16 if mm == torch.bfloat16 else fp32) * 1e9 / (2 * d * F)
    print(f"\nPer-SAE training throughput (d={d}, width={F}, k={k}, batch={B}, "
          f"{args.steps} timed steps, {torch.get_num_threads()} intra-op thread(s), "
          f"encoder in {name})")
    print(f"GEMM peak on the encoder's shape: bf16 {bf16:.0f} GFLOP/s, fp32 {fp32:.0f} GFLOP/s; "
          f"floor (encoder product alone at the {name} peak): {floor:,.0f} rows/s")
    rows = []
    dense = DenseTopK(d, F, k)
    rows.append(("textbook dense autograd (fp32)", *time_steps(dense.step, batches)))

    def sparse(name, rows_per_step, kernels="torch"):
        t = TopKTrainer(d, F, k, k_aux=2 * k, matmul_dtype=mm, kernels=kernels)
        t.scale = 1.0
        t.max_norm = float("inf")
        mb = [x[i:i + rows_per_step] for x in batches for i in range(0, B, rows_per_step)]
        rows.append((name, *time_steps(lambda x: t.step(x, 1e-3).loss, mb)))

    default_malloc()
    sparse("sparse kernels, default malloc (old)", B)
    tune_malloc()
    sparse("torch sparse kernels, tuned malloc (today)", B)
    from saeflow import kernels
    from saeflow.train import STARTER_CONFIG
    small = STARTER_CONFIG.sae_batch
    if B > small:
        sparse(f"  the same, {small}-row steps (starter)", small)
    if kernels.available():
        sparse("compiled step, numba (new)", B, "numba")
        if B > small:
            sparse(f"  the same, {small}-row steps (starter)", small, "numba")
    else:
        print("(numba is not installed: no compiled-step rows)")
    base = rows[0][1]
    print(f"{'implementation':40s} {'rows/s':>10} {'% floor':>8} {'vs textbook':>12} "
          f"{'last loss':>10}")
    for name, tps, loss in rows:
        print(f"{name:40s} {tps:10.0f} {100 * tps / floor:7.1f}% {tps / base:11.2f}x "
              f"{loss:10.3f}")


def _suite_run(lm, sites, cfg, label: str) -> tuple:
    import json

    import saeflow.train as train

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        train.train_suite(lm, sites, cfg, tmp, progress=False)
        wall = time.perf_counter() - t0
        info = json.loads(open(f"{tmp}/suite.json").read())["training"]
    return label, info["tokens_trained"], info["cpu_seconds"], info["wall_seconds"], wall, \
        info["steps"]


def bench_suite(args) -> None:
    from concurrent.futures import ThreadPoolExecutor

    import saeflow.train as train
    from saeflow.hooks import SiteTaps
    from saeflow.models import load_model
    from saeflow.sites import parse_sites
    lm = load_model("smollm2", dtype=model_dtype("auto", "cpu"))  # as saeflow train loads it
    sites = parse_sites(args.sites, lm.n_layers)
    new = dataclasses.replace(train.STARTER_CONFIG, tokens=args.suite_tokens, eval_tokens=0,
                              checkpoint_every=10**9, seed_sites="")
    old = train.TrainConfig(tokens=args.suite_tokens, eval_tokens=0, checkpoint_every=10**9,
                            kernels="torch")
    ids = torch.randint(100, 40_000, (old.seqs_per_batch, old.seq_len))
    taps = SiteTaps(lm, sites)
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    with taps.installed(), ThreadPoolExecutor(old.workers) as pool:
        list(pool.map(taps.record, ids.chunk(old.workers)))
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(3):
            list(pool.map(taps.record, ids.chunk(old.workers)))
        fwd_wall, fwd_cpu = time.perf_counter() - t0, time.process_time() - c0
    torch.set_num_threads(prev)
    runs = []
    default_malloc()
    real_tune, train.tune_malloc = train.tune_malloc, lambda: False
    try:
        runs.append(_suite_run(lm, sites, old, "old recipe, default malloc (before)"))
    finally:
        train.tune_malloc = real_tune
    runs.append(_suite_run(lm, sites, old, "old recipe, tuned malloc"))
    starter = f"starter recipe ({new.reuse:g}x reuse, {new.sae_batch}-row steps)"
    runs.append(_suite_run(lm, sites, dataclasses.replace(new, kernels="torch"),
                           f"{starter}, torch"))
    from saeflow import kernels
    if kernels.available():
        runs.append(_suite_run(lm, sites, dataclasses.replace(new, kernels="numba"),
                               f"{starter}, compiled"))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    n_fwd = 3 * ids.numel()
    print(f"\nWhole-suite runs: {len(sites)} sites, {args.suite_tokens:,} tokens, width "
          f"{old.width}, k {old.k}, {old.workers} workers (peak RSS {peak_mb:.0f} MB)")
    print(f"{'what':44s} {'tok/s':>7} {'rows/s':>8} {'CPU-s/1k tok':>13} {'steps':>6} "
          f"{'vs before':>9}")
    print(f"{'hooked model forward alone':44s} {n_fwd / fwd_wall:7.0f} {'':>8} "
          f"{1000 * fwd_cpu / n_fwd:13.2f}")
    base = None
    for label, tokens, cpu, train_wall, wall, steps in runs:
        rows = tokens * (new.reuse if "reuse" in label else 1)
        base = base or tokens / train_wall
        print(f"{label:44s} {tokens / train_wall:7.0f} {rows / train_wall:8.0f} "
              f"{1000 * cpu / tokens:13.2f} {steps:6d} {tokens / train_wall / base:8.2f}x")
    for label, tokens, cpu, *_ in runs[2:]:
        full = train.STARTER_CONFIG.tokens * cpu / tokens * 90 / len(sites)
        print(f"{label.split(', ')[-1]}: the starter suite ({train.STARTER_CONFIG.tokens:,} "
              f"tokens, 90 sites) needs about {full:.0f} CPU-seconds: {full / 2 / 60:.1f} min "
              f"on 2 free cores")
    if len(runs) == 4:
        print(f"compiled against torch, starter recipe: {runs[2][2] / runs[3][2]:.2f}x less CPU, "
              f"{runs[2][3] / runs[3][3]:.2f}x less wall time")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--d", type=int, default=576)
    ap.add_argument("--width", type=int, default=2304)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1,
                    help="intra-op threads for part 1 (default 1: stable on a shared CPU)")
    ap.add_argument("--suite", action="store_true", help="also run part 2 (real model)")
    ap.add_argument("--sites", default="all")
    ap.add_argument("--suite-tokens", type=int, default=12_288)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bench_kernels(args)
    if args.suite:
        bench_suite(args)


if __name__ == "__main__":
    main()
