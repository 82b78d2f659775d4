"""Theme features: the contrast statistic, retrieval, padding-free text states, and a planted
theme feature found on a tiny model."""

from __future__ import annotations

import pytest
import torch

from saeflow.hooks import recording
from saeflow.sae import SAE
from saeflow.sites import Site
from saeflow.suite import Suite
from saeflow.themes import (build_theme, contrast_scores, default_site, feature_label,
                            rank_features, text_states)
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
    assert calls == [len(corpus), 1, 1] and again == th  # corpus embeddings come from the cache
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
