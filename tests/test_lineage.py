"""Lineage classes, null thresholds (an anisotropic null that can say "low"), the minimum effect
size, overrides, layer-0 names, table and plot."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from saeflow.lineage import (CLASSES, DEFAULT_MIN_COS, NO_PREVIOUS, class_names, classify,
                             fraction_table, fractions, null_quantiles, null_scores,
                             parse_threshold_spec, plot_fractions, plot_lineage,
                             random_rotation, resolve_thresholds)
from saeflow.match import cosine_topk


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
    """On isotropic rows the 0.99 null quantile sits above unrelated features and below planted
    copies, for the Gaussian and the rotation null alike."""
    g = torch.Generator().manual_seed(0)
    src = torch.randn(2000, 64, generator=g)
    tgt = torch.randn(1000, 64, generator=g)
    tgt[:300] = src[:300] + 0.5 * torch.randn(300, 64, generator=g)  # planted copies
    s = cosine_topk(tgt, src).values[:, 0].numpy()
    for kind in ("gaussian", "rotation"):
        null = null_scores(tgt, src, n=1000, seed=1, kind=kind)
        assert null.shape == (1000,)
        t = float(np.quantile(null.numpy(), 0.99))
        assert (s[:300] > t).mean() > 0.99
        assert 0.0 < (s[300:] > t).mean() < 0.05, kind  # about 1% by construction


def anisotropic(n, g, mean, basis, noise=0.8):
    """Unit rows sharing a mean direction and a 6-d high-variance subspace, as real decoders
    do (plus isotropic noise)."""
    z = torch.randn(n, basis.shape[1], generator=g)
    x = 0.4 * mean + 0.6 * (z @ basis.T) / basis.shape[1] ** 0.5 + noise * torch.randn(
        n, len(mean), generator=g) / len(mean) ** 0.5
    return x / x.norm(dim=1, keepdim=True)


def test_anisotropic_null_calls_unrelated_rows_low_and_related_rows_high():
    """Planted: 300 target rows are noised copies of source rows (related), 700 are fresh rows
    of the same anisotropic distribution (unrelated). The Gaussian null keeps the shared
    geometry and calls ~1% of the unrelated rows high; the rotation null calls most of them
    high, because the shared mean and subspace alone give high cosines."""
    g = torch.Generator().manual_seed(0)
    d = 64
    mean = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)
    basis, _ = torch.linalg.qr(torch.randn(d, 6, generator=g))
    src = anisotropic(2000, g, mean, basis)
    related = src[:300] + 0.6 * torch.randn(300, d, generator=g) / d ** 0.5
    tgt = torch.cat([related, anisotropic(700, g, mean, basis)])
    s = cosine_topk(tgt, src).values[:, 0].numpy()
    nulls = {1: {"res": null_scores(tgt, src, n=2000, seed=1).numpy()}}
    th, rule = resolve_thresholds(nulls, 0.99, min_cos=DEFAULT_MIN_COS)
    t = th[1]["res"]
    assert "gaussian null" in rule and "minimum effect size cos 0.2" in rule
    assert (s[:300] > t).mean() > 0.99  # related: high
    assert (s[300:] > t).mean() < 0.04  # unrelated: low (nominally 1%)
    rot = float(np.quantile(null_scores(tgt, src, n=2000, seed=1, kind="rotation"), 0.99))
    assert rot < t - 0.1 and (s[300:] > rot).mean() > 0.8  # the old null cannot say low
    # the minimum effect size binds where the null is lower
    th, _ = resolve_thresholds(nulls, 0.99, min_cos=0.9)
    assert th[1]["res"] == 0.9 and null_quantiles(nulls, 0.99)[1]["res"] == pytest.approx(t)


def test_layers_without_a_previous_residual_are_not_called_newborn():
    names = class_names(has_res=False)
    assert names[CLASSES.index("newborn_mlp")] == "no_prev_mlp"
    assert names[CLASSES.index("unexplained")] == "no_prev_unexplained"
    assert not any(n.startswith("newborn") for n in names)
    assert class_names(True) == CLASSES and set(NO_PREVIOUS.values()) <= set(names)


def test_resolve_thresholds_rules_and_overrides():
    nulls = {1: {"res": np.linspace(0, 1, 101), "mlp": np.full(5, 0.2)},
             2: {"res": np.linspace(0, 1, 101), "mlp": np.full(5, 0.3), "att": np.full(5, 0.4)}}
    th, rule = resolve_thresholds(nulls, 0.9)
    assert th[1]["res"] == pytest.approx(0.9) and th[2]["att"] == pytest.approx(0.4)
    assert np.isnan(th[1]["att"]) and "0.9 quantile" in rule
    th, _ = resolve_thresholds(nulls, 0.9, min_cos=0.35)
    assert th[1]["mlp"] == 0.35 and th[1]["res"] == pytest.approx(0.9) and np.isnan(th[1]["att"])
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
    assert "50.0%" in table and "33.3%" in table and len(table.splitlines()) == 4
    assert table.splitlines()[1].startswith("   0*") and "no_prev_mlp" in table.splitlines()[3]
    out = plot_fractions(per_layer, tmp_path / "sub" / "lineage.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from saeflow.thresholds import share_curves
    rng = np.random.default_rng(0)
    scores = {L: {k: rng.random(50).astype(np.float32) for k in ("res", "mlp", "att")}
              for L in (1, 2, 3)}
    th = {L: {"res": 0.5, "mlp": 0.5, "att": 0.5} for L in (1, 2, 3)}
    curves = share_curves(scores, th, grid=[0.0, 0.5, 1.0])
    per = {L: fractions(classify(s["res"], s["mlp"], s["att"], 0.5, 0.5, 0.5))
           for L, s in scores.items()}
    out = plot_lineage(per, tmp_path / "grid.png", thresholds=th, curves=curves, rule="rule")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_one_source_site_rule_for_the_atlas_and_deactivation():
    """R_(L-1), M_L and A_L where the suite has SAEs; att_z stands in for att; none at layer 0."""
    from saeflow.atlas import layer_sources
    from saeflow.deactivate import predecessor_sites
    from saeflow.sites import Site
    from saeflow.sources import source_sites
    have = {Site.parse(s) for s in ("0/res", "0/mlp", "0/att_z", "1/res", "1/att", "1/att_z",
                                    "2/mlp", "3/res", "3/mlp")}
    assert source_sites(have, 0) == {"mlp": Site(0, "mlp"), "att": Site(0, "att_z")}
    assert source_sites(have, 1) == {"res": Site(0, "res"), "att": Site(1, "att")}
    assert source_sites(have, 3) == {"mlp": Site(3, "mlp")}  # no 2/res
    assert layer_sources(have) == {L: source_sites(have, L) for L in (0, 1, 3)}
    assert predecessor_sites is source_sites
