"""Theme retrieval: the shortlist (``saeflow.retrieval``) against embedding the whole corpus.

On a seeded random sub-corpus of the bundled text (``--n-corpus`` paragraphs, so the exact
baseline fits in minutes), both rules run from empty caches, in the same process: wall and
CPU seconds, paragraphs embedded, and how many of the exact rule's ``--n-theme`` nearest
paragraphs the shortlist finds (recall). Then the shortlist alone on the whole corpus, per
theme (what ``saeflow demo`` and ``steer-eval`` pay before their first result).

    python bench/bench_themes.py --n-corpus 3000
"""

from __future__ import annotations

import argparse
import random
import resource
import tempfile
import time

THEMES = ("weddings", "sports", "religion", "anger", "scientific concepts and entities",
          "cooking and recipes", "space exploration")


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description="Theme retrieval: shortlist against exact.")
    ap.add_argument("--n-corpus", type=int, default=3000)
    ap.add_argument("--n-theme", type=int, default=32)
    ap.add_argument("--n-background", type=int, default=96)
    ap.add_argument("--themes", default=",".join(THEMES))
    ap.add_argument("--no-full", action="store_true", help="skip the whole-corpus shortlist runs")
    ap.add_argument("--exact-cache", default=None,
                    help="keep the exact rule's embeddings in this folder (a re-run then times "
                         "the cached baseline, not the embedding)")
    args = ap.parse_args()

    from saeflow.corpus import load_texts
    from saeflow.retrieval import EmbeddingCache, retrieve
    from saeflow.themes import sentence_embedder

    themes = [t.strip() for t in args.themes.split(",") if t.strip()]
    embed = sentence_embedder()
    embed(["warm up"])
    corpus = load_texts("default", "train")
    sub = random.Random(0).sample(corpus, min(args.n_corpus, len(corpus)))
    print(f"sub-corpus: {len(sub)} of {len(corpus)} paragraphs; n_theme {args.n_theme}")
    runs = {}
    for rule, limit in (("shortlist", 0), ("exact", len(sub))):
        with tempfile.TemporaryDirectory() as tmp:
            keep = args.exact_cache if rule == "exact" and args.exact_cache else tmp
            cache = EmbeddingCache(embed, keep)
            t, c = time.perf_counter(), cpu()
            out = {th: retrieve(th, sub, embed, args.n_theme, args.n_background, cache=cache,
                                full_limit=limit) for th in themes}
            runs[rule] = (out, time.perf_counter() - t, cpu() - c, cache.computed)
    (short, ws, cs, ns), (exact, we, ce, ne) = runs["shortlist"], runs["exact"]
    print(f"{'rule':<10} {'wall s':>8} {'cpu s':>8} {'embedded':>9}")
    print(f"{'exact':<10} {we:8.1f} {ce:8.1f} {ne:9d}")
    print(f"{'shortlist':<10} {ws:8.1f} {cs:8.1f} {ns:9d}   ratio wall {ws / we:.3f}, "
          f"cpu {cs / ce:.3f}")
    print(f"\n{'theme':<34} {'recall':>7} {'top-8':>6} {'mean cos':>15} {'cut':>13}  "
          "expansion")
    for th in themes:
        (got, gs, _, info), (want, ws_, _, einfo) = short[th], exact[th]
        r = len(set(got) & set(want)) / len(want)
        r8 = len(set(got) & set(want[:8])) / min(8, len(want))
        print(f"{th:<34} {r:7.2f} {r8:6.2f} {sum(gs) / len(gs):7.3f}/{sum(ws_) / len(ws_):.3f} "
              f"{info['cut']:6.3f}/{einfo['cut']:.3f}  {' '.join(info['expansion'][:8])}")
    print("(recall: of the exact rule's theme paragraphs; top-8: of its 8 nearest; mean cos and "
          "the background cut: shortlist / exact)")
    if args.no_full:
        return
    print(f"\nwhole corpus ({len(corpus)} paragraphs), shortlist, a fresh cache per theme:")
    for th in themes[:3]:
        with tempfile.TemporaryDirectory() as tmp:
            cache = EmbeddingCache(embed, tmp)
            t, c = time.perf_counter(), cpu()
            top, sims, bg, info = retrieve(th, corpus, embed, args.n_theme, args.n_background,
                                           cache=cache)
            print(f"  {th:<12} {time.perf_counter() - t:6.1f} s wall {cpu() - c:6.1f} s cpu, "
                  f"{info['embedded']} embedded; nearest: {corpus[top[0]][:70]!r}")


if __name__ == "__main__":
    main()
