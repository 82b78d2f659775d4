"""The atlas: planted lineage recovered, fast memory-mapped load, resume, labels, att_z."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from saeflow import atlas as atlas_mod
from saeflow.atlas import Atlas, compute_atlas, ensure_atlas
from saeflow.lineage import CLASSES
from saeflow.synthetic import planted_suite


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    suite, truth = planted_suite(5, 512, 128, seed=0)
    out = tmp_path_factory.mktemp("atlas")
    compute_atlas(suite, out, progress=False)
    return suite, truth, out


def test_planted_matches_and_classes(planted):
    suite, truth, out = planted
    atlas = Atlas.load(out)
    assert atlas.layers == [0, 1, 2, 3, 4]
    assert atlas.widths[atlas.sites[0]] == 512 and len(atlas.sites) == 15
    for L in atlas.layers:
        for kind, parents in (("res", truth.parent_res), ("mlp", truth.parent_mlp),
                              ("att", truth.parent_att)):
            col = atlas.column(L, f"pred_{kind}_idx")
            if L == 0 and kind == "res":
                assert col is None and "res" not in atlas.sources(0)
                continue
            has = parents[L] >= 0
            assert (np.asarray(col[:, 0])[has] == parents[L][has]).all(), (L, kind)
        acc = (atlas.lineage_codes(L) == truth.classes[L]).mean()
        assert acc > 0.93, (L, acc)
    # the API view of one planted translated feature
    L = 3
    i = int(np.flatnonzero(truth.classes[L] == CLASSES.index("translated"))[0])
    f = f"{L}/res/{i}"
    preds = atlas.predecessors(f)
    assert str(preds["res"][0]) == f"{L - 1}/res/{truth.parent_res[L][i]}" and preds["res"][1] > 0.8
    assert set(preds) == {"res", "mlp", "att"}
    assert atlas.lineage(f) == "translated"
    succ = atlas.successors(preds["res"][0], k=2)
    assert str(succ[0][0]) == f and len(succ) == 2 and succ[0][1] >= succ[1][1]
    assert (atlas.feature(f), pytest.approx(preds["res"][1])) in [
        (g, pytest.approx(c)) for g, c in atlas.children(preds["res"][0])]
    assert len(atlas.predecessors_topk(f)["mlp"]) == 5
    assert atlas.successors("4/res/0") == []  # last layer
    fr = atlas.class_fractions()
    assert set(fr) == set(atlas.layers) and all(
        sum(v.values()) == pytest.approx(1.0) for v in fr.values())
    assert fr[0]["translated"] == 0.0  # no R_{-1}


def test_load_is_memory_mapped(planted):
    """Loading reads no columns: they are memory-mapped (what makes opening an atlas fast)."""
    _, _, out = planted
    atlas = Atlas.load(out)
    atlas.predecessors("2/res/5")
    assert isinstance(atlas.column(2, "pred_res_cos"), np.memmap)
    info = json.loads((out / "atlas.json").read_text())
    assert info["schema"] == "saeflow.atlas/1" and "threshold_rule" in info
    assert set(info["thresholds"]["2"]) == {"res", "mlp", "att"}
    # the atlas says which rule and which numbers it used
    assert info["threshold_settings"] == {"null": "gaussian", "quantile": 0.99, "min_cos": 0.2,
                                          "calibration": None}
    assert "gaussian null" in info["threshold_rule"] and "0.2" in info["threshold_rule"]
    for kind in ("res", "mlp", "att"):
        t, n = info["thresholds"]["2"][kind], info["null_thresholds"]["2"][kind]
        assert t == max(n, 0.2)
    assert np.isnan(info["null_thresholds"]["0"]["res"])


def test_bad_feature_ids(planted):
    atlas = Atlas.load(planted[2])
    with pytest.raises(KeyError, match="no site 2/att_z"):
        atlas.predecessors("2/att_z/1")
    with pytest.raises(KeyError, match="out of range"):
        atlas.lineage("2/res/512")
    with pytest.raises(ValueError, match="cannot parse feature"):
        atlas.label("2/resid/1")
    with pytest.raises(ValueError, match="residual features"):
        atlas.lineage("2/mlp/1")
    with pytest.raises(FileNotFoundError, match="not an atlas"):
        Atlas.load(planted[2] / "layers")


def test_thresholds_override_reclassifies(planted):
    atlas = Atlas.load(planted[2])
    low = atlas.with_thresholds(-1.0)
    assert all(fr["processed_both"] == 1.0 for L, fr in low.class_fractions().items() if L > 0)
    assert low.class_fractions()[0]["newborn_both"] == 1.0
    assert atlas.class_fractions()[2]["translated"] > 0.3  # the original is untouched
    q = atlas.with_thresholds(quantile=0.5)
    assert q.thresholds[2]["res"] < atlas.thresholds[2]["res"]


def test_resume_after_interruption(tmp_path, monkeypatch):
    suite, truth = planted_suite(4, 256, 64, seed=1)
    full = compute_atlas(suite, tmp_path / "full", progress=False)
    calls = []
    real = atlas_mod.null_scores

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 7:  # layer 0 has 2 sources, layers 1.. have 3: fail inside layer 2
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(atlas_mod, "null_scores", flaky)
    with pytest.raises(KeyboardInterrupt):
        compute_atlas(suite, tmp_path / "resumed", progress=False)
    parts = sorted(p.name for p in (tmp_path / "resumed" / "layers").iterdir())
    assert parts == ["000", "001"] and not (tmp_path / "resumed" / "atlas.json").exists()
    counted = []

    def counting(*args, **kwargs):
        counted.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(atlas_mod, "null_scores", counting)
    resumed = compute_atlas(suite, tmp_path / "resumed", progress=False)
    assert len(counted) == 6  # only layers 2 and 3 were computed
    for L in full.layers:
        assert np.array_equal(full.lineage_codes(L), resumed.lineage_codes(L))
        assert np.array_equal(np.asarray(full.column(L, "pred_mlp_idx")),
                              np.asarray(resumed.column(L, "pred_mlp_idx")))
    with pytest.raises(ValueError, match="other settings"):
        compute_atlas(suite, tmp_path / "resumed", k=2, progress=False)


class _Tok:
    def decode(self, ids):
        return "".join(f"<{i}>" for i in ids)


def test_labels_and_att_z(tiny_llama, tmp_path):
    from saeflow.models import LM
    from saeflow.sae import SAE
    from saeflow.sites import Site
    from saeflow.suite import Suite

    lm = LM(model=tiny_llama.model, tokenizer=_Tok(), name="tiny", arch=tiny_llama.arch)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(40, 64, generator=g)  # att_z decoder rows (o_proj input basis)
    mapped = lm.att_z_to_residual(2, z)
    res = torch.randn(40, 64, generator=g)
    res[:10] = mapped[torch.arange(10) * 3]  # residual features written by att_z features

    def sae(W, site):
        return SAE(W_enc=W.T.clone(), b_enc=torch.zeros(len(W)), W_dec=W,
                   b_dec=torch.zeros(64), site=Site.parse(site))

    suite = Suite.from_saes({"2/res": sae(res, "2/res"), "2/att_z": sae(z, "2/att_z"),
                             "1/res": sae(torch.randn(30, 64, generator=g), "1/res")},
                            name="with-att-z")
    with pytest.raises(ValueError, match="att_z"):
        compute_atlas(suite, tmp_path / "a", progress=False)
    atlas = compute_atlas(suite, tmp_path / "b", lm, progress=False)
    assert atlas.sources(2) == {"res": Site(1, "res"), "att": Site(2, "att_z")}
    for i in range(10):
        f, cos = atlas.predecessors(f"2/res/{i}")["att"]
        assert str(f) == f"2/att_z/{3 * i}" and cos > 0.999
    assert atlas.successors("2/att_z/3")[0][0].index == 1
    assert atlas.has_labels
    want = lm.promoted_tokens(mapped[3:4], k=6)[0]
    assert atlas.tokens("2/att_z/3") == want
    assert atlas.label("2/res/0") == " · ".join(lm.promoted_tokens(res[:1], k=6)[0])


def test_ensure_atlas_caches(monkeypatch, tmp_path):
    monkeypatch.setenv("SAEFLOW_CACHE", str(tmp_path))
    suite, _ = planted_suite(2, 128, 32, seed=2, name="tiny-planted")
    a = ensure_atlas(suite, progress=False)
    assert a.root == tmp_path / "atlases" / "tiny-planted"
    stamp = (a.root / "layers" / "001" / "part.json").stat().st_mtime_ns
    before = np.array(a.column(1, "pred_res_idx"))
    b = ensure_atlas(suite)
    assert (b.root / "layers" / "001" / "part.json").stat().st_mtime_ns == stamp
    (b.root / "contexts.safetensors").write_bytes(b"computed contexts")
    k2 = ensure_atlas(suite, k=2, progress=False)  # other settings, same suite: recomputed,
    assert k2.info["settings"]["k"] == 2                # but the suite's contexts are kept
    assert (k2.root / "contexts.safetensors").read_bytes() == b"computed contexts"
    other, _ = planted_suite(2, 128, 32, seed=3, name="tiny-planted")  # same name, other suite
    c = ensure_atlas(other, progress=False)
    assert not np.array_equal(np.asarray(c.column(1, "pred_res_idx")), before)
    assert not (c.root / "contexts.safetensors").exists()


def test_cli_atlas(tmp_path):
    suite, _ = planted_suite(3, 128, 32, seed=4)
    suite.save(tmp_path / "suite")
    r = subprocess.run([sys.executable, "-m", "saeflow.cli", "atlas", str(tmp_path / "suite"),
                        "--out", str(tmp_path / "atlas"), "--no-labels", "--k", "2",
                        "--thresholds", "res=0.5"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "transl" in r.stdout and "user" in r.stdout
    assert (tmp_path / "atlas" / "lineage.png").read_bytes()[:4] == b"\x89PNG"
    assert Atlas.load(tmp_path / "atlas").thresholds[1]["res"] == 0.5
    r = subprocess.run([sys.executable, "-m", "saeflow.cli", "atlas", str(tmp_path / "nowhere")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "nowhere" in r.stderr


@pytest.mark.slow
def test_real_model_labels_and_att_z(tmp_path):
    """SmolLM2's unembedding labels every feature; its W_O maps an att_z SAE into the residual
    basis, where planted residual features find their att_z writers."""
    from saeflow.models import load_model
    from saeflow.sae import SAE
    from saeflow.sites import Site
    from saeflow.suite import Suite

    lm = load_model("smollm2")
    planted, _ = planted_suite(2, 128, lm.d_model, seed=7)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(64, lm.site_width(Site(1, "att_z")), generator=g)
    res = planted[Site(1, "res")]
    W = res.W_dec.clone()
    W[:8] = lm.att_z_to_residual(1, z[:8])
    saes = {s: planted[s] for s in planted.sites() if s != Site(1, "att")}
    saes[Site(1, "res")] = res.replace(W_dec=W, W_enc=W.T.clone())
    saes[Site(1, "att_z")] = SAE(W_enc=z.T.clone(), b_enc=torch.zeros(64), W_dec=z,
                                 b_dec=torch.zeros(z.shape[1]), site=Site(1, "att_z"))
    atlas = compute_atlas(Suite.from_saes(saes, name="real"), tmp_path, lm, progress=False)
    assert atlas.sources(1)["att"] == Site(1, "att_z")
    assert [atlas.predecessors(f"1/res/{i}")["att"][0].index for i in range(8)] == list(range(8))
    assert atlas.has_labels
    for f in ("0/res/3", "1/mlp/5", "1/att_z/2"):
        toks = atlas.tokens(f)
        assert len(toks) == 6 and all(isinstance(t, str) for t in toks) and atlas.label(f)
