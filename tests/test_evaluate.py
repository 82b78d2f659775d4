"""Scorers with known answers, a resumable sweep on a tiny model, and the judge protocol."""

from __future__ import annotations

import json
import math
import re
import threading
import zlib
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import torch

import saeflow.evaluate as ev
from saeflow.evaluate import (SCORER_VERSION, CoherenceScorer, SweepConfig, calibrate_topic, cells,
                              compare_modes, context_free_logprobs, continuation_nll, judge,
                              repetition, run_sweep)
from saeflow.hooks import hook_count
from saeflow.steer import Generation
from test_steer import GRAPH, char_lm, tiny_suite

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


def test_sweep_runs_resumes_and_compares(lm, tmp_path, monkeypatch):
    suite = tiny_suite()
    topic = calibrate_topic(WEDDING, OTHER, toy_embed)
    coherence = CoherenceScorer(lm, context_free_logprobs(lm), natural_nll=3.0, shuffled_nll=6.0,
                                natural_gain=3.0, shuffled_gain=0.0)
    cfg = SweepConfig(modes=("single", "cumulative"), layers=(1, 2), coefficients=(0.5, 4.0),
                      prompts=("I think", "The"), seeds=(0, 1), samples=1, max_new_tokens=6)
    assert len(cells(cfg)) == 2 + 2 * 2 * 2
    out = tmp_path / "weddings" / "results.json"
    res = run_sweep(lm, suite, "weddings", GRAPH, cfg, out, topic, coherence,
                    setup={"seed": str(GRAPH.seed)})
    assert [r.cell for r in res[:3]] == ["unsteered", "prompting", "single/1/0.5"]
    assert all(r.n == 4 and len(r.generations) == 4 for r in res)
    assert res[0].judge_score is None and hook_count(lm.model) == 0
    assert res[1].generations[0]["prompt"] == "Write about weddings.\n\nI think"
    n_cum = {r.cell: r.n_features for r in res}
    assert n_cum["single/1/0.5"] == 2 and n_cum["cumulative/2/0.5"] == 5
    for r in res:
        assert math.isclose(r.score, sum(g["score"] for g in r.generations) / 4, rel_tol=1e-6)
    assert res[2].generations[0]["new_ids"]
    assert json.loads(out.read_text())["scorer"] == SCORER_VERSION
    monkeypatch.setattr(ev, "generate", lambda *a, **k: pytest.fail("resume re-ran a cell"))
    again = run_sweep(lm, suite, "weddings", GRAPH, cfg, out, topic, coherence,
                      setup={"seed": str(GRAPH.seed)})
    assert [r.row() for r in again] == [r.row() for r in res]
    strict = CoherenceScorer(lm, coherence.unigram_V, natural_nll=0.0, shuffled_nll=0.5,
                             natural_gain=3.0, shuffled_gain=0.0)  # everything is salad now
    rescored = run_sweep(lm, suite, "weddings", GRAPH, cfg, out, topic, strict,
                         setup={"seed": str(GRAPH.seed)}, rescore=True)
    assert all(r.coherence == 0.0 and r.score == 0.0 for r in rescored)
    assert [g["text"] for r in rescored for g in r.generations] == \
        [g["text"] for r in res for g in r.generations]
    data = json.loads(out.read_text())
    data["scorer"] = SCORER_VERSION - 1
    out.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="older scorer.*--rescore"):
        run_sweep(lm, suite, "weddings", GRAPH, cfg, out, topic, coherence,
                  setup={"seed": str(GRAPH.seed)})
    with pytest.raises(ValueError, match="other settings"):
        run_sweep(lm, suite, "weddings", GRAPH, SweepConfig(layers=(3,)), out, topic, coherence,
                  setup={"seed": str(GRAPH.seed)})
    comp = compare_modes(res)
    assert set(comp) == {"unsteered", "prompting", "single", "cumulative"}
    for mode in ("single", "cumulative"):
        best = next(r for r in res if r.cell == comp[mode]["cell"])
        picks = {r.cell: sum(g["score"] for g in r.generations[0::2]) / 2
                 for r in res if r.mode == mode}
        assert picks[best.cell] == max(picks.values())  # chosen on even positions
        assert comp[mode]["heldout"] == pytest.approx(
            sum(g["score"] for g in best.generations[1::2]) / 2)  # scored on odd ones
        held = [g["score"] for g in best.generations[1::2]]
        assert comp[mode]["n_heldout"] == 2
        assert comp[mode]["heldout_se"] == pytest.approx(abs(held[0] - held[1]) / 2)
    single = [r for r in res if r.mode == "single"]
    assert comp["single"]["grid_mean"] == pytest.approx(sum(r.score for r in single) / 4)


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
