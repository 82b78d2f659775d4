"""The theme setup's stored parts (saeflow.memo): a second run reads the calibrations, the
ranking's statistics and the magnitudes instead of computing them, runs no forward pass, and
gives the same numbers bit for bit; changing any input computes that part again. A tiny
character model trained for a few steps on the test's texts (so shuffled text is less likely
than the texts and coherence can be calibrated), synthetic SAEs with planted structure."""

from __future__ import annotations

import json
from contextlib import contextmanager
from typing import Any

import pytest
import torch

import saeflow.recipes.steer_eval as se
import saeflow.themes as themes
from saeflow.memo import Memo, model_fingerprint, sae_fingerprint, texts_digest
from saeflow.scoring import calibrate_coherence, calibrate_topic
from saeflow.sites import Site
from saeflow.suite import Suite
from saeflow.themes import Theme, rank_features
from test_evaluate import toy_embed
from test_steer import char_lm, flow_graph, tiny_suite

GARDEN = ["The gardener planted roses and tulips in the rich soil of the garden bed.",
          "Roses bloom in the garden when the soil is rich and the gardener waters the bed.",
          "In the garden, tulips and roses grew from seeds the gardener sowed in spring soil.",
          "The garden bed needs soil, seeds and water; the gardener plants roses by the wall.",
          "A gardener waters tulips and roses every morning so the garden blooms in spring.",
          "Seeds sown in rich soil give the garden its roses, tulips and spring blooms."]
OTHER = ["The striker scored twice in the second half of the football match.",
         "Interest rates rose as the central bank tried to slow inflation.",
         "The volcano erupted, sending ash over the nearby villages.",
         "The new phone has a faster processor and a larger battery.",
         "Parliament debated the budget for the transport ministry.",
         "The recipe needs flour, butter and two eggs beaten together.",
         "The train to the coast was delayed by an hour because of snow.",
         "Scientists measured the temperature of the lake every winter."]


def named_embed(texts):
    return toy_embed(texts)


named_embed.name = "toy-hashed-words"  # a named embedder: the topic calibration can be stored


@pytest.fixture(scope="module")
def lm():
    """tests/test_steer.py's character model, trained on the texts until they are likelier than
    their shuffled copies."""
    lm = char_lm()
    ids = [list(t.encode()) for t in GARDEN + OTHER]
    width = max(map(len, ids))
    x = torch.tensor([i + [2] * (width - len(i)) for i in ids])
    labels = torch.tensor([i + [-100] * (width - len(i)) for i in ids])
    model = lm.model.train().requires_grad_(True)
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    torch.manual_seed(0)
    for _ in range(40):
        opt.zero_grad()
        model(input_ids=x, labels=labels).loss.backward()
        opt.step()
    model.eval().requires_grad_(False)
    return lm


@pytest.fixture(scope="module")
def suite():
    return tiny_suite()


@contextmanager
def forwards(lm):
    """Counts the model's forward passes in the block (every one embeds its input)."""
    calls = []
    handle = lm.model.get_input_embeddings().register_forward_hook(lambda *a: calls.append(1))
    try:
        yield calls
    finally:
        handle.remove()


PAIRS = [(list(b"I think"), list(b" the garden blooms with roses in spring")),
         (list(b"Yesterday,"), list(b" rates rose at the bank in the match")),
         (list(b"I think"), list(b" soil soil soil soil soil soil"))]


def test_coherence_calibration_is_read_back_and_recomputed_when_an_input_changes(lm, tmp_path):
    fresh = calibrate_coherence(lm, OTHER, 16)  # no memo: what is always computed
    first = calibrate_coherence(lm, OTHER, 16, memo=(m1 := Memo(tmp_path)))
    with forwards(lm) as calls:
        again = calibrate_coherence(lm, OTHER, 16, memo=(m2 := Memo(tmp_path)))  # a re-run
    assert m1.misses == {"coherence": 1} and m2.hits == {"coherence": 1} and not m2.misses
    assert calls == []  # read back: no forward pass
    assert fresh.info() == first.info() == again.info()
    assert torch.equal(fresh.unigram_V, again.unigram_V)
    assert fresh(PAIRS) == again(PAIRS)  # the same scores, bit for bit
    for change in ({"n_tokens": 12}, {"seed": 1}, {"texts": OTHER[::-1]}):
        memo = Memo(tmp_path)
        args = {"texts": OTHER, "n_tokens": 16, **change}
        got = calibrate_coherence(lm, memo=memo, **args)
        assert memo.misses == {"coherence": 1}, change
        assert got.info() == calibrate_coherence(lm, **args).info()
    assert len(list((tmp_path / "coherence").glob("*.pt"))) == 4


def test_a_model_edited_in_place_is_not_read_from_the_cache(lm, tmp_path):
    before = model_fingerprint(lm)
    calibrate_coherence(lm, OTHER, 16, memo=Memo(tmp_path))
    w = lm.model.get_output_embeddings().weight
    saved = w.clone()
    try:
        with torch.no_grad():
            w.mul_(1.5)
        assert model_fingerprint(lm) != before
        memo = Memo(tmp_path)
        edited = calibrate_coherence(lm, OTHER, 16, memo=memo)
        assert memo.misses == {"coherence": 1}
        assert edited.info() == calibrate_coherence(lm, OTHER, 16).info()
    finally:
        with torch.no_grad():
            w.copy_(saved)
    assert model_fingerprint(lm) == before  # the same bytes again: the stored anchors apply
    memo = Memo(tmp_path)
    calibrate_coherence(lm, OTHER, 16, memo=memo)
    assert memo.hits == {"coherence": 1}


def test_topic_calibration_is_read_back_and_keyed_by_texts_theme_and_embedder(tmp_path):
    calls = []

    def embed(texts):
        calls.append(len(texts))
        return named_embed(texts)
    embed.name = named_embed.name
    first = calibrate_topic(GARDEN, OTHER, embed, description="gardens", memo=Memo(tmp_path))
    n = len(calls)
    again = calibrate_topic(GARDEN, OTHER, embed, description="gardens",
                            memo=(memo := Memo(tmp_path)))
    assert memo.hits == {"topic": 1} and len(calls) == n  # nothing embedded but ...
    probe = ["Roses and tulips in the spring garden soil.", "The bank raised interest rates."]
    assert again.info() == first.info() and again(probe) == first(probe)  # ... the probe
    assert torch.equal(again.theme_D, calibrate_topic(GARDEN, OTHER, embed,
                                                      description="gardens").theme_D)
    for change in ({"description": "roses"}, {"background": OTHER[:-1]},
                   {"theme_texts": GARDEN[1:]}, {"snippet_words": 8}):
        memo = Memo(tmp_path)
        args = {"theme_texts": GARDEN, "background": OTHER, "description": "gardens", **change}
        got = calibrate_topic(embed=embed, memo=memo, **args)
        assert memo.misses == {"topic": 1}, change
        assert got.info() == calibrate_topic(embed=embed, **args).info()
    unnamed = Memo(tmp_path / "unnamed")
    calibrate_topic(GARDEN, OTHER, toy_embed, memo=unnamed)  # no name: nothing to key it by
    assert not unnamed.misses and not (tmp_path / "unnamed").exists()


def evidence(ranked) -> list[dict]:
    return [r.evidence() for r in ranked]  # NaN (no embedder: no relevance) as None


def test_ranking_statistics_are_read_back_and_keyed_by_the_sae(lm, suite, tmp_path):
    theme = Theme("gardens", GARDEN, OTHER, [float("nan")] * len(GARDEN))
    first = rank_features(lm, suite, theme, site="2/res", top=5, memo=Memo(tmp_path))
    with forwards(lm) as calls:
        again = rank_features(lm, suite, theme, site="2/res", top=5,
                              memo=(memo := Memo(tmp_path)))
    assert calls == [] and memo.hits == {"feature-stats": 1}
    assert evidence(again) == evidence(first) == evidence(
        rank_features(lm, suite, theme, site="2/res", top=5))
    sae = suite["2/res"]
    before = sae_fingerprint(sae)
    saes = {site: suite[site] for site in suite.sites()}
    other = Suite.from_saes({**saes, Site.parse("2/res"): saes[Site.parse("1/res")]})
    assert sae_fingerprint(other["2/res"]) != before  # another SAE at the site
    memo = Memo(tmp_path)
    changed = rank_features(lm, other, theme, site="2/res", top=5, memo=memo)
    assert memo.misses == {"feature-stats": 1}
    assert evidence(changed) == evidence(rank_features(lm, other, theme, site="2/res", top=5))
    assert evidence(changed) != evidence(first)


class Labels:
    """The one thing setup_theme reads from an atlas here: a label per feature."""

    def label(self, feature) -> str:
        return f"label of {feature}"


ATLAS: Any = Labels()


def test_a_second_theme_setup_reads_every_stored_part(lm, suite, tmp_path, monkeypatch):
    """setup_theme twice (a demo re-run): the second computes nothing, runs no forward pass and
    gives the same setup and scores; another generation length recalibrates coherence only."""
    monkeypatch.setattr(themes, "build_theme", lambda description, *a, **k: Theme(
        description, GARDEN, OTHER, [float("nan")] * len(GARDEN)))
    graph = flow_graph()
    monkeypatch.setattr(se, "trace_graph", lambda *a, **k: graph)
    cfg = se.SteerEvalConfig(themes=("gardens",), max_new_tokens=16)
    first = se.setup_theme(cfg, suite, lm, ATLAS, "gardens", named_embed, lambda s: None,
                           m1 := Memo(tmp_path))
    assert m1.misses == {"feature-stats": 1, "magnitudes": 1, "topic": 1, "coherence": 1}
    with forwards(lm) as calls:
        again = se.setup_theme(cfg, suite, lm, ATLAS, "gardens", named_embed, lambda s: None,
                               m2 := Memo(tmp_path))
    assert calls == [] and not m2.misses and sum(m2.hits.values()) == 4
    plain = se.setup_theme(cfg, suite, lm, ATLAS, "gardens", named_embed, lambda s: None)
    for s in (again, plain):
        assert json.dumps(s.info, sort_keys=True) == json.dumps(first.info, sort_keys=True)
        assert s.magnitudes == first.magnitudes and s.layers == first.layers
        assert s.coherence(PAIRS) == first.coherence(PAIRS)
        assert s.topic(GARDEN + OTHER) == first.topic(GARDEN + OTHER)
    longer = se.setup_theme(se.SteerEvalConfig(themes=("gardens",), max_new_tokens=20), suite,
                            lm, ATLAS, "gardens", named_embed, lambda s: None,
                            m3 := Memo(tmp_path))
    assert m3.misses == {"coherence": 1} and sum(m3.hits.values()) == 3
    assert longer.info["coherence"] != first.info["coherence"]


def test_texts_digest_sees_order_and_boundaries():
    assert texts_digest(["ab", "c"]) != texts_digest(["a", "bc"])
    assert texts_digest(["a", "b"]) != texts_digest(["b", "a"])
    assert texts_digest(["a", "b"]) == texts_digest(("a", "b"))
