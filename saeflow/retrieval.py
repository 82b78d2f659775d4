"""Retrieving a theme's paragraphs from a large corpus without embedding all of it (method.md
section 6: the theme text that seeds steering; saeflow's choices, the paper retrieves nothing).

The exact rule (``saeflow.themes.build_theme``): the ``n`` paragraphs nearest to the theme
description under the sentence embedder, and background drawn from the 90% of the corpus least
similar to it. Embedding the whole bundled corpus (18,925 paragraphs) takes minutes on two
cores, so for corpora above ``FULL_LIMIT`` paragraphs only a shortlist is embedded:
  1. lexical round: BM25 (k1 1.2, b 0.75) of the description's words against every paragraph;
     words are lower-cased letter runs of 3+ letters, stop words dropped, cut to their first
     5 letters (a crude stemmer: wedding/weddings, religion/religious, science/scientific);
     the ``4 n`` best (at least 128) are embedded. Nothing lexical matches: a seeded random
     sample of as many is embedded instead;
  2. two feedback rounds (pseudo-relevance feedback): the words of the ``n / 2`` (at least 8)
     embedded paragraphs nearest to the description, the 300 best by idf x the share of those
     paragraphs containing them, are embedded as words (a few tokens each, so cheap) and the
     24 nearest to the description whose cosine exceeds the candidates' median expand the
     query, weighted by that excess (the description's words at the top weight); the ``6 n``
     (at least 192), then in the second round ``2 n`` (at least 64) best of that BM25 not yet
     embedded are embedded too;
  3. the ``n`` nearest of everything embedded are the theme paragraphs (exact cosines, so the
     result equals the exact rule whenever the true nearest ``n`` are on the shortlist);
  4. background: the corpus in a seeded random order; the first ``max(2 m, 200)`` paragraphs
     (m = background size) outside the theme are embedded, the 0.9 quantile of their
     similarities estimates the corpus' cut, and the first m below it are the background (a
     uniform sample of a uniform sample below the cut is a uniform sample below the cut).
Paragraph embeddings are cached per text (``EmbeddingCache``: shards of at most ``CHUNK`` rows
under the cache directory, written as they are computed, so an interrupted run resumes), in
half precision (the first run and later runs compute the same similarities).
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from saeflow.io import atomic_path, cache_dir, file_lock

Embedder = Callable[[Sequence[str]], Tensor]  # texts -> [n, D] unit rows
FULL_LIMIT = 2000  # corpora up to this many paragraphs are embedded whole
CHUNK = 256  # paragraphs per cache shard
MAX_SHARDS = 64  # more than this: merged into one
BACKGROUND_QUANTILE = 0.9
STOPWORDS = frozenset(
    "the and for are but not you all any can had her was one our out has his how its may new "
    "now old see two who did get him let put say she too use that with have this will your from "
    "they been were said each which their there what about would these other into more some "
    "than them then also when only over such after most made many before being where those "
    "while could should very just like because between through during under again further "
    "against both same own here once off".split())


# ---- the embedding cache ------------------------------------------------------------------------
class EmbeddingCache:
    """Embeddings of texts under one embedder, keyed by a hash of the text."""

    def __init__(self, embed: Embedder, folder: str | Path | None = None):
        name = getattr(embed, "name", "embed")
        slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "embed"
        self.embed = embed
        self.folder = Path(folder) if folder else cache_dir() / "embeddings" / slug
        self._rows: dict[str, Tensor] | None = None
        self.computed = 0  # texts embedded (not found in the cache) by this object

    @staticmethod
    def key(text: str) -> str:
        return hashlib.sha1(text.encode("utf-8")).hexdigest()[:24]

    def _load(self) -> dict[str, Tensor]:
        if self._rows is None:
            self._rows = {}
            for path in sorted(self.folder.glob("*.pt")):
                try:
                    shard = torch.load(path)
                except (FileNotFoundError, RuntimeError, EOFError):
                    continue  # merged away or being replaced by another process
                self._rows.update(zip(shard["keys"], shard["E"]))
        return self._rows

    def _save(self, keys: list[str], E: Tensor) -> None:
        name = hashlib.sha1("".join(keys).encode()).hexdigest()[:20]
        with atomic_path(self.folder / f"{name}.pt") as tmp:
            torch.save({"keys": keys, "E": E.contiguous()}, tmp)

    def _compact(self) -> None:
        shards = sorted(self.folder.glob("*.pt"))
        if len(shards) <= MAX_SHARDS:
            return
        with file_lock(self.folder / ".lock"):
            self._rows = None
            rows = self._load()
            keys = list(rows)
            self._save(keys, torch.stack([rows[k] for k in keys]))
            keep = self.folder / f"{hashlib.sha1(''.join(keys).encode()).hexdigest()[:20]}.pt"
            for p in shards:
                if p != keep:
                    p.unlink(missing_ok=True)

    def get(self, texts: Sequence[str], progress: bool | None = None) -> Tensor:
        """``[n, D]`` float rows (rounded through half precision), embedding only the texts not
        cached yet, ``CHUNK`` at a time, each chunk saved as soon as it is done."""
        rows = self._load()
        keys = [self.key(t) for t in texts]
        todo = list(dict.fromkeys(k for k in keys if k not in rows))
        if todo:
            from tqdm.auto import tqdm
            first = dict(zip(keys, texts))
            show = len(todo) > CHUNK if progress is None else progress
            bar = tqdm(total=len(todo), desc="embedding paragraphs", unit="text",
                       disable=not show)
            for i in range(0, len(todo), CHUNK):
                part = todo[i:i + CHUNK]
                E = self.embed([first[k] for k in part]).float().cpu().half()
                self._save(part, E)
                rows.update(zip(part, E))
                self.computed += len(part)
                bar.update(len(part))
            bar.close()
            self._compact()
        if not keys:
            return torch.zeros(0, 0)
        return torch.stack([rows[k] for k in keys]).float()


# ---- the lexical index --------------------------------------------------------------------------
def terms(text: str) -> list[str]:
    """The index terms of a text (module docstring, step 1)."""
    return [w[:5] for w in re.findall(r"[a-z]+", text.lower())
            if len(w) >= 3 and w not in STOPWORDS]


class LexicalIndex:
    """BM25 over paragraphs: postings per term, document lengths, idf."""

    def __init__(self, texts: Sequence[str], k1: float = 1.2, b: float = 0.75):
        self.texts, self.k1, self.b = list(texts), k1, b
        docs, tfs, lengths = {}, {}, np.zeros(len(self.texts))
        for i, t in enumerate(self.texts):
            c = Counter(terms(t))
            lengths[i] = sum(c.values())
            for w, n in c.items():
                docs.setdefault(w, []).append(i)
                tfs.setdefault(w, []).append(n)
        self.postings = {w: (np.array(d), np.array(tfs[w], dtype=np.float64))
                         for w, d in docs.items()}
        self.norm = k1 * (1 - b + b * lengths / max(lengths.mean(), 1e-9))
        n = len(self.texts)
        self.idf = {w: math.log(1 + (n - len(d) + 0.5) / (len(d) + 0.5))
                    for w, (d, _) in self.postings.items()}

    def scores(self, weights: dict[str, float]) -> np.ndarray:
        out = np.zeros(len(self.texts))
        for w, weight in weights.items():
            if w not in self.postings:
                continue
            d, tf = self.postings[w]
            out[d] += weight * self.idf[w] * tf * (self.k1 + 1) / (tf + self.norm[d])
        return out

    def feedback_terms(self, docs: Sequence[int], n: int = 300, least: int = 1
                       ) -> dict[str, str]:
        """Candidate expansion terms from ``docs``: ``{term: its commonest word there}``, the
        ``n`` best by idf x the share of ``docs`` containing them (in at least ``least`` of
        them)."""
        share, surface = Counter(), Counter()
        for i in docs:
            words = [w for w in re.findall(r"[a-z]+", self.texts[i].lower())
                     if len(w) >= 3 and w not in STOPWORDS]
            share.update({w[:5] for w in words})
            surface.update(words)
        weight = {t: self.idf[t] * c for t, c in share.items() if t in self.idf and c >= least}
        top = sorted(weight, key=lambda t: (-weight[t], t))[:n]
        word = {}
        for w, _ in surface.most_common():
            word.setdefault(w[:5], w)
        return {t: word[t] for t in top}


_INDEXES: dict[str, LexicalIndex] = {}


def lexical_index(texts: Sequence[str]) -> LexicalIndex:
    """The index of ``texts``, built once per process and corpus."""
    h = hashlib.sha1()
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\0")
    key = h.hexdigest()
    if key not in _INDEXES:
        if len(_INDEXES) >= 4:
            _INDEXES.pop(next(iter(_INDEXES)))
        _INDEXES[key] = LexicalIndex(texts)
    return _INDEXES[key]


# ---- retrieval ----------------------------------------------------------------------------------
def _expand(index: LexicalIndex, docs: list[int], query: dict[str, float],
            cache: EmbeddingCache, q: Tensor, n_terms: int = 24
            ) -> tuple[dict[str, float], list[str]]:
    """The query expanded with the feedback terms whose words the embedder puts nearest to
    the description (module docstring, step 2), and the words scored."""
    cands = index.feedback_terms(docs)
    if not cands:
        return dict(query), []
    cos = (cache.get(list(cands.values())) @ q).tolist()
    base = float(np.median(cos))
    ranked = sorted(zip(cands, cos), key=lambda x: -x[1])[:n_terms]
    out = {t: c - base for t, c in ranked if c > base}
    peak = max(out.values(), default=1.0)
    for t in query:
        out[t] = max(out.get(t, 0.0), peak)
    return out, list(cands.values())


def _top(scores: np.ndarray, k: int, exclude: set[int]) -> list[int]:
    order = np.argsort(-scores, kind="stable")
    return [int(i) for i in order if scores[i] > 0 and int(i) not in exclude][:k]


def retrieve(description: str, corpus: Sequence[str], embed: Embedder, n_theme: int,
             n_background: int, seed: int = 0, cache: EmbeddingCache | None = None,
             full_limit: int | None = None) -> tuple[list[int], list[float], list[int], dict]:
    """``(theme indices, their cosines, background indices, info)`` of ``corpus`` (module
    docstring); ``info`` says how many paragraphs were embedded. Corpora up to ``full_limit``
    (default ``FULL_LIMIT``) paragraphs are embedded whole."""
    cache = cache or EmbeddingCache(embed)
    full_limit = FULL_LIMIT if full_limit is None else full_limit
    q = embed([description])[0].float()
    rng = random.Random(seed)
    if len(corpus) <= full_limit:
        sim = cache.get(corpus) @ q
        top = sim.topk(min(n_theme, len(corpus))).indices.tolist()
        cut = float(sim.quantile(BACKGROUND_QUANTILE)) if len(corpus) > 1 else float("inf")
        chosen = set(top)
        rest = [i for i in range(len(corpus)) if i not in chosen and float(sim[i]) < cut]
        bg = rng.sample(rest, min(n_background, len(rest)))
        return (top, [float(sim[i]) for i in top], bg,
                {"method": "exact", "corpus": len(corpus), "embedded": len(corpus), "cut": cut})
    index = lexical_index(corpus)
    sims: dict[int, float] = {}

    def embed_some(idx: list[int]) -> None:
        new = [i for i in idx if i not in sims]
        if new:
            sims.update(zip(new, (cache.get([corpus[i] for i in new]) @ q).tolist()))

    query = {w: 1.0 for w in terms(description)}
    first = _top(index.scores(query), max(4 * n_theme, 128), set())
    lexical = bool(first)
    if not first:
        first = random.Random(seed + 1).sample(range(len(corpus)), min(len(corpus), 128))
    embed_some(first)
    words: set[str] = set()
    for size in (max(6 * n_theme, 192), max(2 * n_theme, 64)):  # two feedback rounds
        best = sorted(sims, key=lambda i: -sims[i])[:max(8, n_theme // 2)]
        expanded, scored = _expand(index, best, query, cache, q)
        words.update(scored)
        embed_some(_top(index.scores(expanded), size, set(sims)))
    shortlist = len(sims)
    top = sorted(sims, key=lambda i: (-sims[i], i))[:n_theme]
    chosen = set(top)
    order = list(range(len(corpus)))
    rng.shuffle(order)
    pool = [i for i in order if i not in chosen][:max(2 * n_background, 200)]
    embed_some(pool)
    cut = float(np.quantile([sims[i] for i in pool], BACKGROUND_QUANTILE)) if pool else math.inf
    bg = [i for i in pool if sims[i] < cut][:n_background]
    info = {"method": "shortlist", "corpus": len(corpus), "embedded": len(sims),
            "shortlist": shortlist, "lexical": lexical, "words": len(words),
            "expansion": sorted(expanded, key=lambda w: -expanded[w])[:12],
            "cut": cut}
    return top, [sims[i] for i in top], bg, info
