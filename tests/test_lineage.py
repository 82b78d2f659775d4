"""Lineage classes, the rotated-decoder null thresholds and their overrides, table and plot."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from saeflow.lineage import (CLASSES, classify, fraction_table, fractions, null_scores,
                             parse_threshold_spec, plot_fractions, random_rotation,
                             resolve_thresholds)


def test_classify_truth_table():
    hi, lo = 0.9, 0.1
    cases = {(hi, lo, lo): "translated", (hi, hi, lo): "processed_mlp",
             (hi, lo, hi): "processed_att", (hi, hi, hi): "processed_both",
             (lo, hi, lo): "newborn_mlp", (lo, lo, hi): "newborn_att",
             (lo, hi, hi): "newborn_both", (lo, lo, lo): "unexplained",
             (np.nan, hi, lo): "newborn_mlp", (np.nan, np.nan, np.nan): "unexplained"}
    r, m, a = (np.array([c[i] for c in cases]) for i in range(3))
    codes = classify(r, m, a, 0.5, 0.5, 0.5)
    assert [CLASSES[c] for c in codes] == list(cases.values())
    # per-kind thresholds are used per kind
    assert CLASSES[classify([0.4], [0.4], [0.4], 0.3, 0.5, 0.5)[0]] == "translated"


def test_random_rotation_is_orthogonal():
    R = random_rotation(32, seed=3)
    assert torch.allclose(R @ R.T, torch.eye(32), atol=1e-5)
    assert not torch.allclose(R, random_rotation(32, seed=4))


def test_null_separates_planted_from_chance():
    """The 0.99 null quantile sits above unrelated features and below planted copies."""
    g = torch.Generator().manual_seed(0)
    src = torch.randn(2000, 64, generator=g)
    tgt = torch.randn(1000, 64, generator=g)
    tgt[:300] = src[:300] + 0.5 * torch.randn(300, 64, generator=g)  # planted copies
    null = null_scores(tgt, src, n=1000, seed=1)
    assert null.shape == (1000,)
    t = float(np.quantile(null, 0.99))
    from saeflow.match import cosine_topk
    s = cosine_topk(tgt, src).values[:, 0].numpy()
    assert (s[:300] > t).mean() > 0.99
    assert 0.0 < (s[300:] > t).mean() < 0.05  # about 1% by construction


def test_resolve_thresholds_rules_and_overrides():
    nulls = {1: {"res": np.linspace(0, 1, 101), "mlp": np.full(5, 0.2)},
             2: {"res": np.linspace(0, 1, 101), "mlp": np.full(5, 0.3), "att": np.full(5, 0.4)}}
    th, rule = resolve_thresholds(nulls, 0.9)
    assert th[1]["res"] == pytest.approx(0.9) and th[2]["att"] == pytest.approx(0.4)
    assert np.isnan(th[1]["att"]) and "0.9 quantile" in rule
    th, rule = resolve_thresholds(nulls, 0.9, 0.25)
    assert all(v == 0.25 for layer in th.values() for v in layer.values()) and "user" in rule
    th, _ = resolve_thresholds(nulls, 0.9, {"mlp": 0.6})
    assert th[1]["mlp"] == 0.6 and th[1]["res"] == pytest.approx(0.9)
    th, _ = resolve_thresholds(nulls, 0.9, {"2": {"res": 0.1}, 1: 0.7})
    assert th[2]["res"] == 0.1 and th[2]["mlp"] == pytest.approx(0.3) and th[1]["att"] == 0.7
    with pytest.raises(ValueError, match="layer 7"):
        resolve_thresholds(nulls, 0.9, {"7": 0.1})
    with pytest.raises(ValueError, match="kinds"):
        resolve_thresholds(nulls, 0.9, {"2": {"xyz": 0.1}})
    with pytest.raises(ValueError, match="quantile"):
        resolve_thresholds(nulls, 1.5)


def test_parse_threshold_spec(tmp_path):
    assert parse_threshold_spec("0.3") == 0.3
    assert parse_threshold_spec("res=0.5, mlp=0.2") == {"res": 0.5, "mlp": 0.2}
    f = tmp_path / "t.json"
    f.write_text('{"3": {"res": 0.4}}')
    assert parse_threshold_spec(str(f)) == {"3": {"res": 0.4}}
    assert parse_threshold_spec(None) is None
    with pytest.raises(ValueError, match="kind=value"):
        parse_threshold_spec("high")
    with pytest.raises(FileNotFoundError):
        parse_threshold_spec(str(tmp_path / "missing.json"))


def test_fractions_table_and_plot(tmp_path):
    codes = np.array([0, 0, 1, 7], dtype=np.uint8)
    fr = fractions(codes)
    assert set(fr) == set(CLASSES) and sum(fr.values()) == pytest.approx(1.0)
    assert fr["translated"] == 0.5 and fr["newborn_att"] == 0.0
    per_layer = {0: fr, 1: fractions(np.array([4, 5, 6]))}
    table = fraction_table(per_layer, {0: {"res": float("nan"), "mlp": 0.2, "att": 0.3},
                                      1: {"res": 0.1, "mlp": 0.2, "att": 0.3}})
    assert "50.0%" in table and "33.3%" in table and len(table.splitlines()) == 3
    out = plot_fractions(per_layer, tmp_path / "sub" / "lineage.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
