"""Deactivation throughput: batched ``run_deactivation`` versus a naive loop, in the same run.

    python bench/bench_deactivate.py                    # SmolLM2 + the starter suite if trained
    python bench/bench_deactivate.py --suite DIR        # any suite for SmolLM2
    python bench/bench_deactivate.py --tiny             # a tiny random Llama (seconds)

Batched: the whole experiment (clean pass, matching, Pearson baseline, edited reruns of the
target block only, many pairs per row). Naive: for a random subset of the same pairs, one full
forward pass of the whole model over the whole text per pair, with the edit hooked in
(``naive_target_acts``); the predecessor activations are given to it for free. Both use the
strategies top1, top5, random5, permutation and pearson (the exhaustive oracle needs one pass
per active feature, which would make the naive side look worse still). Without the starter
suite the SAEs are random top-k ones (width 8 x d_model, k 32): they fire like trained top-k
SAEs, so the throughput is representative even though the success rates are not.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from saeflow.deactivate import (  # noqa: E402
    DeactivationConfig, Edit, edit_delta, naive_target_acts, run_deactivation, tokenize_texts)
from saeflow.hooks import run_sites  # noqa: E402
from saeflow.sae import SAE  # noqa: E402
from saeflow.sites import Feature, Site  # noqa: E402
from saeflow.suite import Suite  # noqa: E402

STRATS = ("top1", "top5", "random5", "permutation", "pearson")


def random_topk_suite(lm, layers, k=32, seed=0) -> Suite:
    g = torch.Generator().manual_seed(seed)
    d, F = lm.d_model, 8 * lm.d_model
    saes = {}
    for L in layers:
        for site in (Site(L - 1, "res"), Site(L, "res"), Site(L, "mlp"), Site(L, "att")):
            W = torch.randn(F, d, generator=g)
            W /= W.norm(dim=1, keepdim=True)
            saes[site] = SAE(W_enc=W.T.clone(), b_enc=torch.zeros(F), W_dec=W, b_dec=torch.zeros(d),
                             activation="topk", k=k)
    return Suite.from_saes(saes, name="random-topk")


def tiny_setup(layers):
    from transformers import LlamaConfig, LlamaForCausalLM

    from saeflow.models import lm_from_model
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=max(layers) + 2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
    lm = lm_from_model(LlamaForCausalLM(cfg), name="tiny-llama")
    g = torch.Generator().manual_seed(1)
    ids = [torch.randint(0, 256, (64,), generator=g) for _ in range(48)]
    return lm, random_topk_suite(lm, layers, k=8), ids[:16], ids[16:]


def real_setup(args, layers):
    from saeflow.corpus import load_texts
    from saeflow.models import cache_dir, load_model
    from saeflow.catalog import load_suite

    starter = cache_dir() / "suites" / "smollm2-starter"
    path = args.suite or (starter if (starter / "suite.json").exists() else None)
    lm = load_model("smollm2", dtype=args.dtype)
    suite = load_suite(path) if path else random_topk_suite(lm, layers)
    texts = load_texts(split="heldout")
    random.Random(0).shuffle(texts)
    ids = tokenize_texts(lm, texts[:args.n_texts], 64)
    corr = tokenize_texts(lm, load_texts(split="train")[:200], 64)
    return lm, suite, ids, corr


def naive_edit(lm, suite, ids, pair, cache) -> tuple[Edit, int]:
    """The edit a pair made, rebuilt from its record and the clean activations."""
    feats = [Feature.parse(f) for f in pair.predecessors.split(";")]
    site = feats[0].site
    key = (pair.text, site)
    if key not in cache:
        cache[key] = suite[site].encode(run_sites(lm, ids[pair.text][None], [site])[site][0])
    idx = [f.index for f in feats]
    delta = edit_delta(cache[key][pair.position, idx].float(),
                       suite[site].steering_vectors().float()[idx], pair.r)
    return Edit(pair.text, pair.position, site, delta), Feature.parse(pair.target).index


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="a tiny random Llama instead of SmolLM2")
    p.add_argument("--suite", default=None, help="a suite folder for SmolLM2")
    p.add_argument("--layers", default="6,12,18")
    p.add_argument("--n-texts", type=int, default=35)
    p.add_argument("--tokens-per-text", type=int, default=5)
    p.add_argument("--max-pairs", type=int, default=3000)
    p.add_argument("--naive-pairs", type=int, default=24)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    layers = tuple(int(x) for x in args.layers.split(","))
    if args.tiny:
        layers = (1, 2)
        lm, suite, ids, corr = tiny_setup(layers)
    else:
        lm, suite, ids, corr = real_setup(args, layers)
    print(f"model {lm.name} ({lm.n_layers} layers, d {lm.d_model}, {args.dtype}); suite "
          f"{suite.name}; torch threads {torch.get_num_threads()}")
    cfg = DeactivationConfig(layers=layers, strategies=STRATS, tokens_per_text=args.tokens_per_text,
                             max_pairs=args.max_pairs)
    t0 = time.perf_counter()
    res = run_deactivation(lm, suite, ids, corr, cfg, progress=False)
    t_fast = time.perf_counter() - t0
    per_layer = res.info["layers"].values()
    rows = sum(v["edited_rows"] for v in per_layer)
    rerun_s = sum(v["rerun_seconds"] for v in per_layer)
    match_s = sum(v["match_seconds"] for v in per_layer)
    sample = random.Random(1).sample(res.pairs, min(args.naive_pairs, len(res.pairs)))
    cache: dict = {}
    built = [naive_edit(lm, suite, ids, q, cache) for q in sample]
    t0 = time.perf_counter()
    z = [float(naive_target_acts(lm, ids, e, q.layer, suite[Site(q.layer, "res")])[j])
         for (e, j), q in zip(built, sample)]
    t_naive = time.perf_counter() - t0
    err = max(abs(a - q.z_new) / max(q.z_old, 1e-6) for a, q in zip(z, sample))
    fast_rate, naive_rate = len(res.pairs) / t_fast, len(sample) / t_naive
    print(f"\n{'method':<44}{'pairs':>8}{'seconds':>10}{'pairs/s':>10}{'ratio':>8}")
    print(f"{'naive: full forward per pair':<44}{len(sample):>8}{t_naive:>10.2f}"
          f"{naive_rate:>10.1f}{1.0:>8.1f}")
    print(f"{'batched run_deactivation (end to end)':<44}{len(res.pairs):>8}{t_fast:>10.2f}"
          f"{fast_rate:>10.1f}{fast_rate / naive_rate:>8.1f}")
    print(f"{'batched: edited reruns only':<44}{len(res.pairs):>8}{rerun_s:>10.2f}"
          f"{len(res.pairs) / rerun_s:>10.1f}{len(res.pairs) / rerun_s / naive_rate:>8.1f}")
    print(f"(end to end includes the clean and correlation passes and {match_s:.1f} s of matching:"
          f" cosine top-k, permutation LAP, Pearson)")
    print(f"\n{rows} edited rows for {len(res.pairs)} pairs over layers {list(layers)}; "
          f"naive vs batched target activation, max relative difference: {err:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
