"""The threshold vocabulary: causal calibration, share curves, flow cuts, layer-0 names, other
nulls and older atlases, on planted data with known answers."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from saeflow.atlas import Atlas, compute_atlas
from saeflow.deactivate import PairOutcome
from saeflow.lineage import CLASSES
from saeflow.synthetic import planted_suite
from saeflow.thresholds import Calibration, calibrate, flow_cuts, isotonic_fit


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    suite, truth = planted_suite(3, 256, 64, seed=2)
    out = tmp_path_factory.mktemp("atlas")
    return compute_atlas(suite, out, progress=False), suite, truth


def planted_pairs(seed=0):
    """Layer 2, res: success iff cos > 0.6 (plus 10% noise below); layer 2, mlp: success 20%
    at any cosine; layer 1, att: only 5 pairs."""
    rng = np.random.default_rng(seed)
    out = []

    def pair(layer, kind, cos, ok, strategy="top1", r=0.0):
        out.append(PairOutcome(layer, kind, strategy, r, 0, 1, f"{layer}/res/0", "x", float(cos),
                               1.0, 0.0 if ok else 1.0, 1.0 if ok else 0.0, bool(ok)))
    for c in rng.uniform(0.1, 0.95, 400):
        pair(2, "res", c, c > 0.6 or rng.random() < 0.1)
        pair(2, "res", c, True, strategy="top5")  # other strategies are ignored
    for c in rng.uniform(0.1, 0.95, 300):
        pair(2, "mlp", c, rng.random() < 0.2)
    for c in (0.2, 0.4, 0.6, 0.8, 0.9):
        pair(1, "att", c, True)
    return out


def test_isotonic_fit():
    assert isotonic_fit(np.array([0, 1, 0, 1, 1])).tolist() == [0, 0.5, 0.5, 1, 1]
    y = np.random.default_rng(0).random(50)
    fit = isotonic_fit(y)
    assert (np.diff(fit) >= -1e-12).all() and fit.mean() == pytest.approx(y.mean())


def test_calibration_finds_the_planted_cosine(tmp_path):
    cal = calibrate(planted_pairs(), level=0.5)
    assert cal.thresholds[2]["res"] == pytest.approx(0.6, abs=0.04)
    assert math.isinf(cal.thresholds[2]["mlp"])  # 20% success never reaches 50%
    assert 1 not in cal.thresholds and cal.pairs[1]["att"] == 5  # too few pairs: null rule
    assert cal.pairs[2]["res"] == 400  # top5 rows were not counted
    assert Calibration.from_json(json.loads(json.dumps(cal.to_json()))) == cal
    # a few lucky pairs at the top do not set a threshold
    lucky = [p._replace(success=p.cos > 0.93) for p in planted_pairs()
             if p.kind == "mlp" and not p.success]
    assert math.isinf(calibrate(lucky).thresholds[2]["mlp"])
    assert calibrate(lucky, min_support=1).thresholds[2]["mlp"] > 0.93
    # the same from the pairs.csv that `saeflow deactivate` writes
    path = tmp_path / "deact" / "pairs.csv"
    path.parent.mkdir()
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(PairOutcome._fields)
        w.writerows(planted_pairs())
    assert calibrate(path.parent).thresholds == cal.thresholds
    assert calibrate(path, level=0.9).thresholds[2]["res"] >= cal.thresholds[2]["res"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        calibrate(tmp_path / "nope")
    with pytest.raises(ValueError, match="no top1 pairs at r = -1"):
        calibrate(planted_pairs(), r=-1.0)
    with pytest.raises(ValueError, match="success rate"):
        calibrate(planted_pairs(), level=1.5)


def test_atlas_uses_a_calibration(small):
    atlas, _, _ = small
    cal = calibrate(planted_pairs())
    c = atlas.with_thresholds(calibration=cal)
    assert c.thresholds[2]["res"] == cal.thresholds[2]["res"]
    assert math.isinf(c.thresholds[2]["mlp"])
    assert c.thresholds[1] == atlas.thresholds[1]  # uncalibrated layers keep the null rule
    assert "calibrated" in c.info["threshold_rule"] and "layers [2]" in c.info["threshold_rule"]
    hm = np.asarray(c.scores(2)["mlp"]) > c.thresholds[2]["mlp"]
    assert not hm.any() and c.class_fractions()[2]["processed_mlp"] == 0.0
    assert c.info["threshold_settings"]["calibration"]["level"] == 0.5


def test_share_curves_and_layer_0_names(small):
    atlas, _, truth = small
    curves = atlas.share_curves(grid=[0.0, 0.5, 1.0])
    json.dumps(curves)  # the viewer reads it as JSON
    assert curves["no_previous"] == [0] and curves["grid"] == [0.0, 0.5, 1.0]
    for L in ("1", "2"):
        per = curves["layers"][L]
        assert per["unexplained"][-1] == 1.0  # nothing beats a cosine of 1
        assert sum(per[c][1] for c in CLASSES) == pytest.approx(1.0)
    # sweeping only s(R) turns carried features into newborn/unexplained ones
    res = atlas.share_curves(grid=[0.0, 1.0], vary="res")["layers"]["2"]
    assert res["translated"][1] == 0.0 and res["translated"][0] > 0.2
    with pytest.raises(ValueError, match="vary"):
        atlas.share_curves(vary="x")
    # layer 0 has no R_{-1}: its classes are named for that, not "newborn"
    i = int(np.flatnonzero(atlas.lineage_codes(0) == CLASSES.index("newborn_mlp"))[0])
    assert atlas.lineage(f"0/res/{i}") == "no_prev_mlp"
    assert atlas.class_names(0)[CLASSES.index("unexplained")] == "no_prev_unexplained"
    named = atlas.named_fractions()
    assert "no_prev_mlp" in named[0] and "newborn_mlp" not in named[0]
    assert "newborn_mlp" in named[1]
    assert set(atlas.class_fractions()[0]) == set(CLASSES)  # code names stay the keys


def test_flow_cuts():
    th = {1: {"res": 0.35, "mlp": 0.3, "att": 0.25}, 0: {"res": math.nan, "mlp": 0.3, "att": 0.3}}
    nulls = {1: {"res": 0.3, "mlp": 0.28, "att": 0.22}, 0: {"res": math.nan, "mlp": 0.28,
                                                            "att": 0.29}}
    cuts, notes = flow_cuts(th, nulls, 0.5, 0.15)
    assert cuts[1] == {"res": 0.35, "mlp": 0.3, "att": 0.25} and not notes
    assert cuts[0]["res"] == 0.5  # no R source: the user's number
    cuts, notes = flow_cuts(th, nulls, 0.1, 0.15, below_null=True)
    assert cuts[1] == {"res": 0.1, "mlp": 0.15, "att": 0.15}
    assert any("residual links" in n and "1" in n for n in notes)
    assert any("mlp nodes" in n for n in notes) and any("att nodes" in n for n in notes)
    cuts, notes = flow_cuts(th, nulls, 0.1, 0.15)  # no below_null: floored at the null
    assert cuts[1]["res"] == 0.3 and not notes
    _, notes = flow_cuts(th, nulls, 0.1, 0.15, below_null=True, layers=[0])
    assert all("residual" not in n for n in notes)  # only the asked layers are reported


def test_other_nulls_and_older_atlases(tmp_path):
    suite, _ = planted_suite(2, 128, 32, seed=4)
    other, _ = planted_suite(2, 128, 32, seed=9)  # same sites, another seed
    with pytest.raises(ValueError, match="needs null_suite"):
        compute_atlas(suite, tmp_path / "a", null="reference", progress=False)
    with pytest.raises(ValueError, match="unknown null"):
        compute_atlas(suite, tmp_path / "a", null="shuffle", progress=False)
    atlas = compute_atlas(suite, tmp_path / "a", null="reference", null_suite=other,
                          progress=False)
    assert atlas.threshold_settings["null"] == "reference"
    assert set(atlas.available_nulls) == {"gaussian", "rotation", "reference"}
    assert "reference" in atlas.info["threshold_rule"]
    rot = atlas.with_thresholds(null="rotation", min_cos=-1.0)
    nq = rot.null_thresholds[1]["res"]
    assert rot.thresholds[1]["res"] == nq
    assert nq == pytest.approx(np.quantile(atlas.nulls(1, "rotation")["res"], 0.99))
    # an atlas made before the Gaussian null (null_{kind}.npy = rotation) still classifies
    plain = compute_atlas(suite, tmp_path / "b", progress=False)
    for part in (tmp_path / "b" / "layers").iterdir():
        for f in part.glob("null_gaussian_*.npy"):
            f.unlink()
        for f in part.glob("null_rotation_*.npy"):
            f.rename(part / f.name.replace("null_rotation_", "null_"))
    old = Atlas.load(tmp_path / "b")
    again = old.with_thresholds()
    assert "only the rotation null" in again.info["threshold_rule"]
    assert again.null_thresholds[1]["res"] == pytest.approx(
        plain.with_thresholds(null="rotation").null_thresholds[1]["res"])
    with pytest.raises(ValueError, match="no gaussian null samples"):
        old.with_thresholds(null="gaussian")


def test_atlas_plot(small, tmp_path):
    atlas, _, _ = small
    out = atlas.plot(tmp_path / "lineage.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
