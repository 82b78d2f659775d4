"""The viewer's JSON API on a small planted atlas (Flask test client), its server, and the
contexts that feed it.

The setup is real end to end and offline: a planted suite (known lineage and parents) whose
width fits a tiny random Llama, a byte-level tokenizer built in memory (256 tokens, lossless),
the atlas computed with labels, contexts computed from a few texts.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

from saeflow.sites import Feature, Site
from tiny import byte_tokenizer, tiny_llama_lm

TEXTS = ["The quick brown fox jumps over the lazy dog near the river bank.",
         "Wedding bells rang in the old church as the bride and groom arrived.",
         "Quantum physics describes particles, waves and the forces between them.",
         "The market closed higher today as technology shares rallied strongly.",
         "She planted tomatoes, beans and basil in the garden behind the house."] * 3


def tiny_lm():
    lm = tiny_llama_lm(max_position_embeddings=512, bos_token_id=None, eos_token_id=None,
                       pad_token_id=None, initializer_range=0.4)
    setattr(lm.model.generation_config, "eos_token_id", None)
    return lm


def build_setup(folder):
    """(atlas, suite, lm, truth): a planted 4-layer suite, its atlas with labels and contexts."""
    from saeflow.atlas import compute_atlas
    from saeflow.contexts import ContextSettings, compute_contexts
    from saeflow.synthetic import planted_suite
    lm = tiny_lm()
    suite, truth = planted_suite(n_layers=4, width=96, d_model=64, seed=0)
    atlas = compute_atlas(suite, folder, lm, null_samples=256, progress=False)
    compute_contexts(lm, suite, folder, ContextSettings(n_tokens=4096, seq_len=48, batch_size=4),
                     texts=TEXTS, progress=False)
    return atlas, suite, lm, truth


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return build_setup(tmp_path_factory.mktemp("atlas"))


@pytest.fixture(scope="module")
def loads():
    return []


@pytest.fixture(scope="module")
def app(setup, loads):
    from saeflow.viewer import create_app
    atlas, suite, lm, _ = setup

    def load():  # the model is loaded lazily, on the first steering request
        loads.append(time.time())
        return lm, suite
    app = create_app(atlas.root, load_model=load, texts=TEXTS)
    view = app.extensions["saeflow.view"]
    assert view._context_ready.wait(30)
    return app


@pytest.fixture
def client(app):
    return app.test_client()


def get(client, url, status=200):
    r = client.get(url, follow_redirects=True)
    assert r.status_code == status, (url, r.status_code, r.data[:300])
    assert r.mimetype == "application/json", (url, r.mimetype)
    return r.get_json()


def wait_job(client, job_id, timeout=120):
    """The job's JSON once it has finished (the worker signals it: no polling)."""
    job = client.application.extensions["saeflow.steering"].get(job_id)
    assert job is not None and job.wait(timeout), f"job {job_id} did not finish"
    return get(client, f"/api/jobs/{job_id}")


@pytest.fixture
def paused(monkeypatch):
    """Generation stops after its second token until ``release`` is set, so a test acts while
    a generation surely runs; ``reached`` says it is there."""
    from saeflow.viewer import steering
    reached, release = threading.Event(), threading.Event()
    put = steering._JobStream.put

    def paused_put(self, value):
        put(self, value)
        if len(self.ids) == 2 and not release.is_set():
            reached.set()
            assert release.wait(60)
    monkeypatch.setattr(steering._JobStream, "put", paused_put)
    return reached, release


# ---- atlas pages -------------------------------------------------------------------------------
def test_overview_reports_the_atlas(client, setup):
    atlas = setup[0]
    o = get(client, "/api/overview")
    assert o["name"] == "planted" and o["model"] == "tiny-llama"
    assert o["layers"] == [0, 1, 2, 3] and o["n_features"] == 12 * 96
    assert o["site_counts"] == {"res": 4, "mlp": 4, "att": 4}
    for L, fr in o["class_fractions"].items():  # each layer under its own class names
        assert abs(sum(fr.values()) - 1) < 1e-3
        assert fr == pytest.approx(atlas.named_fractions()[int(L)], abs=1e-4)
    # layer 0 has no R_{-1}: its classes are no_prev_*, never newborn_*
    assert o["no_previous"] == [0]
    assert not any(c.startswith("newborn") or c == "unexplained" for c in o["class_fractions"]["0"])
    assert o["class_fractions"]["0"]["no_prev_unexplained"] == pytest.approx(
        atlas.class_fractions()[0]["unexplained"], abs=1e-4)
    assert o["classes"][:8] == ["translated", "processed_mlp", "processed_att", "processed_both",
                                "newborn_mlp", "newborn_att", "newborn_both", "unexplained"]
    assert set(o["classes"][8:]) == {"no_prev_mlp", "no_prev_att", "no_prev_both",
                                     "no_prev_unexplained"} <= set(o["colors"])
    assert o["null_thresholds"]["2"]["mlp"] == pytest.approx(atlas.null_thresholds[2]["mlp"],
                                                             abs=1e-4)
    assert o["thresholds"]["2"]["res"] == pytest.approx(atlas.thresholds[2]["res"], abs=1e-4)
    assert o["thresholds"]["0"]["res"] is None  # layer 0 has no R_{-1}: NaN becomes null
    assert o["contexts"]["complete"] and o["contexts"]["n_sequences"] > 0
    assert o["steering"] == {"available": True, "model_loaded": False, "busy": False,
                             "queued": 0, "load_error": None, "reason": None}
    assert set(o["export_formats"]) == {"json", "graphml", "dot", "svg", "png", "neuronpedia"}


def test_feature_page_matches_planted_parents(client, setup):
    atlas, _, _, truth = setup
    codes = truth.classes[2]
    translated = [i for i in range(96) if codes[i] == 0][:5]
    assert translated
    for i in translated:
        f = get(client, f"/api/features/2/res/{i}")
        assert f["lineage"] == atlas.lineage(f"2/res/{i}")
        res = next(p for p in f["predecessors"] if p["kind"] == "res")
        assert res["id"] == f"1/res/{truth.parent_res[2][i]}"  # the planted parent
        assert res["cos"] == pytest.approx(atlas.predecessors(f"2/res/{i}")["res"][1], abs=1e-4)
        assert [s["id"] for s in f["successors"]] == [str(g) for g, _ in
                                                      atlas.successors(f"2/res/{i}", 5)]
        assert f["promoted_tokens"] == atlas.tokens(f"2/res/{i}") and len(f["promoted_tokens"]) == 6
        assert f["prev"] == (f"2/res/{i - 1}" if i else None)
    mlp = get(client, "/api/features/2/mlp/7")
    assert mlp["lineage"] is None and mlp["predecessors"] == []
    assert mlp["successors"][0]["id"].startswith("2/res/")


def test_layer_zero_features_carry_the_atlas_class_names(client, setup):
    atlas = setup[0]
    codes = np.asarray(atlas.lineage_codes(0))
    newborn = int(np.flatnonzero(codes == 4)[0])  # code 4: newborn_mlp where R_{L-1} exists
    f = get(client, f"/api/features/0/res/{newborn}")
    assert f["lineage"] == "no_prev_mlp" == atlas.lineage(f"0/res/{newborn}")
    r = get(client, "/api/search?lineage=no_prev_mlp&layer=0&limit=500")
    assert r["total"] == int((codes == 4).sum()) > 0
    assert {x["lineage"] for x in r["results"]} == {"no_prev_mlp"}
    assert get(client, "/api/search?lineage=newborn_mlp&layer=0")["total"] == 0
    assert get(client, "/api/search?lineage=newborn_mlp&layer=2")["total"] == int(
        (np.asarray(atlas.lineage_codes(2)) == 4).sum())
    g = get(client, f"/api/graph/0/res/{newborn}")
    assert next(n for n in g["nodes"] if n["id"] == g["seed"])["lineage"] == "no_prev_mlp"


def test_share_curves_sweep_the_stored_scores(client, setup):
    from saeflow.lineage import classify, fractions
    atlas = setup[0]
    c = get(client, "/api/share_curves")
    assert c["vary"] == "all" and c["grid"][0] == 0.0 and c["grid"][-1] == 1.0
    assert c["no_previous"] == [0] and set(c["layers"]) == {"0", "1", "2", "3"}
    s = atlas.scores(2)
    for j, x in enumerate(c["grid"]):  # every grid value is the classification at that cut
        want = fractions(classify(s["res"], s["mlp"], s["att"], x, x, x))
        assert {k: v[j] for k, v in c["layers"]["2"].items()} == pytest.approx(want, abs=1e-4)
    assert c["layers"]["2"]["unexplained"][-1] == 1.0  # nothing beats a cosine of 1
    assert c["layers"]["0"]["no_prev_unexplained"][-1] == 1.0 and "unexplained" not in \
        c["layers"]["0"]
    assert c["thresholds"]["2"]["res"] == pytest.approx(atlas.thresholds[2]["res"], abs=1e-4)
    # varying one score keeps the atlas's thresholds for the others
    r = get(client, "/api/share_curves?vary=res")
    t = atlas.thresholds[2]
    want = fractions(classify(s["res"], s["mlp"], s["att"], 0.5, t["mlp"], t["att"]))
    j = r["grid"].index(0.5)
    assert {k: v[j] for k, v in r["layers"]["2"].items()} == pytest.approx(want, abs=1e-4)
    assert get(client, "/api/share_curves?vary=nope", 400)["error"]


def test_graph_says_when_thresholds_are_below_the_null(client, setup):
    from saeflow.flow import trace
    atlas = setup[0]
    nulls = atlas.null_thresholds
    quiet = get(client, "/api/graph/3/res/4?res_threshold=0.99&block_threshold=0.99")
    assert quiet["notes"] == []
    low = get(client, "/api/graph/3/res/4?res_threshold=0.01&block_threshold=0.01")
    assert any("MLP s(M) 0.01 is below the null" in n for n in low["notes"])
    assert any("residual chain s(R) 0.01 is below the null" in n for n in low["notes"])
    # the graph itself follows the atlas's rule: block nodes must beat their layer's null
    for n in low["nodes"]:
        if n["kind"] != "res":
            assert n["score"] > nulls[n["layer"]]["att" if n["kind"] == "att" else "mlp"] - 1e-4
    # below_null admits the chance-level links and passes trace's own warnings on
    with pytest.warns(UserWarning, match="below their layer's null"):
        loose = get(client, "/api/graph/3/res/4?res_threshold=0.01&block_threshold=0.01"
                            "&below_null=1")
    with pytest.warns(UserWarning, match="below their layer's null"):
        want = trace(atlas, "3/res/4", 0.01, 0.01, below_null=True)
    assert [n["id"] for n in loose["nodes"]] == [str(f) for f in want.features]
    assert len(loose["nodes"]) > len(low["nodes"]) and loose["settings"]["below_null"] is True
    assert loose["notes"] == want.settings["warnings"] and loose["notes"]
    assert get(client, "/api/graph/3/res/4?below_null=maybe", 400)["error"]
    r = client.get("/api/export/3/res/4?fmt=json&res_threshold=0.01&block_threshold=0.01"
                   "&below_null=true")
    assert len(json.loads(r.data)["nodes"]) == len(loose["nodes"])


def test_concurrent_requests_for_one_graph_trace_it_once(app, monkeypatch):
    import saeflow.flow
    view = app.extensions["saeflow.view"]
    calls, gate = [], threading.Event()
    real = saeflow.flow.trace

    def slow_trace(*args, **kwargs):
        calls.append(args[1])
        gate.wait(10)
        return real(*args, **kwargs)
    monkeypatch.setattr(saeflow.flow, "trace", slow_trace)
    f = Feature.parse("3/res/7")
    out = []
    threads = [threading.Thread(target=lambda: out.append(view.graph_bytes(f, 0.42, 0.21)))
               for _ in range(8)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    gate.set()
    for t in threads:
        t.join(30)
    assert len(calls) == 1 and len(out) == 8 and len(set(out)) == 1
    assert json.loads(out[0]) == view.graph_json(f, 0.42, 0.21)
    assert view.graph_bytes(f, 0.42, 0.21) is out[0] and len(calls) == 1  # cached
    # thresholds under the layers' nulls give the same cuts (the atlas's rule): one trace,
    # each answer with its own settings
    nulls, t = view.atlas.null_thresholds, view.atlas.thresholds
    assert all(0.42 < nulls[L]["res"] and 0.21 < min(t[L]["mlp"], t[L]["att"]) for L in (1, 2, 3))
    first = json.loads(out[0])
    for rt, bt in ((0.05, 0.05), (0.06, 0.2)):
        low = json.loads(view.graph_bytes(f, rt, bt))
        assert low["nodes"] == first["nodes"] and low["edges"] == first["edges"]
        assert low["settings"]["res_threshold"] == rt == view.graph(f, rt, bt).settings[
            "res_threshold"] and low["settings"]["block_threshold"] == bt
    assert len(calls) == 1
    view.graph_bytes(f, 0.99, 0.99)
    assert len(calls) == 2  # other cuts: traced again


def test_permutation_chain_composes_the_stored_permutations(setup, tmp_path):
    from saeflow.permutation import PermutationConfig, PermutationStore, consecutive_pairs
    from saeflow.viewer import create_app
    atlas, suite, _, _ = setup
    store = PermutationStore(suite, PermutationConfig(), tmp_path / "perms")
    store.compute(consecutive_pairs(suite.sites("res")), progress=False)
    c = create_app(atlas.root, suite=suite, permutations=tmp_path / "perms").test_client()
    r = get(c, "/api/permutation/1/res/5")
    assert r["available"] and r["missing"] == [] and r["config"]["objective"] == "both"
    assert [x["id"] for x in r["chain"]] == [
        f"0/res/{int(store.get('0/res', '1/res').perm.argsort()[5])}", "1/res/5",
        f"2/res/{int(store.composed(1, 2)[5])}", f"3/res/{int(store.composed(1, 3)[5])}"]
    for a, b in zip(r["chain"], r["chain"][1:]):  # each link's cosine is the atlas's
        succ = dict(atlas.successors(a["id"], 5))
        want = succ.get(Feature.parse(b["id"]))
        assert b["cos"] == (None if want is None else pytest.approx(want, abs=1e-4))
        assert b["top1"] == (Feature.parse(b["id"]) == atlas.successors(a["id"], 1)[0][0])
    assert r["chain"][0]["cos"] is None and [p["a"] for p in r["pairs"]] == ["0/res", "1/res",
                                                                              "2/res"]
    assert r["pairs"][0]["mse"] == pytest.approx(store.get("0/res", "1/res").mse)
    assert "residual" in get(c, "/api/permutation/1/mlp/5")["reason"]
    # a missing pair ends the chain there and says how to compute it; nothing is written
    pair = tmp_path / "perms" / "both-folded" / "pairs" / "2-res__3-res.json"
    pair.unlink()
    c = create_app(atlas.root, suite=suite, permutations=tmp_path / "perms").test_client()
    r = get(c, "/api/permutation/1/res/5")
    assert [x["layer"] for x in r["chain"]] == [0, 1, 2] and r["missing"] == ["2/res -> 3/res"]
    assert "saeflow permute" in r["reason"] and not pair.exists()
    # stored under other settings: read with those, never cleared
    other = PermutationStore(suite, PermutationConfig(objective="decoder"), tmp_path / "other")
    other.compute(consecutive_pairs(suite.sites("res"))[:1], progress=False)
    c = create_app(atlas.root, suite=suite, permutations=tmp_path / "other").test_client()
    r = get(c, "/api/permutation/0/res/5")
    assert r["config"]["objective"] == "decoder" and r["chain"][1]["id"] == \
        f"1/res/{int(other.get('0/res', '1/res').perm[5])}"
    ro = PermutationStore(suite, PermutationConfig(objective="decoder", solver="dense"),
                          tmp_path / "other", read_only=True)
    with pytest.raises(KeyError, match="not stored"):
        ro.get("0/res", "1/res")
    assert other.stored(Site(0, "res"), Site(1, "res")) is not None  # still there
    empty = create_app(atlas.root, suite=suite, permutations=tmp_path / "none").test_client()
    r = get(empty, "/api/permutation/1/res/5")
    assert not r["available"] and "saeflow permute" in r["reason"]
    assert [x["id"] for x in r["chain"]] == [] and not (tmp_path / "none").exists()


def test_feature_contexts_come_from_the_texts(client):
    f = get(client, "/api/features/1/res/5?contexts=3")
    assert f["contexts"] is not None and 0 < len(f["contexts"]) <= 3
    joined = " ".join(TEXTS)
    acts = [c["activation"] for c in f["contexts"]]
    assert acts == sorted(acts, reverse=True) and acts[0] > 0
    for c in f["contexts"]:
        assert (c["before"] + c["token"] + c["after"]).strip()[:4] in joined


def test_search_by_id_site_number_lineage_and_text(client, setup):
    atlas = setup[0]
    r = get(client, "/api/search?q=3/res/10")
    assert [x["id"] for x in r["results"]] == ["3/res/10"] and r["results"][0]["match"] == "id"
    assert get(client, "/api/search?q=3-res-10")["results"][0]["id"] == "3/res/10"
    assert get(client, "/api/search?q=3/res/500")["total"] == 0
    assert get(client, "/api/search?q=2/mlp")["total"] == 96
    assert get(client, "/api/search?q=17")["total"] == 12
    # lineage + layer filter counts equal the atlas's own classes
    codes = np.asarray(atlas.lineage_codes(2))
    r = get(client, "/api/search?lineage=translated&layer=2&limit=500")
    assert r["total"] == int((codes == 0).sum())
    assert all(x["lineage"] == "translated" and x["layer"] == 2 for x in r["results"])
    # paging over everything
    page = get(client, "/api/search?offset=1100&limit=100")
    assert page["total"] == 1152 and len(page["results"]) == 52
    assert page["results"][-1]["id"] == "3/res/95"
    # text: a label token finds its feature
    f, token = next((f, t.strip()) for f in (f"1/mlp/{i}" for i in range(96))
                    for t in atlas.tokens(f) if t.strip().isalpha())
    r = get(client, f"/api/search?q={token}&layer=1&kind=mlp&limit=500")
    assert f in [x["id"] for x in r["results"]] and r["total"] < 96
    # contexts: the text around a feature's peak finds the feature
    view = client.application.extensions["saeflow.view"]
    i, peak = next((i, p.split(" | ")[0].strip()) for i, p in
                   enumerate(view.contexts.peak_texts(Site(1, "res")))
                   if len(p.split(" | ")[0].strip()) >= 3)
    r = get(client, f"/api/search?q={peak}&layer=1&kind=res&limit=500")
    hit = next(x for x in r["results"] if x["id"] == f"1/res/{i}")
    assert hit["match"] == "label" or peak.lower() in hit["snippet"].lower()


def test_labels_read_at_start_are_the_atlas_s(app, setup, monkeypatch):
    from saeflow.viewer import data
    atlas = setup[0]
    view = app.extensions["saeflow.view"]
    assert view._labels_ready.wait(60) and view.index_status()["labels_ready"]
    assert set(view._site_labels) == set(atlas.sites)
    every = [site.feature(i) for site in atlas.sites for i in range(atlas.widths[site])]
    assert [view.label(f) for f in every] == [atlas.label(f) for f in every]
    assert sum(bool(view.label(f)) for f in every) > len(every) // 2
    monkeypatch.setattr(data, "PREFILL_LABELS", 10)  # larger atlases: labels read when asked
    big = data.AtlasView(atlas, contexts=view.contexts)
    big._prefill_labels()
    assert not big._site_labels and [big.label(f) for f in every[:50]] == [
        atlas.label(f) for f in every[:50]]


def test_graph_carries_the_export_layout_and_the_library_defaults(client, setup):
    """The viewer draws where the SVG export draws, with the thresholds saeflow.flow sets."""
    from saeflow.flow import BLOCK_THRESHOLD, RES_THRESHOLD, trace
    from saeflow.layout import KIND_COLORS, layout
    g = get(client, "/api/graph/3/res/4")
    want = layout(trace(setup[0], "3/res/4")).to_json()
    assert g["layout"] == want and set(g["layout"]["positions"]) == {n["id"] for n in g["nodes"]}
    o = get(client, "/api/overview")
    assert o["graph_defaults"]["res_threshold"] == RES_THRESHOLD
    assert o["graph_defaults"]["block_threshold"] == BLOCK_THRESHOLD
    assert o["kind_colors"] == KIND_COLORS


def test_graph_and_thresholds_follow_trace(client, setup):
    from saeflow.flow import trace
    atlas = setup[0]
    g = get(client, "/api/graph/3/res/4")
    want = trace(atlas, "3/res/4").to_json()
    assert [n["id"] for n in g["nodes"]] == [n["id"] for n in want["nodes"]]
    assert len(g["edges"]) == len(want["edges"]) and g["seed"] == "3/res/4"
    assert all(n["kind"] in ("res", "mlp", "att") for n in g["nodes"])
    loose = get(client, "/api/graph/3/res/4?res_threshold=0.05&block_threshold=0.05")
    strict = get(client, "/api/graph/3/res/4?res_threshold=0.99&block_threshold=0.99")
    # (links that are high by the atlas's lineage thresholds are kept at any threshold,
    # block nodes must pass both: saeflow.flow)
    assert [n["id"] for n in strict["nodes"]] == \
        [str(f) for f in trace(atlas, "3/res/4", 0.99, 0.99).features]
    assert all(n["kind"] == "res" for n in strict["nodes"])
    assert len(strict["nodes"]) <= len(g["nodes"]) <= len(loose["nodes"])
    assert g["settings"]["truncated"] is False
    capped = get(client, "/api/graph/3/res/4?res_threshold=0.05&block_threshold=0.05&max_nodes=3")
    assert len(capped["nodes"]) == 3 and capped["settings"]["truncated"] is True


def test_exports_in_every_format(client):
    from saeflow.flow import FlowGraph
    for fmt, mime in [("json", "application/json"), ("graphml", "application/xml"),
                      ("dot", "text/vnd.graphviz"), ("svg", "image/svg+xml"),
                      ("png", "image/png"), ("neuronpedia", "application/json")]:
        r = client.get(f"/api/export/2/res/3?fmt={fmt}&res_threshold=0.3")
        assert r.status_code == 200 and r.mimetype == mime, fmt
        assert "attachment" in r.headers["Content-Disposition"]
    png = client.get("/api/export/2/res/3?fmt=png").data
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    g = FlowGraph.from_json(json.loads(client.get("/api/export/2/res/3?fmt=json").data))
    assert str(g.seed) == "2/res/3"
    nb = json.loads(client.get("/api/export/2/res/3?fmt=neuronpedia").data)
    assert {"metadata", "nodes", "links"} <= set(nb)


# ---- errors and safety -------------------------------------------------------------------------
BAD = [("/api/features/9/res/1", 404), ("/api/features/2/res/96", 404),
       ("/api/features/2/att_z/1", 404), ("/api/features/abc", 400),
       ("/api/features/2/res/-1", 400), ("/api/features/", 404),
       ("/api/features/2/res/99999999999999999999", 404),
       ("/api/graph/2/res/3?res_threshold=nan", 400), ("/api/graph/2/res/3?res_threshold=2", 400),
       ("/api/graph/2/res/3?block_threshold=x", 400), ("/api/graph/2/res/3?res_threshold=inf", 400),
       ("/api/export/2/res/3?fmt=exe", 400), ("/api/graph/2/res/3?max_nodes=0", 400),
       ("/api/graph/2/res/3?max_nodes=5000", 400), ("/api/export/2/res/3?fmt=../../etc/passwd", 400),
       ("/api/search?limit=0", 400), ("/api/search?limit=100000", 400),
       ("/api/search?offset=-5", 400), ("/api/search?layer=x", 400),
       ("/api/search?lineage=bogus", 400), ("/api/search?kind=foo", 400),
       ("/api/search?q=" + "x" * 500, 400), ("/api/jobs/nope", 404), ("/api/nothing", 404),
       ("/api/steer", 405), ("/static/../atlas.json", 404), ("/static/%2e%2e/server.py", 404),
       ("/static/..%2f..%2fatlas.json", 404), ("/api/features/..%2F..%2Fatlas.json", 400),
       ("/../../etc/passwd", 404), ("/static//etc/passwd", 404)]


@pytest.mark.parametrize("url,status", BAD)
def test_bad_requests_are_json_4xx(client, url, status):
    body = get(client, url, status)
    assert isinstance(body["error"], str) and body["error"]
    assert "Traceback" not in body["error"] and "root:" not in json.dumps(body)


def test_static_files_only_from_the_package(client):
    assert client.get("/static/app.js").status_code == 200
    r = client.get("/")
    assert r.status_code == 200 and b"saeflow" in r.data
    assert "default-src 'self'" in r.headers["Content-Security-Policy"]


def test_foreign_host_header_is_refused(client):
    r = client.get("/api/overview", headers={"Host": "evil.example:8765"})
    assert r.status_code == 403 and "error" in r.get_json()
    assert client.get("/api/overview", headers={"Host": "127.0.0.1:8765"}).status_code == 200


def test_unexpected_errors_hide_details(app, client, monkeypatch):
    view = app.extensions["saeflow.view"]
    monkeypatch.setattr(view, "overview", lambda **kw: 1 / 0)
    body = get(client, "/api/overview", 500)
    assert "ZeroDivision" not in body["error"] and "Traceback" not in body["error"]


# ---- steering ----------------------------------------------------------------------------------
STEER = {"prompt": "The wedding", "seed": "2/res/3", "max_new_tokens": 6, "greedy": True,
         "magnitude": "none"}
BAD_STEER = [({}, 400), ({"prompt": ""}, 400), ({"prompt": "x"}, 400),
             ({**STEER, "seed": "9/res/1"}, 404), ({**STEER, "seed": "nope"}, 400),
             ({**STEER, "features": ["2/res/999"]}, 404), ({**STEER, "features": "2/res/1"}, 400),
             ({**STEER, "mode": "all"}, 400), ({**STEER, "schedule": "linear"}, 400),
             ({**STEER, "coefficient": "big"}, 400), ({**STEER, "coefficient": 1e9}, 400),
             ({**STEER, "max_new_tokens": 100000}, 400), ({**STEER, "features": ["3/res/1"], "layer": 0,
                                                           "mode": "single"}, 400),
             ({**STEER, "action": "explode"}, 400), ({**STEER, "magnitude": "huge"}, 400),
             ({**STEER, "greedy": "yes"}, 400)]


@pytest.mark.parametrize("body,status", BAD_STEER)
def test_bad_steering_requests(client, body, status):
    r = client.post("/api/steer", json=body)
    assert r.status_code == status, (body, r.get_json())
    assert r.get_json()["error"]


def test_steering_needs_json(client):
    r = client.post("/api/steer", data="prompt=x", content_type="application/x-www-form-urlencoded")
    assert r.status_code == 415


def test_steering_job_runs_the_plan_and_loads_the_model_once(client, setup, loads):
    from saeflow.hooks import hook_count
    from saeflow.steer import generate, plan_from_graph
    atlas, suite, lm, _ = setup
    r = client.post("/api/steer", json={**STEER, "coefficient": 6.0})
    assert r.status_code == 202
    job = wait_job(client, r.get_json()["id"])
    assert job["status"] == "done", job["error"]
    assert len(loads) == 1 and hook_count(lm.model) == 0
    # the plan is saeflow.steer's plan of the traced graph
    from saeflow.flow import trace
    plan = plan_from_graph(trace(atlas, "2/res/3"), coefficient=6.0)
    assert [(t["feature"], t["coefficient"]) for t in job["plan"]] == \
        [(str(f), c) for f, c in plan.terms]
    # the texts are those saeflow.steer.generate gives, steered and not
    plain = generate(lm, "The wedding", None, 6, greedy=True)[0].text
    steered = generate(lm, "The wedding", plan, 6, suite=suite, greedy=True)[0].text
    assert job["unsteered"] == plain and job["steered"] == steered and plain != steered
    assert job["progress"]["done"] == job["progress"]["total"] == 12
    # a zero coefficient changes nothing; the model is not loaded again
    job0 = wait_job(client, client.post("/api/steer", json={**STEER, "coefficient": 0.0})
                    .get_json()["id"])
    assert job0["steered"] == job0["unsteered"] == plain and len(loads) == 1
    assert get(client, "/api/status")["steering"]["model_loaded"] is True


def test_steering_from_a_token_index_on(client, setup):
    """steering-vectors' "only generated tokens": the plan's token window, as saeflow.steer
    applies it."""
    import dataclasses

    from saeflow.flow import trace
    from saeflow.steer import generate, plan_from_graph
    atlas, suite, lm, _ = setup
    plan = plan_from_graph(trace(atlas, "2/res/3"), coefficient=6.0)
    body = {**STEER, "coefficient": 6.0}
    gen = wait_job(client, client.post("/api/steer", json={**body, "generated_only": True})
                   .get_json()["id"])
    assert gen["status"] == "done", gen["error"]
    assert gen["window"] == {"from_token": 0, "generated_only": True}
    want = generate(lm, "The wedding", dataclasses.replace(plan, generated_only=True), 6,
                    suite=suite, greedy=True)[0].text
    every = generate(lm, "The wedding", plan, 6, suite=suite, greedy=True)[0].text
    assert gen["steered"] == want != every
    # the first new token is drawn from unsteered states
    assert lm.tokenizer(gen["steered"])["input_ids"][:1] == \
        lm.tokenizer(gen["unsteered"])["input_ids"][:1]
    late = wait_job(client, client.post("/api/steer", json={**body, "from_token": 5})
                    .get_json()["id"])
    assert late["steered"] == generate(lm, "The wedding", dataclasses.replace(plan, from_token=5),
                                       6, suite=suite, greedy=True)[0].text
    never = wait_job(client, client.post("/api/steer", json={**body, "from_token": 10_000})
                     .get_json()["id"])
    assert never["steered"] == never["unsteered"]  # no token is that far in
    for bad in ({"from_token": -1}, {"from_token": "x"}, {"generated_only": "maybe"}):
        assert client.post("/api/steer", json={**body, **bad}).status_code == 400


def test_steering_with_picked_nodes(client, setup):
    job = wait_job(client, client.post("/api/steer", json={
        **STEER, "features": ["1/res/21", "2/mlp/47"], "coefficient": 3.0,
        "magnitude": "res_norm"}).get_json()["id"])
    assert job["status"] == "done", job["error"]
    assert {t["feature"] for t in job["plan"]} == {"1/res/21", "2/mlp/47"}
    assert job["magnitude"] == "res_norm" and all(t["magnitude"] > 0 for t in job["plan"])


def test_theme_search_job(client, tmp_path, monkeypatch):
    monkeypatch.setenv("SAEFLOW_CACHE", str(tmp_path))
    request = {"description": "weddings", "site": "2/res", "top": 5,
               "examples": [TEXTS[1], TEXTS[1].upper()]}
    r = client.post("/api/themes", json=request)
    assert r.status_code == 202
    job = wait_job(client, r.get_json()["id"])
    assert job["status"] == "done", job["error"]
    assert len(job["features"]) == 5 and all(f["id"].startswith("2/res/") for f in job["features"])
    # the per-text statistics are kept with the other theme setups; a repeat search reads them
    stored = list((tmp_path / "theme-setup" / "feature-stats").glob("*.pt"))
    assert len(stored) == 1
    written = stored[0].stat().st_mtime_ns
    again = wait_job(client, client.post("/api/themes", json=request).get_json()["id"])
    assert again["features"] == job["features"]
    assert stored[0].stat().st_mtime_ns == written
    assert client.post("/api/themes", json={"description": ""}).status_code == 400
    assert client.post("/api/themes", json={"description": "x", "site": "9/res"}).status_code == 404


def test_closing_cancels_a_running_generation(setup, paused):
    from saeflow.hooks import hook_count
    from saeflow.viewer import create_app
    atlas, suite, lm, _ = setup
    reached, release = paused
    app = create_app(atlas.root, lm=lm, suite=suite, texts=TEXTS)
    c = app.test_client()
    job_id = c.post("/api/steer", json={**STEER, "max_new_tokens": 256}).get_json()["id"]
    running = app.extensions["saeflow.steering"].get(job_id)
    assert reached.wait(60)  # the unsteered continuation is two tokens in, and waits
    closing = threading.Thread(target=lambda: [close() for close in app.extensions["saeflow.close"]])
    closing.start()  # cancels the job, then waits for the worker
    assert running.wait_cancel(30)
    release.set()  # the generation goes on: its stopping criterion sees the cancellation
    closing.join(60)
    assert running.wait(30)
    job = get(c, f"/api/jobs/{job_id}")
    assert job["status"] == "error" and "cancelled" in job["error"]
    assert job["progress"]["done"] < 2 * 256 and hook_count(lm.model) == 0
    assert c.post("/api/steer", json=STEER).status_code == 429  # closed: no new jobs


def test_viewer_without_a_model_refuses_steering(setup):
    from saeflow.viewer import create_app
    c = create_app(setup[0], steering_off_reason="no suite here").test_client()
    steering = c.get("/api/overview").get_json()["steering"]
    assert steering["available"] is False and steering["reason"] == "no suite here"
    r = c.post("/api/steer", json=STEER)
    assert r.status_code == 409 and "model" in r.get_json()["error"]


# ---- the real server ---------------------------------------------------------------------------
def _http(url, data=None, timeout=30):
    req = urllib.request.Request(url, data=json.dumps(data).encode() if data else None,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_server_answers_while_a_generation_runs(app, paused):
    from saeflow.viewer import ViewerServer
    reached, release = paused
    server = ViewerServer(app, port=0).start()
    try:
        status, job = _http(f"{server.url}/api/steer", {**STEER, "max_new_tokens": 200,
                                                       "coefficient": 2.0})
        assert status == 202
        assert reached.wait(60)  # the generation is running (and holds until released)
        answers, errors = [], []

        def hit():
            s, _ = _http(f"{server.url}/api/features/1/res/3")
            answers.append(s)
            if s != 200:
                errors.append(s)
        threads = [threading.Thread(target=hit) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        _, running = _http(f"{server.url}/api/jobs/{job['id']}")
        assert not errors and len(answers) == 16  # all answered while the job ran
        assert running["status"] == "running"
        release.set()
        assert app.extensions["saeflow.steering"].get(job["id"]).wait(120)
        _, running = _http(f"{server.url}/api/jobs/{job['id']}")
        assert running["status"] == "done" and running["steered"]
    finally:
        server.shutdown()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{server.url}/api/overview", timeout=2)


# ---- contexts ----------------------------------------------------------------------------------
def test_merge_topk_keeps_one_peak_per_sequence():
    from saeflow.contexts import merge_topk
    k, F = 2, 3
    vals = torch.zeros(F, k)
    seqs = torch.full((F, k), -1, dtype=torch.int32)
    pos = torch.full((F, k), -1, dtype=torch.int32)
    acts = torch.tensor([[[1.0, 0.0, 0.0], [5.0, 0.0, 0.0], [2.0, 0.0, 0.5]],   # seq 10
                         [[0.0, 0.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 4.0]]])  # seq 11
    vals, seqs, pos = merge_topk(vals, seqs, pos, acts, seq_offset=10)
    assert vals[0].tolist() == [5.0, 3.0] and seqs[0].tolist() == [10, 11]
    assert pos[0].tolist() == [2, 2]  # position 1 of the trimmed batch is token 2
    assert seqs[1].tolist() == [-1, -1] and vals[1].tolist() == [0.0, 0.0]  # never fires
    assert vals[2].tolist() == [4.0, 0.5] and pos[2].tolist() == [3, 3]
    acts2 = torch.zeros(1, 3, F)
    acts2[0, 0, 0] = 4.0
    vals, seqs, pos = merge_topk(vals, seqs, pos, acts2, seq_offset=12)
    assert vals[0].tolist() == [5.0, 4.0] and seqs[0].tolist() == [10, 12]


def test_contexts_resume_after_an_interruption(setup, tmp_path, monkeypatch):
    import saeflow.hooks
    from saeflow.contexts import ContextSettings, Contexts, compute_contexts
    _, suite, lm, _ = setup
    cfg = ContextSettings(n_tokens=4 * 32 * 3, seq_len=32, batch_size=4)
    sites = [Site(1, "res"), Site(2, "mlp")]
    full = Contexts(compute_contexts(lm, suite, tmp_path / "a", cfg, sites=sites, texts=TEXTS,
                                     progress=False))
    real, calls = saeflow.hooks.run_sites, []

    def flaky(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)
    monkeypatch.setattr(saeflow.hooks, "run_sites", flaky)
    with pytest.raises(KeyboardInterrupt):
        compute_contexts(lm, suite, tmp_path / "b", cfg, sites=sites, texts=TEXTS,
                         checkpoint_every=1, progress=False)
    partial = Contexts(tmp_path / "b" / "contexts.safetensors")
    assert not partial.complete and partial.info()["batches_done"] == 1
    monkeypatch.setattr(saeflow.hooks, "run_sites", real)
    resumed = Contexts(compute_contexts(lm, suite, tmp_path / "b", cfg, sites=sites, texts=TEXTS,
                                        progress=False))
    assert resumed.complete and resumed.info()["batches_done"] == 3
    assert torch.equal(resumed.tokens, full.tokens)
    for f in ("1/res/0", "1/res/50", "2/mlp/7"):
        assert resumed.top(f) == full.top(f)
    assert full.top(Feature.parse("3/res/1")) == []  # a site that was not computed


# ---- the command -------------------------------------------------------------------------------
def test_view_command_resolves_atlases(setup, tmp_path, capsys):
    from saeflow.cli import main
    from saeflow.catalog import find_atlas, model_loader
    atlas, suite = find_atlas(str(setup[0].root))
    assert atlas.root == setup[0].root and suite is None
    load, why = model_loader(atlas, None, None, model=None)
    assert load is None and "--suite" in (why or "")  # the planted suite lives in memory only
    assert main(["view", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err
    assert main(["view", str(setup[0].root), "--port", "70000"]) == 2


def test_contexts_command_end_to_end(setup, tmp_path, capsys):
    """`saeflow contexts` on an atlas of a suite and a model saved to disk."""
    from saeflow.atlas import compute_atlas
    from saeflow.cli import main
    from saeflow.contexts import Contexts
    from saeflow.catalog import load_suite
    _, suite, lm, _ = setup
    lm.model.save_pretrained(tmp_path / "model")
    tok = byte_tokenizer()
    tok.eos_token = "\u0100"  # byte 0: the corpus separates packed documents with EOS
    tok.save_pretrained(tmp_path / "model")
    small = type(suite).from_saes({s: suite[s] for s in ("1/res", "2/res", "2/mlp")})
    small.save(tmp_path / "suite")
    disk = load_suite(tmp_path / "suite", model=str(tmp_path / "model"))
    atlas = compute_atlas(disk, tmp_path / "atlas", null_samples=64, labels=False, progress=False)
    (tmp_path / "text.txt").write_text("\n\n".join(dict.fromkeys(TEXTS)))
    assert main(["contexts", str(atlas.root), "--model", str(tmp_path / "model"),
                 "--source", str(tmp_path / "text.txt"), "--tokens", "256", "--seq-len", "32",
                 "--batch-size", "2", "--top", "3", "--sites", "2/res,2/mlp"]) == 0
    ctx = Contexts.find(atlas.root)
    assert ctx is not None and ctx.complete and [str(s) for s in ctx.sites] == ["2/mlp", "2/res"]
    assert ctx.info()["settings"]["top_k"] == 3 and "contexts for 2 sites" in capsys.readouterr().out
    assert main(["contexts", str(atlas.root), "--model", str(tmp_path / "model"),
                 "--sites", "9/res"]) == 2
