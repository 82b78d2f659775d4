"""Theme features: the contrast statistic, retrieval, padding-free text states, a planted theme
feature found on a tiny model, and seeds chosen for specificity (planted, on themes no other test
names), the theme split into disjoint halves."""

from __future__ import annotations

import json
import math

import pytest
import torch

from saeflow.hooks import recording
from saeflow.sae import SAE
from saeflow.sites import Site
from saeflow.suite import Suite
from saeflow.themes import (build_theme, contrast_scores, default_site, feature_label,
                            rank_features, seed_scores, split_theme, text_states)
from test_evaluate import OTHER, WEDDING, toy_embed
from test_steer import D, char_lm, tiny_suite


@pytest.fixture(scope="module")
def lm():
    return char_lm()


def test_contrast_scores_known_order():
    theme = torch.tensor([[2.0, 0.0, 1.0, 0.0, 0.5],
                          [2.2, 0.1, 1.0, 3.0, 1.5],
                          [1.8, 0.0, 1.0, 0.0, 1.0]])
    bg = torch.tensor([[0.0, 1.0, 1.0, 0.0, 0.0],
                       [0.1, 1.2, 1.0, 0.0, 0.0],
                       [0.0, 0.8, 1.0, 0.0, 0.0]])
    s = contrast_scores(theme, bg)
    assert s.argmax() == 0 and s[1] < 0 and s[2] == 0
    assert s[4] > s[3]  # steady on every theme text beats one burst on a single text
    with pytest.raises(ValueError, match="at least"):
        contrast_scores(theme, bg[:1])


def test_build_theme_retrieves_nearest_paragraphs(tmp_path, monkeypatch):
    monkeypatch.setenv("SAEFLOW_CACHE", str(tmp_path))
    corpus = OTHER + WEDDING + ["A lighthouse keeper lived alone on the island."]
    calls = []

    def counting_embed(texts):
        calls.append(len(texts))
        return toy_embed(texts)
    th = build_theme("bride groom wedding ceremony vows", corpus=corpus, embed=counting_embed,
                     n_theme=3, n_background=5, seed=1)
    again = build_theme("bride groom wedding ceremony vows", corpus=corpus, embed=counting_embed,
                        n_theme=3, n_background=5, seed=1)
    assert calls == [1, len(corpus), 1] and again == th  # corpus embeddings come from the cache
    assert len(list((tmp_path / "embeddings").iterdir())) == 1
    assert set(th.texts) <= set(WEDDING) and len(th.texts) == 3
    assert th.similarities == sorted(th.similarities, reverse=True)
    assert len(th.background) == 5 and not set(th.background) & set(th.texts)
    one = build_theme("bride groom wedding ceremony vows", corpus=corpus, embed=toy_embed,
                      n_theme=1, n_background=100)
    sim = toy_embed(corpus) @ toy_embed(["bride groom wedding ceremony vows"])[0]
    runner_up = corpus[int(sim.argsort(descending=True)[1])]
    assert runner_up not in one.background and len(one.background) == len(corpus) - 2
    ex = build_theme("weddings", examples=WEDDING[:2], corpus=corpus, n_background=50)
    assert ex.texts == WEDDING[:2] and len(ex.background) == len(corpus) - 2
    with pytest.raises(ValueError, match="description"):
        build_theme("  ", corpus=corpus, embed=toy_embed)


def test_text_states_drop_the_first_token_and_ignore_padding(lm):
    texts = ["I think so.", "A much longer sentence about weddings and brides."]
    got = {i: (s, ids) for i, s, ids in text_states(lm, texts, [Site(1, "res")])}
    for i, t in enumerate(texts):
        ids = lm.tokenizer(t)["input_ids"]
        with recording(lm, ["1/res"]) as rec:
            lm.model(input_ids=torch.tensor([ids]))
        states, kept = got[i]
        assert kept == ids[1:]
        assert torch.allclose(states[Site(1, "res")], rec[Site(1, "res")][0, 1:], atol=1e-5)


def test_rank_features_finds_a_planted_theme_feature(lm):
    """Feature 7 of 2/res reads the direction of the token 'Q', which only theme texts contain."""
    site = Site(2, "res")
    theme_texts = [t.replace("e", "Q") for t in WEDDING]
    q, other = [], []
    for _, s, ids in text_states(lm, theme_texts + OTHER, [site]):
        is_q = torch.tensor(ids) == ord("Q")
        q.append(s[site][is_q])
        other.append(s[site][~is_q])
    mq, mo = torch.cat(q).mean(0), torch.cat(other).mean(0)
    w = (mq - mo) / (mq - mo).norm()
    base = tiny_suite()[site]
    W_enc, b_enc = base.W_enc.clone(), torch.zeros(base.d_sae)
    W_enc[:, 7], b_enc[7] = w, -0.5 * float((mq + mo) @ w)  # fires between the two means
    planted = SAE(W_enc=W_enc, b_enc=b_enc, W_dec=W_enc.T.contiguous(), b_dec=torch.zeros(D),
                  site=site)
    suite = Suite.from_saes({site: planted, Site(0, "res"): tiny_suite()["0/res"]})
    th = build_theme("weddings", examples=theme_texts, corpus=OTHER)
    ranked = rank_features(lm, suite, th, top=5)
    assert default_site(suite, lm.n_layers) == site
    assert ranked[0].feature == site.feature(7) and ranked[0].top_token == "Q"
    assert ranked[0].theme_frac == 1.0 and ranked[0].background_frac == 0.0
    assert ranked[0].score > 1.2 * ranked[1].score
    assert ranked[0].label.startswith("promotes: ")
    atlas = type("Atlas", (), {"label": lambda self, f: f"label of {f}"})()
    assert feature_label(lm, suite, site.feature(7), atlas) == "label of 2/res/7"


GARDENING = ["Plant the tomato seedlings in rich compost after the last frost of spring.",
             "Prune the roses in late winter and mulch the beds to keep the soil moist.",
             "Sow carrots and radishes in rows, then thin the seedlings once they sprout.",
             "The allotment needs weeding every week, and the beans climb their canes by June.",
             "Water the greenhouse peppers in the morning and feed them with liquid seaweed.",
             "Dig the potatoes when the leaves turn yellow and store them somewhere dark."]
CHESS = ["White opened with the queen's gambit and black declined it with a solid defence.",
         "The knight fork won the exchange, and the endgame with two rooks was easy.",
         "She castled early, doubled her rooks on the open file and checkmated in thirty moves.",
         "The grandmaster sacrificed a bishop to expose the king in the middlegame.",
         "Pawn structure decides many openings: an isolated pawn can be strong or weak.",
         "He resigned when the passed pawn reached the seventh rank with the queen behind it."]


def planted_theme_suite(lm, site, theme_texts, background, marker):
    """An SAE at ``site`` whose feature 7 reads the direction of ``marker`` (a character only
    theme texts contain) and fires only on its stronger occurrences, and whose feature 11 reads the same direction on
    top of a large bias, so it fires at every token of every text, a little more on theme text
    (a high t, no specificity)."""
    hit, miss = [], []
    for _, s, ids in text_states(lm, theme_texts + background, [site]):
        is_c = torch.tensor(ids) == ord(marker)
        hit.append(s[site][is_c])
        miss.append(s[site][~is_c])
    mh, mm = torch.cat(hit).mean(0), torch.cat(miss).mean(0)
    w = (mh - mm) / (mh - mm).norm()
    base = tiny_suite()[site]
    W_enc, b_enc = base.W_enc.clone(), torch.full((base.d_sae,), -1e3)  # the rest stay silent
    W_enc[:, 7], b_enc[7] = w, -float(mh @ w)  # the stronger half of the marker's tokens
    W_enc[:, 11], b_enc[11] = w, 20.0 - float(mm @ w)
    sae = SAE(W_enc=W_enc, b_enc=b_enc, W_dec=W_enc.T.contiguous(), b_dec=torch.zeros(D),
              site=site)
    return Suite.from_saes({site: sae, Site(0, "res"): tiny_suite()["0/res"]})


@pytest.mark.parametrize("description,texts,marker", [("gardening", GARDENING, "Q"),
                                                      ("chess", CHESS, "X")])
def test_seed_is_specific_to_the_theme_not_just_high_t(lm, description, texts, marker):
    """Themes no other test names: the t statistic alone prefers the feature that fires on
    everything (slightly more on theme text); the seed score prefers the one that fires only on
    theme text, and the evidence for both is kept."""
    site = Site(2, "res")
    theme_texts = [t.replace("e", marker) for t in texts]
    suite = planted_theme_suite(lm, site, theme_texts, OTHER + WEDDING, marker)
    th = build_theme(description, examples=theme_texts, corpus=OTHER + WEDDING)
    ranked = rank_features(lm, suite, th, top=30, pool=30)
    by = {r.feature.index: r for r in ranked}
    spec, gen = by[7], by[11]
    assert gen.score > spec.score > 0  # by t alone the generic feature would be the seed
    assert gen.background_frac == 1.0 and 0.45 < gen.specificity < 0.55
    assert spec.specificity > 0.99 and spec.theme_frac > 0.5 and spec.background_frac == 0.0
    assert ranked[0].feature == site.feature(7) and spec.seed_score > 5 * max(gen.seed_score, 0)
    assert spec.fires_on == (marker,) and math.isnan(spec.relevance)
    ev = spec.evidence()
    assert ev["feature"] == "2/res/7" and ev["relevance"] is None
    assert json.loads(json.dumps(ev))["fires_on"] == [marker]

    def embed(xs):  # the description and the marker share a direction
        rows = [torch.tensor([1.0, 0.0]) if (description in x or marker in x)
                else torch.tensor([0.0, 1.0]) for x in xs]
        return torch.stack(rows)
    with_rel = {r.feature.index: r for r in rank_features(lm, suite, th, top=30, pool=30,
                                                          embed=embed)}
    assert with_rel[7].relevance == pytest.approx(1.0)
    assert with_rel[7].seed_score == pytest.approx(spec.seed_score)
    assert with_rel[11].relevance == pytest.approx(1.0)  # it fires most on the marker too
    assert with_rel[4].seed_score == 0.0 and with_rel[4].fires_on == ()  # silent


def test_seed_scores_and_split_theme():
    t = torch.tensor([10.0, 6.0, 6.0, -2.0])
    spec = torch.tensor([0.55, 0.95, 0.95, 1.0])
    assert seed_scores(t, spec).tolist() == pytest.approx([1.0, 5.4, 5.4, -2.0])
    rel = torch.tensor([0.9, 0.5, float("nan"), 0.2])
    assert seed_scores(t, spec, rel).tolist() == pytest.approx([0.9, 2.7, 5.4, -0.4])
    th = build_theme("chess", examples=CHESS, corpus=OTHER + WEDDING + GARDENING)
    a, b = split_theme(th)
    assert a.texts == CHESS[0::2] and b.texts == CHESS[1::2]
    assert not set(a.texts) & set(b.texts) and not set(a.background) & set(b.background)
    assert len(a.background) + len(b.background) == len(th.background)
    with pytest.raises(ValueError, match="needs at least 2 paragraphs"):
        split_theme(build_theme("chess", examples=CHESS[:1], corpus=OTHER))
