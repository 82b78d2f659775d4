"""Theme retrieval without embedding the whole corpus: the per-text embedding cache (only new
texts are embedded, shards resume an interrupted run and are merged), the lexical index (terms,
BM25 order, feedback terms) and the shortlist, which finds the exact rule's paragraphs on a
planted corpus, including paragraphs that never use the description's word."""

from __future__ import annotations

import random

import pytest
import torch

from saeflow import retrieval
from saeflow.retrieval import EmbeddingCache, LexicalIndex, retrieve, terms

TOPICS = {
    "wedding": "wedding bride groom vows ceremony marriage married bouquet reception honeymoon",
    "football": "football goal striker league match referee stadium penalty midfielder coach",
    "cooking": "recipe oven flour butter simmer garlic onion pastry dough sauce",
    "weather": "rain storm forecast cloud thunder humidity drizzle wind frost sunshine",
    "finance": "market shares investor profit bank interest bonds inflation trading revenue",
}
FILLER = "people often found quite early later around another every during".split()


def planted_embed():
    """A sentence embedder in miniature: each word is its topic's direction plus a word's own
    part, a text the normalised sum of its words (so 'bride groom' is near 'wedding')."""
    g = torch.Generator().manual_seed(0)
    topic_dir = {t: torch.randn(32, generator=g) for t in TOPICS}
    vec = {}
    for t, words in TOPICS.items():
        for w in words.split():
            vec[w] = topic_dir[t] + 0.6 * torch.randn(32, generator=g)
    for w in FILLER:
        vec[w] = 0.8 * torch.randn(32, generator=g)

    def embed(texts):
        out = torch.zeros(len(texts), 32)
        for i, t in enumerate(texts):
            for w in t.lower().split():
                if w in vec:
                    out[i] += vec[w]
        return out / out.norm(dim=1, keepdim=True).clamp_min(1e-9)
    embed.name = "planted"
    return embed


def planted_corpus(n_per_topic: int = 120, n_wedding: int = 40, seed: int = 0) -> list[str]:
    """Paragraphs of one topic's words plus filler; the wedding topic is rare (under 10% of
    the corpus) and half its paragraphs never say 'wedding'."""
    rng = random.Random(seed)
    out = []
    for t, words in TOPICS.items():
        ws = words.split()
        for k in range(n_wedding if t == "wedding" else n_per_topic):
            pool = ws[1:] if (t == "wedding" and k % 2) else ws
            out.append(" ".join(rng.choices(pool, k=rng.randint(2, 6))
                                + rng.choices(FILLER, k=6)))
    rng.shuffle(out)
    return list(dict.fromkeys(out))


def test_terms_drop_stop_words_and_share_stems():
    assert terms("The weddings and a wedding of religious religion") == \
        ["weddi", "weddi", "relig", "relig"]
    assert terms("of to it") == []


def test_bm25_ranks_by_term_weight_and_feedback_adds_cooccurring_words():
    texts = ["bride and groom at the wedding", "the wedding wedding wedding day",
             "a football match", "bride groom vows", "storm and rain",
             "wedding bride groom reception"]
    idx = LexicalIndex(texts)
    s = idx.scores({"weddi": 1.0})
    assert s[1] > s[0] > 0 and s[2] == s[3] == s[4] == 0 and s[5] > 0
    both = idx.scores({"weddi": 1.0, "bride": 1.0})
    assert both[0] > both[1]  # two matching words beat one repeated (saturation)
    cands = idx.feedback_terms([0, 1, 3])
    assert {"bride": "bride", "groom": "groom", "weddi": "wedding", "vows": "vows"}.items() \
        <= cands.items() and "footb" not in cands
    # words in two paragraphs or more (vows, day and reception are in one each)
    assert set(idx.feedback_terms([0, 1, 3, 5], least=2)) == {"bride", "groom", "weddi"}
    assert list(idx.feedback_terms([0, 1, 3, 5], n=2)) == ["bride", "groom"]  # by idf x share


def test_cache_embeds_only_new_texts_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setattr(retrieval, "CHUNK", 4)
    calls = []

    def embed(texts):
        calls.append(list(texts))
        return torch.stack([torch.tensor([len(t), 1.0 / 3]) for t in texts])
    texts = [f"text number {i}" * (i + 1) for i in range(10)]
    cache = EmbeddingCache(embed, tmp_path)
    E = cache.get(texts[:6])
    assert [len(c) for c in calls] == [4, 2] and cache.computed == 6
    assert torch.equal(E, embed(texts[:6]).half().float())  # as stored: half precision
    calls.clear()
    again = EmbeddingCache(embed, tmp_path).get(texts[2:8])  # a new process, same folder
    assert [len(c) for c in calls] == [2] and torch.equal(again[:4], E[2:6])

    class Killed(Exception):
        pass

    def failing(texts):  # dies on its second chunk: the first stays cached
        if calls:
            raise Killed
        calls.append(list(texts))
        return embed(texts)
    more = texts + ["x1", "x2", "x3", "x4", "x5"]  # 7 not cached yet: chunks of 4 and 3
    calls.clear()
    with pytest.raises(Killed):
        EmbeddingCache(failing, tmp_path).get(more)
    calls.clear()
    EmbeddingCache(embed, tmp_path).get(more)
    assert [len(c) for c in calls] == [3]  # only what the killed run had not saved
    monkeypatch.setattr(retrieval, "MAX_SHARDS", 2)
    EmbeddingCache(embed, tmp_path).get(["one more"])
    shards = list(tmp_path.glob("*.pt"))
    assert len(shards) == 1  # merged
    calls.clear()
    assert torch.equal(EmbeddingCache(embed, tmp_path).get(texts[:6]), E) and not calls


def test_shortlist_finds_the_exact_rules_paragraphs_embedding_a_fraction(tmp_path):
    embed, corpus = planted_embed(), planted_corpus()
    exact = retrieve("wedding", corpus, embed, 30, 30, cache=EmbeddingCache(embed, tmp_path / "a"),
                     full_limit=len(corpus))
    cache = EmbeddingCache(embed, tmp_path / "b")
    top, sims, bg, info = retrieve("wedding", corpus, embed, 30, 30, cache=cache, full_limit=100)
    assert info["method"] == "shortlist" and info["lexical"]
    assert set(top) == set(exact[0]) and sims == sorted(sims, reverse=True)
    assert cache.computed == info["embedded"] + info["words"]
    assert info["embedded"] < 0.75 * len(corpus)
    silent = [i for i in top if "wedding" not in corpus[i]]
    assert len(silent) >= 10  # found only through the feedback round
    weddingish = set(TOPICS["wedding"].split())
    assert len(bg) == 30 and not set(bg) & set(top)
    assert not any(weddingish & set(corpus[i].split()) for i in bg)  # all below the cut
    # a description the corpus never uses: the random first round still leads to the theme
    far = retrieve("matrimony", corpus, embed, 20, 30, cache=cache, full_limit=100)
    assert not far[3]["lexical"]


def test_build_theme_on_a_large_corpus_embeds_a_shortlist(tmp_path, monkeypatch):
    from saeflow.themes import build_theme
    monkeypatch.setenv("SAEFLOW_CACHE", str(tmp_path))
    monkeypatch.setattr(retrieval, "FULL_LIMIT", 100)
    embed, corpus = planted_embed(), planted_corpus()
    th = build_theme("football", corpus=corpus, embed=embed, n_theme=12, n_background=20)
    assert th.retrieval["method"] == "shortlist"
    assert th.retrieval["embedded"] < len(corpus)
    assert all(set(t.split()) & set(TOPICS["football"].split()) for t in th.texts)
    assert (tmp_path / "embeddings" / "planted").is_dir()
