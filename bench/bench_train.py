"""TopK SAE training throughput: saeflow's kernels vs a textbook dense-autograd TopK SAE.

    python bench/bench_train.py                   # per-SAE table (width 4608, k 32, d 576)
    python bench/bench_train.py --suite           # also a short real run over all 90 SmolLM2 sites
    python bench/bench_train.py --width 2304 --batch 1024 --threads 2

Part 1 trains one SAE on the same synthetic batches with (a) the textbook implementation:
dense fp32 encoder matmul, top-k scattered into a dense [B, F] code, dense decoder matmul,
autograd backward, torch Adam; (b) saeflow.topk with the encoder matmul in fp32; (c) saeflow.topk
with the encoder matmul in bf16 (what training uses when bf16 is fast here). All use unit-norm
decoder rows. Part 2 (``--suite``) runs ``train_suite`` for a few steps on every SmolLM2 site
and reports wall time, tokens/s and peak memory, next to the hooked model forward alone.
Throughput on a shared machine moves with the load: compare the ratios within one run.
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import tempfile
import time

import torch

from saeflow.topk import (TopKParams, TopKTrainer, dense_topk_loss, init_params,
                          normalize_rows_, project_decoder_grad)


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
        return float(loss)


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
    print(f"\nPer-SAE training throughput (d={d}, width={F}, k={k}, batch={B}, "
          f"{args.steps} timed steps, {torch.get_num_threads()} intra-op thread(s))")
    rows = []
    dense = DenseTopK(d, F, k)
    rows.append(("textbook dense autograd (fp32)", *time_steps(dense.step, batches)))
    for name, dtype in (("saeflow sparse, fp32 encoder matmul", torch.float32),
                        ("saeflow sparse, bf16 encoder matmul", torch.bfloat16)):
        t = TopKTrainer(d, F, k, k_aux=2 * k, matmul_dtype=dtype)
        t.scale = 1.0
        t.max_norm = float("inf")
        rows.append((name, *time_steps(lambda x: t.step(x, 1e-3).loss, batches)))
    base = rows[0][1]
    print(f"{'implementation':40s} {'tok/s':>10} {'vs textbook':>12} {'last loss':>10}")
    for name, tps, loss in rows:
        print(f"{name:40s} {tps:10.0f} {tps / base:11.2f}x {loss:10.3f}")


def bench_suite(args) -> None:
    import json
    from concurrent.futures import ThreadPoolExecutor

    from saeflow.models import load_model
    from saeflow.hooks import SiteTaps
    from saeflow.sites import parse_sites
    from saeflow.train import STARTER_CONFIG, train_suite
    lm = load_model("smollm2", dtype="bfloat16")
    sites = parse_sites(args.sites, lm.n_layers)
    cfg = dataclasses.replace(STARTER_CONFIG, tokens=args.suite_tokens, eval_tokens=0,
                              checkpoint_every=10**9)
    ids = torch.randint(100, 40_000, (cfg.seqs_per_batch, cfg.seq_len))
    taps = SiteTaps(lm, sites)
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    with taps.installed(), ThreadPoolExecutor(cfg.workers) as pool:
        list(pool.map(taps.record, ids.chunk(cfg.workers)))
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(3):
            list(pool.map(taps.record, ids.chunk(cfg.workers)))
        fwd_wall, fwd_cpu = time.perf_counter() - t0, time.process_time() - c0
    torch.set_num_threads(prev)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        train_suite(lm, sites, cfg, tmp, progress=False)
        wall = time.perf_counter() - t0
        info = json.loads(open(f"{tmp}/suite.json").read())["training"]
    tokens, cpu = info["tokens_trained"], info["cpu_seconds"]
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    n_fwd = 3 * ids.numel()
    print(f"\nWhole-suite run: {len(sites)} sites, {tokens:,} tokens, width {cfg.width}, "
          f"k {cfg.k}, {cfg.workers} workers")
    print(f"{'what':40s} {'tok/s':>8} {'CPU-s/1k tok':>13} {'wall s':>8} {'peak MB':>8}")
    print(f"{'hooked model forward alone':40s} {n_fwd / fwd_wall:8.0f} "
          f"{1000 * fwd_cpu / n_fwd:13.2f} {fwd_wall:8.1f}")
    print(f"{'train_suite (forward + all SAE steps)':40s} {tokens / wall:8.0f} "
          f"{1000 * cpu / tokens:13.2f} {wall:8.1f} {peak_mb:8.0f}")
    full = STARTER_CONFIG.tokens / 1000 * (1000 * cpu / tokens) * 90 / len(sites)
    print(f"starter suite ({STARTER_CONFIG.tokens:,} tokens, 90 sites) needs about {full:.0f} "
          f"CPU-seconds: {full / 2 / 60:.1f} min on 2 free cores (wall above includes set-up)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--d", type=int, default=576)
    ap.add_argument("--width", type=int, default=4608)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1,
                    help="intra-op threads for part 1 (default 1: stable on a shared CPU)")
    ap.add_argument("--suite", action="store_true", help="also run part 2 (real model)")
    ap.add_argument("--sites", default="all")
    ap.add_argument("--suite-tokens", type=int, default=8192)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bench_kernels(args)
    if args.suite:
        bench_suite(args)


if __name__ == "__main__":
    main()
