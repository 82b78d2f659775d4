"""``saeflow atlas``'s threshold rule options (--null, --min-cos, --null-suite, --calibrate) on a
planted suite: the command's atlas is classified as the library classifies it, a calibration
from a deactivation pairs table sets the known threshold, and bad combinations are refused."""

from __future__ import annotations

import csv
import json

import pytest

from saeflow.atlas import Atlas
from saeflow.cli import main
from saeflow.synthetic import planted_suite
from saeflow.thresholds import calibrate


@pytest.fixture(scope="module")
def suites(tmp_path_factory):
    root = tmp_path_factory.mktemp("atlas-options")
    planted_suite(3, 128, 32, seed=5)[0].save(root / "suite")
    planted_suite(3, 128, 32, seed=6, name="other-seed")[0].save(root / "reference")
    # a deactivation table for layer 1, res: success exactly above cos 0.4 (40 pairs)
    with open(root / "pairs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["layer", "kind", "strategy", "r", "cos", "success"])
        for i in range(40):
            cos = (i + 0.5) / 40
            w.writerow([1, "res", "top1", 0.0, cos, cos > 0.4])
    return root


def test_null_min_cos_and_calibration_reach_the_atlas(suites, tmp_path):
    out = tmp_path / "atlas"
    argv = ["atlas", str(suites / "suite"), "--out", str(out), "--no-labels", "--null",
            "rotation", "--min-cos", "0.15", "--calibrate", str(suites / "pairs.csv")]
    assert main(argv) == 0
    atlas = Atlas.load(out)
    cal = calibrate(suites / "pairs.csv")
    assert cal.thresholds[1]["res"] == pytest.approx(16.5 / 40)  # the first successful cosine
    want = atlas.with_thresholds(null="rotation", min_cos=0.15, calibration=cal)
    assert json.dumps(atlas.thresholds) == json.dumps(want.thresholds)  # NaN: no R_(-1)
    assert atlas.thresholds[1]["res"] == 16.5 / 40
    assert atlas.class_fractions() == want.class_fractions()
    assert atlas.info["threshold_rule"].startswith("calibrated")
    assert "rotation null" in atlas.info["threshold_rule"]
    other = atlas.with_thresholds(null="gaussian", min_cos=0.15)
    assert other.thresholds[2]["mlp"] != atlas.thresholds[2]["mlp"]  # the null mattered
    assert (out / "lineage.png").read_bytes()[:4] == b"\x89PNG"


def test_reference_null_needs_and_uses_a_reference_suite(suites, tmp_path, capsys):
    base = ["atlas", str(suites / "suite"), "--no-labels", "--null", "reference"]
    assert main(base + ["--out", str(tmp_path / "a")]) == 2
    assert "--null-suite" in capsys.readouterr().err
    assert main(base + ["--out", str(tmp_path / "b"), "--null-suite",
                        str(suites / "reference")]) == 0
    atlas = Atlas.load(tmp_path / "b")
    assert "reference" in atlas.available_nulls
    assert atlas.info["threshold_rule"].startswith("reference null")
    assert main(["atlas", str(suites / "suite"), "--min-cos", "2", "--out",
                 str(tmp_path / "c")]) == 2
    assert "--min-cos" in capsys.readouterr().err
