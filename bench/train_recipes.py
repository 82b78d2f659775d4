"""Small, controlled recipe experiments for the streaming trainer on real SmolLM2 activations.

    python bench/train_recipes.py                       # the default grid (about 10 minutes)
    python bench/train_recipes.py --tokens 300000 --variants base,r2b512 --out recipes.csv

Activations of two adjacent residual sites (default 11/res and 12/res) are collected once from
the bundled corpus (train split, the starter's text order) plus held-out text, then every variant
trains its SAEs through the same ``TopKTrainer`` code path ``train_suite`` uses, fed the cached
activations in forward-sized chunks in the same order. Per variant it reports:
  - held-out FVU and dead latents (fraction that never fire on held-out text) of the later site,
    and the dead latents' margin: their median largest pre-activation over the median k-th
    pre-activation (just under 1: they lose the top-k narrowly; far under 1 or negative: they
    have died outright);
  - the adjacent-layer top-1 decoder cosine (median, share >= 0.5 and >= 0.7): the quantity
    feature flow matches on;
  - cross-seed stability: the later site trained again with another seed on the same rows, the
    share of features whose best match in the other seed has cosine >= 0.7;
  - the decoder rows' median cosine with their own initialisation (1 = never moved).
Sites after the first two (e.g. 12/att) are trained once per variant for their FVU and dead
latents. Nothing couples the sites: each SAE has its own seed and sees only its own site's rows.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from saeflow.corpus import token_batches
from saeflow.hooks import SiteTaps
from saeflow.match import cosine_topk
from saeflow.sites import Site
from saeflow.topk import TopKTrainer, init_params, tune_malloc


@dataclasses.dataclass(frozen=True)
class Variant:
    sae_batch: int  # rows per Adam step (0: the forward's own rows, one step per forward)
    reuse: float = 1.0
    lr: float = 2e-3
    width: int = 2304
    k_aux: int = 64
    aux_coef: float = 1 / 32
    dead_tokens: int = 20_000


VARIANTS = {
    "base": Variant(0),  # the old starter: one step per 1,024-token forward
    "r2b1024": Variant(1024, 2.0),
    "r2b512": Variant(512, 2.0),
    "r2b256": Variant(256, 2.0),
    "r4b512": Variant(512, 4.0),
    "r2b512lr4": Variant(512, 2.0, 4e-3),
    "r2b512lr1": Variant(512, 2.0, 1e-3),
    "r2b512w1152": Variant(512, 2.0, width=1152),
    # the starter of the retrain (256-row steps, 1.5x reuse) and cheaper, faster-learning ones
    "starter": Variant(256, 1.5),
    "r1b256lr4": Variant(256, 1.0, 4e-3),
    "r1b256lr4aux": Variant(256, 1.0, 4e-3, k_aux=256, aux_coef=1 / 8, dead_tokens=10_000),
    "r1b256lr3aux": Variant(256, 1.0, 3e-3, k_aux=256, aux_coef=1 / 8, dead_tokens=10_000),
    "r1.5b256lr4aux": Variant(256, 1.5, 4e-3, k_aux=256, aux_coef=1 / 8, dead_tokens=10_000),
    # the starter's 1,764 steps on 128-row steps (half the rows: a step's fixed cost dominates)
    "r0.75b128": Variant(128, 0.75),
    "r1.5b128": Variant(128, 1.5),
}


@dataclasses.dataclass
class Acts:
    train: dict[Site, list[torch.Tensor]]  # per forward: [seqs, seq_len, d] (bf16)
    heldout: dict[Site, torch.Tensor]  # [rows, d], position 0 and outliers kept out later


def collect(lm, sites: list[Site], tokens: int, batch_tokens: int, seq_len: int,
            heldout_tokens: int) -> Acts:
    from tqdm.auto import tqdm
    taps = SiteTaps(lm, sites)
    seqs = batch_tokens // seq_len
    n_fwd = -(-tokens // batch_tokens)
    train = {s: [] for s in sites}
    held = {s: [] for s in sites}
    with taps.installed():
        batches = token_batches(lm.tokenizer, seq_len, seqs, "default", "train", seed=0,
                                repeat=True)
        for _ in tqdm(range(n_fwd), desc="collecting train activations"):
            out = taps.record(next(batches))
            for s in sites:
                train[s].append(out[s].to(torch.bfloat16))
        for i, ids in enumerate(token_batches(lm.tokenizer, seq_len, seqs, "default", "heldout",
                                              seed=0)):
            if i * batch_tokens >= heldout_tokens:
                break
            out = taps.record(ids)
            for s in sites:
                held[s].append(out[s][:, 1:].reshape(-1, lm.d_model).float())
    return Acts(train, {s: torch.cat(v) for s, v in held.items()})


def train_one(chunks: list[torch.Tensor], d: int, v: Variant, seed: int,
              k: int = 32, buffer_tokens: int = 8192) -> TopKTrainer:
    sae_batch, reuse, lr = v.sae_batch, v.reuse, v.lr
    per_fwd = chunks[0].shape[0] * chunks[0].shape[1]
    t = TopKTrainer(d, v.width, k, k_aux=v.k_aux, aux_coef=v.aux_coef,
                    dead_tokens=v.dead_tokens, seed=seed,
                    buffer_rows=buffer_tokens if sae_batch else 0)
    spf = max(1, round(reuse * per_fwd / sae_batch)) if sae_batch else 1
    total = len(chunks) * spf
    warm, decay = 10, max(1, int(0.2 * total))
    step = 0
    for h in chunks:
        if not sae_batch:
            batches = [t.prepare(h)]
        else:
            t.add(h)
            batches = (t.sample(sae_batch) for _ in range(spf))
        for x in batches:
            lr_t = lr * min(1.0, (step + 1) / warm) * min(1.0, (total - step) / decay)
            t.step(x, lr_t)
            step += 1
    return t


def unit(W):
    return torch.nn.functional.normalize(W.float(), dim=-1)


def evaluate(t: TopKTrainer, x_ND: torch.Tensor) -> tuple[float, float, float]:
    """Held-out FVU, dead share (never fire), and how narrowly the dead latents lose: the
    median over dead latents of their largest pre-activation, over the median k-th value."""
    sae = t.sae()
    keep = x_ND.norm(dim=-1) <= t.max_norm
    x = x_ND[keep]
    with torch.no_grad():
        pre = sae.pre_acts(x).float()
        z = sae.activate(pre)
        x_hat = sae.decode(z)
    fvu = float((x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    dead_F = (z > 0).sum(0) == 0
    kth = pre.topk(sae.k, dim=-1).values[:, -1].median()
    margin = float(pre.max(0).values[dead_F].median() / kth) if dead_F.any() else float("nan")
    return fvu, float(dead_F.float().mean()), margin


def top1(A, B) -> torch.Tensor:
    return cosine_topk(unit(A), unit(B), 1).values[:, 0]


def run(args) -> list[dict]:
    from saeflow.compute import model_dtype
    from saeflow.models import load_model
    sites = [Site.parse(s) for s in args.sites.split(",")]
    unknown = [n for n in args.variants.split(",") if n not in VARIANTS]
    if len(sites) < 2:
        raise SystemExit(f"--sites needs two adjacent sites first, got {args.sites!r}")
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; known: {', '.join(VARIANTS)}")
    tune_malloc()
    lm = load_model("smollm2", dtype=model_dtype("auto", "cpu"))  # as saeflow train loads it
    t0 = time.perf_counter()
    key = (args.sites, args.tokens, args.batch_tokens, args.heldout_tokens)
    cached = torch.load(args.cache, weights_only=False) if args.cache and \
        os.path.exists(args.cache) else None
    if cached is not None and cached["key"] == key:
        acts = cached["acts"]
    else:
        acts = collect(lm, sites, args.tokens, args.batch_tokens, 256, args.heldout_tokens)
        if args.cache:
            torch.save({"key": key, "acts": acts}, args.cache + ".tmp")
            os.replace(args.cache + ".tmp", args.cache)
    how = "collected" if cached is None or cached["key"] != key else f"read from {args.cache}"
    print(f"activations of {args.tokens:,} tokens at {len(sites)} sites {how} in "
          f"{time.perf_counter() - t0:.0f} s")
    a, b, *extra = sites
    rows = []
    torch.set_num_threads(1)
    for name in args.variants.split(","):
        v = VARIANTS[name]
        t0 = time.perf_counter()
        jobs = [(a, 1), (b, 2), (b, 7)] + [(s, 3) for s in extra]
        with ThreadPoolExecutor(2) as pool:
            ta, tb, tb2, *te = pool.map(
                lambda j: train_one(acts.train[j[0]], lm.d_model, v, j[1]), jobs)
        wall = time.perf_counter() - t0
        fvu, dead, margin = evaluate(tb, acts.heldout[b])
        adj = top1(tb.params.W_dec_FD.detach(), ta.params.W_dec_FD.detach())
        seed_cos = top1(tb.params.W_dec_FD.detach(), tb2.params.W_dec_FD.detach())
        init = init_params(lm.d_model, v.width, torch.Generator().manual_seed(2)).W_dec_FD
        moved = (unit(tb.params.W_dec_FD.detach()) * init).sum(-1)
        row = {"variant": name, "sae_batch": v.sae_batch or args.batch_tokens, "reuse": v.reuse,
               "lr": v.lr, "width": v.width, "k_aux": v.k_aux, "aux_coef": round(v.aux_coef, 4),
               "adam_steps": tb.steps,
               "heldout_fvu": round(fvu, 4), "dead": round(dead, 4),
               "dead_margin": round(margin, 3),
               "adj_top1_median": round(float(adj.median()), 3),
               "adj_ge_0.5": round(float((adj >= 0.5).float().mean()), 3),
               "adj_ge_0.7": round(float((adj >= 0.7).float().mean()), 3),
               "seed_stable_ge_0.7": round(float((seed_cos >= 0.7).float().mean()), 3),
               "dec_cos_to_init": round(float(moved.median()), 3)}
        for s, t in zip(extra, te):
            fvu_s, dead_s, margin_s = evaluate(t, acts.heldout[s])
            row[f"{s}_fvu"], row[f"{s}_dead"] = round(fvu_s, 4), round(dead_s, 4)
            row[f"{s}_dead_margin"] = round(margin_s, 3)
        row["train_seconds"] = round(wall, 1)
        rows.append(row)
        print(row, flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sites", default="11/res,12/res",
                    help="two adjacent sites, then optional others trained once for FVU and "
                         "dead latents (e.g. 11/res,12/res,12/att)")
    ap.add_argument("--tokens", type=int, default=300_000)
    ap.add_argument("--batch-tokens", type=int, default=1024)
    ap.add_argument("--heldout-tokens", type=int, default=16_384)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--cache", default=None,
                    help="keep the collected activations in this file and reuse them when the "
                         "sites and token counts match (about 0.35 GB per site at 300k tokens)")
    ap.add_argument("--out", default=None, help="also write the table as CSV")
    args = ap.parse_args()
    rows = run(args)
    keys = list(rows[0])
    print("\n" + " | ".join(keys))
    for r in rows:
        print(" | ".join(str(r[k]) for k in keys))
    if args.out:
        with open(args.out, "w", newline="") as f:
            w = csv.DictWriter(f, keys)
            w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
