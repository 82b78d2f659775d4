"""Benchmark: promoted-token labels of a suite, the plain way versus the prepared one, next to
the suite's matching, all in one run.

    python bench/bench_labels.py                  # the SmolLM2 starter suite, every layer
    python bench/bench_labels.py --layers 0-9     # a subset (faster)

Measured in the same run, on the same sites:
  1. the plain path (``LM.promoted_tokens`` per site: the fp32 product with the whole
     unembedding, 1,024 rows at a time, then top-k);
  2. the prepared path (``lens.Unembedding``: the unembedding prepared once for every site,
     bf16 tiles with a bounded running shortlist, fp32 re-scoring, all k ranks certified;
     one pass per layer), and whether its tokens equal the plain path's for every feature;
  3. ``compute_atlas`` of those layers without labels (the matching and nulls) and with the
     prepared labels (no contexts), so the whole atlas can be set against its matching.
The machine may be shared: each row says the load average when it ran.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from saeflow.atlas import compute_atlas, layer_sources  # noqa: E402
from saeflow.lens import Unembedding  # noqa: E402
from saeflow.match import residual_decoder  # noqa: E402


def subset(suite, layers: list[int]):
    """The suite restricted to some layers (the same SAE folders)."""
    from saeflow.suite import Suite
    name = f"{suite.name}-layers-{'-'.join(map(str, layers))}"[:80]
    return Suite(paths={s: p for s, p in suite.paths.items() if s.layer in layers},
                 model=suite.model, name=name, root=suite.root, info=suite.info)


def parse_layers(text: str) -> list[int]:
    out: set[int] = set()
    for part in text.split(","):
        a, _, b = part.partition("-")
        out.update(range(int(a), int(b or a) + 1))
    return sorted(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--suite", default="starter")
    ap.add_argument("--layers", default=None, help="e.g. 0-9 or 3,12,25 (default: all)")
    ap.add_argument("--k", type=int, default=6, help="tokens per label (the atlas's default)")
    args = ap.parse_args()

    from saeflow.catalog import load_suite
    suite = load_suite(args.suite)
    lm = suite.load_model()
    all_layers = sorted(layer_sources(suite.sites()))
    layers = all_layers if args.layers is None else [L for L in parse_layers(args.layers)
                                                     if L in all_layers]
    sub = subset(suite, layers)
    by_layer = {L: [s for s in sub.sites() if s.layer == L and s.kind != "att_z"] for L in layers}
    n_sites = sum(len(v) for v in by_layer.values())
    n_feat = sum(suite[s].d_sae for v in by_layer.values() for s in v)
    vocab, d = lm.unembed()[1].shape
    print(f"{suite.name}: {len(layers)} layers, {n_sites} sites, {n_feat:,} features; "
          f"unembedding {vocab:,} x {d}; {os.cpu_count()} CPUs")

    loads = {}
    dirs = {L: [residual_decoder(suite, s, lm) for s in by_layer[L]] for L in layers}

    loads["plain"] = os.getloadavg()[0]
    t0 = time.perf_counter()
    plain = {L: [lm.promoted_tokens(x, k=args.k) for x in dirs[L]] for L in layers}
    t_plain = time.perf_counter() - t0

    loads["prepared"] = os.getloadavg()[0]
    t0 = time.perf_counter()
    unembedding = Unembedding(lm)
    t_prep = time.perf_counter() - t0
    fast = {L: unembedding.promoted_many(dirs[L], k=args.k) for L in layers}
    t_fast = time.perf_counter() - t0
    same = sum(a == b for L in layers for x, y in zip(plain[L], fast[L]) for a, b in zip(x, y))

    tmp = Path(tempfile.mkdtemp(prefix="bench-labels-"))
    loads["matching"] = os.getloadavg()[0]
    t0 = time.perf_counter()
    bare = compute_atlas(sub, tmp / "matching", labels=False, progress=False)
    t_bare = time.perf_counter() - t0
    loads["atlas"] = os.getloadavg()[0]
    t0 = time.perf_counter()
    full = compute_atlas(sub, tmp / "labelled", lm, progress=False)
    t_full = time.perf_counter() - t0
    match_s = full.info["match_seconds"]

    print()
    print("| step | seconds | load average at start |")
    print("|---|---|---|")
    print(f"| labels, plain fp32 product per site (before) | {t_plain:.1f} | {loads['plain']:.1f} |")
    print(f"| labels, prepared unembedding ({unembedding.precision}; preparing it: "
          f"{t_prep:.1f} s) | {t_fast:.1f} | {loads['prepared']:.1f} |")
    print(f"| atlas without labels (matching {bare.info['match_seconds']:.1f} s) | "
          f"{t_bare:.1f} | {loads['matching']:.1f} |")
    print(f"| atlas with prepared labels (matching {match_s:.1f} s, labels "
          f"{full.info['label_seconds_this_run']:.1f} s) | {t_full:.1f} | {loads['atlas']:.1f} |")
    print()
    print(f"labels: {t_plain / t_fast:.2f}x faster; tokens equal the plain path's for "
          f"{same:,} of {n_feat:,} features ({same / n_feat:.2%}); rows recomputed exactly "
          f"{unembedding.stats.get('exact_rows', 0):,}, keys re-scored per row "
          f"{unembedding.stats.get('rescored_keys', 0) / max(unembedding.stats.get('rows', 1), 1):.1f}")
    print(f"whole atlas / its matching: {t_full / match_s:.2f}x with prepared labels; "
          f"labels / matching: before {t_plain / match_s:.2f}x, now {t_fast / match_s:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
