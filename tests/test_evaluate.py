"""Scorers with known answers, the hand-labelled ranking set, a resumable two-stage sweep on a
tiny model (held-out prompts and seeds, paired differences, equal added norm), judge validation
and the judge protocol."""

from __future__ import annotations

import json
import math
import re
import threading
import zlib
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import torch

import saeflow.evaluate as ev
from saeflow.evaluate import (NORM_MODE, SCORER_VERSION, SweepConfig, added_norm, cells,
                              compare_modes, load_results, run_heldout, run_sweep, spearman,
                              validate_with_judge)
from saeflow.hooks import hook_count
from saeflow.scoring import (CoherenceScorer, calibrate_topic, context_free_logprobs,
                             continuation_nll, judge, mask_words, repetition, repetition_penalty,
                             theme_stems, unigram_repetition)
from saeflow.steer import Generation
from test_steer import GRAPH, char_lm, tiny_suite

LABELS = json.loads((Path(__file__).parent / "data" / "scorer_labels.json").read_text())

WEDDING = ["The bride and groom exchanged vows at the wedding ceremony in the chapel.",
           "Wedding guests threw rice as the bride left the church with the groom.",
           "The wedding reception had a cake, a bouquet toss and the first dance of the couple.",
           "She planned the wedding for a year: the dress, the rings, the vows and the ceremony."]
OTHER = ["The striker scored twice in the second half of the football match.",
         "Interest rates rose as the central bank tried to slow inflation.",
         "The volcano erupted, sending ash over the nearby villages.",
         "The new phone has a faster processor and a larger battery.",
         "Parliament debated the budget for the transport ministry.",
         "The recipe needs flour, butter and two eggs beaten together."]


def toy_embed(texts):
    """Bag of hashed words, unit rows: enough to tell weddings from football."""
    out = torch.zeros(len(texts), 64)
    for i, t in enumerate(texts):
        for w in re.findall(r"[a-z]+", t.lower()):
            if len(w) > 3:
                out[i, zlib.crc32(w.encode()) % 64] += 1
    return out / out.norm(dim=1, keepdim=True).clamp_min(1e-9)


def test_repetition_known_values():
    assert repetition("the cat sat on the mat today") == 0.0
    assert math.isclose(repetition("a b c a b c a b c"), 1 - 3 / 7)
    assert math.isclose(repetition([5, 6, 7, 5, 6, 7, 5, 6, 7]), 1 - 3 / 7)  # token ids
    assert repetition("wedding " * 20) > 0.9
    assert repetition("too short") == 0.0
    issue = "It is a wedding. It is a wedding day. It was a nice wedding."
    assert unigram_repetition(issue) == pytest.approx(1 - 3 / 5)  # wedding x3, day, nice
    assert unigram_repetition("The bride wore white and the groom wore grey.") == \
        pytest.approx(1 - 5 / 6)  # "wore" twice; "the", "and" are stop words
    assert unigram_repetition("Hello.") == 0.0
    # the unigram term counts only what natural text does not repeat; half repeats give 1
    assert repetition_penalty(0.0, 0.05, 0.05) == 0.0
    assert repetition_penalty(0.0, 0.275, 0.05) == pytest.approx(0.5)
    assert repetition_penalty(0.0, 0.9, 0.05) == 1.0
    assert repetition_penalty(0.5, 0.275, 0.05) == pytest.approx(0.75)


def test_theme_words_are_masked_so_topic_measures_content():
    assert theme_stems("weddings") == ("weddin",)
    assert theme_stems("scientific concepts and entities") == ("scientif", "concep", "entiti")
    assert theme_stems("anger") == ("anger",)
    assert mask_words("It is a Wedding. Weddings, wedded bliss.", ("weddin",)) == \
        "It is a . , wedded bliss."
    topic = calibrate_topic(WEDDING, OTHER, toy_embed, description="weddings")
    bare = calibrate_topic(WEDDING, OTHER, toy_embed)
    word = "It is a wedding. It is a wedding day. It was a nice wedding."
    prose = "The bride wore a white dress and the groom waited at the chapel for the vows."
    assert bare([word])[0] > 0.5  # the theme word alone used to count as topic
    assert topic([word])[0] < 0.2 < 0.5 < topic([prose])[0]
    assert topic(["weddings wedding"]) == [0.0]  # nothing left once the theme word is gone
    assert topic.info()["masked_stems"] == ["weddin"]


def test_topic_scorer_is_calibrated_and_ranks_on_topic_higher():
    topic = calibrate_topic(WEDDING, OTHER, toy_embed)
    on, off = topic(["The bride wore a white dress and the groom waited at the wedding chapel.",
                     "The striker missed a penalty in the football match."])
    assert on > 0.5 and off < 0.1 and on > off
    assert topic([""]) == [0.0]
    assert all(0.0 <= x <= 1.0 for x in topic(WEDDING + OTHER))
    with pytest.raises(ValueError, match="not nearer the theme"):
        calibrate_topic(OTHER[:2], OTHER[:2], toy_embed)


@pytest.fixture(scope="module")
def lm():
    return char_lm()


def test_continuation_nll_is_exact_and_padding_free(lm):
    pairs = [([73, 32], [116, 104, 105, 110, 107]), ([84, 104, 101], [32, 99, 97, 116, 33, 33, 33])]
    batched = continuation_nll(lm, pairs)
    for (p, n), got in zip(pairs, batched):
        ids = torch.tensor([p + n])
        logp = lm.model(input_ids=ids).logits[0].log_softmax(-1)
        want = -sum(float(logp[len(p) - 1 + j, t]) for j, t in enumerate(n)) / len(n)
        assert math.isclose(got, want, rel_tol=1e-4)


def test_coherence_takes_the_worse_anchor_and_penalises_loops_and_short_text(lm):
    uni = context_free_logprobs(lm)
    assert uni.shape == (128,) and math.isclose(float(uni.exp().sum()), 1.0, rel_tol=1e-4)
    ok = ((73,), (32, 116, 104, 105, 110, 107, 32, 115, 111))
    nll = continuation_nll(lm, [ok])[0]
    gain = float(-uni[list(ok[1])].mean()) - nll
    scorer = CoherenceScorer(lm, uni, natural_nll=nll - 1.0, shuffled_nll=nll + 1.0,
                             natural_gain=gain + 3.0, shuffled_gain=gain - 1.0)
    res = scorer([ok])
    assert math.isclose(res.nll[0], nll, rel_tol=1e-6)
    assert math.isclose(res.gain[0], gain, rel_tol=1e-5)
    assert math.isclose(res.coherence[0], 0.25, rel_tol=1e-4)  # gain: 1/4 of the way; nll: 1/2
    scorer.natural_gain, scorer.shuffled_gain = gain - 1.0, gain - 3.0  # gain now above natural
    assert math.isclose(scorer([ok]).coherence[0], 0.5, rel_tol=1e-4)  # the nll is the worse
    loop = ((73,), (5, 6, 7, 5, 6, 7, 5, 6, 7))
    res = scorer([loop])
    assert res.repetition[0] == pytest.approx(1 - 3 / 7) and res.coherence[0] <= 3 / 7
    assert scorer([((73,), (32, 111, 107))]).coherence == [0.0]  # under 4 tokens


def saturated_coherence(lm, natural_unigram=0.05):
    """A coherence scorer whose NLL and gain parts are 1 for any text: only repetition counts."""
    return CoherenceScorer(lm, context_free_logprobs(lm), natural_nll=1e6 - 1, shuffled_nll=1e6,
                           natural_gain=-1e6 + 1, shuffled_gain=-1e6,
                           natural_unigram=natural_unigram)


def test_labelled_set_repetition_ranks_fluent_above_degenerate(lm):
    """The hand-labelled continuations with repetition as the only coherence term (the LM
    parts saturated): every fluent continuation beats every repetitive one of its theme. The
    whole scorer's ranking, topic included, is checked with the real models below."""
    coherence = saturated_coherence(lm)
    ctx = lm.tokenizer(LABELS["prompt"], add_special_tokens=False)["input_ids"]
    for theme, d in LABELS["themes"].items():
        def coh(texts):
            return coherence([(ctx, lm.tokenizer(" " + t, add_special_tokens=False)["input_ids"])
                              for t in texts]).coherence
        good, bad, off = (coh(d[k]) for k in ("good", "degenerate", "offtopic"))
        assert min(good + off) > max(bad), (theme, good, off, bad)


def _sweep_setup(lm):
    suite = tiny_suite()
    topic = calibrate_topic(WEDDING, OTHER, toy_embed, description="weddings")
    coherence = CoherenceScorer(lm, context_free_logprobs(lm), natural_nll=3.0, shuffled_nll=6.0,
                                natural_gain=3.0, shuffled_gain=0.0)
    cfg = SweepConfig(modes=("single", "cumulative"), layers=(1, 2), coefficients=(0.5, 4.0),
                      prompts=("I think", "The"), seeds=(0, 1), samples=1, max_new_tokens=6,
                      report_prompts=("We", "A cat"), judge_sample=5)
    return suite, topic, coherence, cfg


def test_sweep_config_keeps_selection_and_report_apart():
    cfg = SweepConfig(layers=(1,), seeds=(0, 3))
    assert cfg.report_seeds == (4, 5) and not set(cfg.prompts) & set(cfg.report_prompts)
    with pytest.raises(ValueError, match="both selection and report prompts"):
        SweepConfig(layers=(1,), prompts=("I think", "Today"))
    with pytest.raises(ValueError, match="both selection and report seeds"):
        SweepConfig(layers=(1,), seeds=(0, 1), report_seeds=(1, 2))
    assert not SweepConfig(layers=(1,), action="suppress").norm_cells
    assert not SweepConfig(layers=(1,), modes=("single",)).norm_cells


def test_sweep_selects_on_some_prompts_and_seeds_and_reports_on_others(lm, tmp_path,
                                                                      monkeypatch):
    suite, topic, coherence, cfg = _sweep_setup(lm)
    assert len(cells(cfg)) == 2 + 3 * 2 * 2  # single, cumulative and cumulative_norm cells
    out = tmp_path / "weddings" / "results.json"
    setup = {"seed": str(GRAPH.seed), "model": "tiny float32"}
    res = run_sweep(lm, suite, "weddings", GRAPH, cfg, out, topic, coherence, setup=setup)
    assert [r.cell for r in res[:3]] == ["unsteered", "prompting", "single/1/0.5"]
    assert all(r.n == 4 and len(r.generations) == 4 for r in res)
    assert hook_count(lm.model) == 0
    selection = {(p, s) for p in cfg.prompts for s in cfg.seeds}
    assert {(g["base_prompt"], g["seed"]) for r in res for g in r.generations} == selection
    # every cell is scored under the bare prompt, the prompting baseline included
    prompting = res[1].generations[0]
    assert prompting["prompt"] == "Write about weddings.\n\nI think"
    assert prompting["context_ids"] == lm.tokenizer("I think", add_special_tokens=False)[
        "input_ids"] != prompting["prompt_ids"]
    assert prompting["nll"] == pytest.approx(continuation_nll(
        lm, [(prompting["context_ids"], prompting["new_ids"])])[0], rel=1e-5)
    # equal push: decoder rows are unit norm, so a term adds its coefficient's norm
    by = {r.cell: r for r in res}
    assert by["single/1/0.5"].n_features == 2 and by["cumulative/2/0.5"].n_features == 5
    assert by["single/1/0.5"].added_norm == pytest.approx(1.0, rel=1e-5)  # 1/res, 1/mlp
    assert by["cumulative/1/0.5"].added_norm == pytest.approx(1.5, rel=1e-5)  # and 0/res
    for layer in (1, 2):
        for c in (0.5, 4.0):
            key = f"{layer}/{c:g}"
            assert by[f"{NORM_MODE}/{key}"].added_norm == pytest.approx(
                by[f"single/{key}"].added_norm, rel=1e-5)
            assert by[f"{NORM_MODE}/{key}"].n_features == by[f"cumulative/{key}"].n_features
    for r in res:
        assert math.isclose(r.score, sum(g["score"] for g in r.generations) / 4, rel_tol=1e-6)
    assert json.loads(out.read_text())["scorer"] == SCORER_VERSION

    calls = []

    def fake_judge(text):
        calls.append(text)
        return min(1.0, len(text) / 10), 0.5
    held = run_heldout(lm, suite, "weddings", GRAPH, cfg, out, topic, coherence,
                       judge_fn=fake_judge)
    chosen = {m: max((r for r in res if r.mode == m), key=lambda r: r.score)
              for m in ("single", "cumulative", NORM_MODE)}
    assert [r.cell for r in held] == ["unsteered", "prompting"] + [chosen[m].cell for m in chosen]
    report = {(p, s) for p in cfg.report_prompts for s in cfg.report_seeds}
    # the split never reports on a selection prompt or seed
    got = {(g["base_prompt"], g["seed"]) for r in held for g in r.generations}
    assert got == report and not {p for p, _ in got} & set(cfg.prompts)
    assert not {s for _, s in got} & set(cfg.seeds)
    assert all(r.stage == "report" and r.n == 4 for r in held)
    assert len(calls) == cfg.judge_sample  # the judge rates a sample only
    saved = json.loads(out.read_text())
    assert saved["judge_validation"]["n"] == cfg.judge_sample
    judged = [g for c in saved["heldout"].values() for g in c["generations"]
              if g["judge_topic"] is not None]
    assert len(judged) == cfg.judge_sample

    comp = compare_modes(res, held)
    assert {k for k in comp if k in ("unsteered", "prompting", "single", "cumulative",
                                     NORM_MODE)} == {"unsteered", "prompting", "single",
                                                     "cumulative", NORM_MODE}
    hb = {r.cell: r for r in held}
    base = {(g["base_prompt"], g["seed"], g["sample"]): g["score"]
            for g in hb["unsteered"].generations}
    for m in ("single", "cumulative", NORM_MODE):
        c, r = comp[m], hb[chosen[m].cell]
        assert c["cell"] == chosen[m].cell and c["selection"] == chosen[m].score
        assert c["heldout"] == pytest.approx(sum(g["score"] for g in r.generations) / 4)
        d = [g["score"] - base[(g["base_prompt"], g["seed"], g["sample"])]
             for g in r.generations]
        assert c["vs_unsteered"] == pytest.approx(sum(d) / 4) and c["n_paired"] == 4
        mean = sum(d) / 4
        se = math.sqrt(sum((x - mean) ** 2 for x in d) / 3 / 4)
        assert c["vs_unsteered_se"] == pytest.approx(se) or (se == 0 and c["vs_unsteered_se"] == 0)
        assert c["added_norm"] == r.added_norm
    assert comp["unsteered"]["vs_unsteered"] == 0.0
    assert {tuple(x) for x in comp["split"]["report"]} == report
    assert {tuple(x) for x in comp["split"]["selection"]} == selection
    eq = comp["equal_norm"]
    assert len(eq["cells"]) == 4 and eq["n"] == 16
    for c in eq["cells"]:
        key = f"{c['layer']}/{c['coefficient']:g}"
        assert c["single"] == by[f"single/{key}"].score
        assert c["cumulative_norm"] == by[f"{NORM_MODE}/{key}"].score
    assert eq["diff"] == pytest.approx(sum(c["diff"] for c in eq["cells"]) / 4)
    assert comp["single"]["grid_mean"] == pytest.approx(
        sum(r.score for r in res if r.mode == "single") / 4)

    # numbers reported come from the report stage only: poison the two stages apart
    def poisoned(rs, value):
        out = []
        for r in rs:
            gens = [{**g, "score": value} for g in r.generations]
            out.append(ev.CellResult(**{**r.row(), "score": value, "score_se": 0.0,
                                        "generations": gens}))
        return out
    pc = compare_modes(poisoned(res, 1.0), poisoned(held, 0.0))
    for m in ("unsteered", "prompting", "single", "cumulative", NORM_MODE):
        assert pc[m]["heldout"] == 0.0 and pc[m]["vs_unsteered"] == 0.0
    assert all(pc[m]["selection"] == 1.0 for m in ("single", "cumulative", NORM_MODE))

    # resuming generates nothing; rescoring changes scores, not texts; stale files are refused
    monkeypatch.setattr(ev, "generate", lambda *a, **k: pytest.fail("resume re-ran a cell"))
    again = run_sweep(lm, suite, "weddings", GRAPH, cfg, out, topic, coherence, setup=setup)
    assert [r.row() for r in again] == [r.row() for r in res]
    assert [r.row() for r in run_heldout(lm, suite, "weddings", GRAPH, cfg, out, topic,
                                         coherence)] == [r.row() for r in held]
    strict = CoherenceScorer(lm, coherence.unigram_V, natural_nll=0.0, shuffled_nll=0.5,
                             natural_gain=3.0, shuffled_gain=0.0)  # everything is salad now
    rescored = run_sweep(lm, suite, "weddings", GRAPH, cfg, out, topic, strict, setup=setup,
                         rescore=True)
    assert all(r.coherence == 0.0 and r.score == 0.0 for r in rescored)
    assert all(r.score == 0.0 for r in load_results(out, "heldout"))
    assert [g["text"] for r in rescored for g in r.generations] == \
        [g["text"] for r in res for g in r.generations]
    data = json.loads(out.read_text())
    data["scorer"] = SCORER_VERSION - 1
    out.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="older scorer.*--rescore"):
        run_sweep(lm, suite, "weddings", GRAPH, cfg, out, topic, coherence, setup=setup)
    with pytest.raises(ValueError, match="other settings"):
        run_sweep(lm, suite, "weddings", GRAPH, SweepConfig(layers=(3,)), out, topic, coherence,
                  setup=setup)
    with pytest.raises(ValueError, match="other settings"):  # the same sweep, another dtype
        run_sweep(lm, suite, "weddings", GRAPH, cfg, out, topic, coherence,
                  setup={**setup, "model": "tiny bfloat16"})


def test_added_norm_sums_site_vectors():
    from saeflow.steer import SteeringPlan
    suite = tiny_suite()
    plan = SteeringPlan([("1/res/3", 2.0), ("1/res/4", 2.0), ("2/mlp/1", -1.0)],
                        magnitudes={"2/mlp/1": 3.0})
    # rows are orthonormal within a site: |2 v3 + 2 v4| = sqrt(8); the mlp term adds 3
    assert added_norm(plan, None, suite) == pytest.approx(math.sqrt(8) + 3.0, rel=1e-5)


def test_judge_validation_rank_correlations():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 45]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 2, 3], [5, 5, 6, 7]) == pytest.approx(1.0)  # ties share ranks
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    recs = [{"text": f"t{i}", "topic": i / 10, "coherence": 1 - i / 10, "score": i / 20}
            for i in range(10)]
    seen = []

    def fake(text):
        seen.append(text)
        i = int(text[1:])
        return i / 10, 1 - i / 10  # agrees with the automatic scores
    v = validate_with_judge(recs, fake, 6)
    assert v["n"] == 6 and len(seen) == 6 and v["topic"] == pytest.approx(1.0)
    assert v["coherence"] == pytest.approx(1.0)
    assert sum(r.get("judge_topic") is not None for r in recs) == 6
    validate_with_judge(recs, fake, 6)
    assert len(seen) == 6  # ratings already there are reused


class _FakeChat(BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _FakeChat.seen = (self.path, body, self.headers.get("Authorization"))
        reply = {"choices": [{"message": {"content": 'Sure. {"topic": 3, "coherence": 4}'}}]}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a):
        pass


def test_judge_speaks_the_openai_chat_protocol():
    server = HTTPServer(("127.0.0.1", 0), _FakeChat)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/v1"
        assert judge(url, "m", "weddings", "The bride smiled.", api_key="k") == (0.6, 0.8)
        path, body, auth = _FakeChat.seen
        assert path == "/v1/chat/completions" and body["model"] == "m" and auth == "Bearer k"
        assert "weddings" in body["messages"][0]["content"]
    finally:
        server.shutdown()


@pytest.mark.slow
def test_real_embedder_and_model_scores_are_sane():
    """The shipped sentence embedder and SmolLM2: on-topic beats off-topic, prose beats salad."""
    from saeflow.evaluate import calibrate_coherence
    from saeflow.models import load_model
    from saeflow.steer import generate
    from saeflow.themes import sentence_embedder
    topic = calibrate_topic(WEDDING, OTHER, sentence_embedder())
    on, off = topic(["My sister's wedding was lovely; the bride cried during the vows.",
                     "The stock market fell sharply after the earnings report."])
    assert on > 0.5 > off
    lm = load_model("smollm2")
    coherence = calibrate_coherence(lm, WEDDING + OTHER, n_tokens=16)
    prose = generate(lm, "I think", None, 16, greedy=True)[0]
    words = prose.text.split()
    salad_ids = lm.tokenizer(" ".join(reversed(words)), add_special_tokens=False)["input_ids"]
    salad = Generation("I think", " ".join(reversed(words)), 0, prose.prompt_ids, tuple(salad_ids))
    c = coherence([(g.prompt_ids, g.new_ids) for g in (prose, salad)]).coherence
    assert c[0] > c[1]


@pytest.mark.slow
def test_labelled_set_ranking_with_the_real_scorer():
    """The shipped scorer (MiniLM topic, SmolLM2 coherence calibrated on corpus text) ranks every
    hand-labelled fluent on-topic continuation above every repetitive on-topic one and every
    fluent off-topic one, for each theme of tests/data/scorer_labels.json."""
    import random

    from saeflow.corpus import load_texts
    from saeflow.evaluate import calibrate_coherence
    from saeflow.models import load_model
    from saeflow.themes import sentence_embedder
    embed, lm = sentence_embedder(), load_model("smollm2")
    texts = load_texts(split="heldout")
    random.Random(0).shuffle(texts)
    coherence = calibrate_coherence(lm, texts[:48], 36)
    ctx = lm.tokenizer(LABELS["prompt"], add_special_tokens=False)["input_ids"]
    for theme, d in LABELS["themes"].items():
        topic = calibrate_topic(d["theme_texts"], d["background"], embed, description=theme)

        def score(texts):
            co = coherence([(ctx, lm.tokenizer(" " + t, add_special_tokens=False)["input_ids"])
                            for t in texts]).coherence
            return [t * c for t, c in zip(topic([" " + t for t in texts]), co)]
        good, bad, off = (score(d[k]) for k in ("good", "degenerate", "offtopic"))
        assert min(good) > max(bad), (theme, good, bad)
        assert min(good) > max(off), (theme, good, off)
