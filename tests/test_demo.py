"""The main job end to end: ``saeflow demo --quick`` on the real embedded model."""

import json
import re

import pytest

from saeflow.cli import main
from saeflow.demo import DemoConfig


def test_demo_config_rejects_empty_theme():
    with pytest.raises(ValueError, match="--theme"):
        DemoConfig(themes=("",))


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    """A cache of the test's own, so the demo trains and computes nothing into the user's;
    only the converted embedded model (read-only here) is shared when it exists."""
    from saeflow.models import cache_dir
    real = cache_dir() / "models" / "smollm2"
    cache = tmp_path / "cache"
    monkeypatch.setenv("SAEFLOW_CACHE", str(cache))
    if (real / "model.safetensors").exists():
        (cache / "models").mkdir(parents=True)
        (cache / "models" / "smollm2").symlink_to(real, target_is_directory=True)
    return cache


@pytest.mark.slow
def test_quick_demo_writes_a_report_from_its_own_results(tmp_path, capsys, own_cache):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert str((out / "report.html").resolve()) in printed
    page = (out / "report.html").read_text()
    # every stage left its raw results, and the report quotes them
    deact = json.loads((out / "deactivation" / "summary.json").read_text())
    steer = json.loads((out / "steering" / "summary.json").read_text())
    demo = json.loads((out / "demo.json").read_text())
    top1 = next(r for r in deact["summary"] if r["strategy"] == "top1" and r["kind"] == "all"
                and r["layer"] == "all")
    assert f"<td>{top1['n']}</td>" in page
    assert f"{top1['success_rate']:.3f}" in page
    prompting = steer["comparison"]["weddings"]["prompting"]["heldout"]
    assert f"{prompting:.3f}" in page
    seed = demo["seeds"]["weddings"]
    assert re.fullmatch(r"\d+/res/\d+", seed) and seed in page
    assert (out / "graphs" / f"{seed.replace('/res/', '-res-')}.json").exists()
    assert page.count("data:image/png;base64,") >= 6  # plots are inlined: one self-contained file
    # the evidence of the measurement fixes, from the result objects
    comp = steer["comparison"]["weddings"]
    assert f"{comp['prompting']['vs_unsteered']:+.3f}" in page  # paired against unsteered
    assert "Seed score" in page and f"\u25b6 {seed}" in page  # the seed's evidence
    assert "random active (chance)" in page and "pre-activation drop" in page
    assert "top-1 Pearson (underpowered)" in page  # 512 correlation tokens
    # pruning and persistence on the quick suite, computed into --out (nothing stored yet)
    prune = json.loads((out / "permutation" / "prune.json").read_text())
    ev = prune["layers"]["1"]["rows"][0]
    assert f"{ev['explained_variance']:.3f}" in page and "Persistence over depth" in page
    persist = json.loads((out / "permutation" / "persistence.json").read_text())
    assert {r["measure"] for r in persist["rows"]} == {"coactivation", "semantic"}
    assert all(k in demo["cpu_seconds"] for k in ("suite", "atlas", "steering", "permutations"))
    assert "stage times" in printed and "permutations" in page
    # everything went into the test's cache; a second run reuses the suite and the atlas
    assert (own_cache / "suites" / "smollm2-quick" / "suite.json").exists()
    assert (own_cache / "atlases" / "smollm2-quick" / "atlas.json").exists()
    stamps = {p: p.stat().st_mtime_ns for p in (out / "permutation").glob("*.json")}
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    assert json.loads((out / "demo.json").read_text())["seeds"] == demo["seeds"]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # read back, not recomputed


def test_report_reading_counts_only_differences_beyond_twice_the_standard_error():
    from saeflow.report import _reading

    def c(x, se):
        return {"heldout": x, "heldout_se": se}
    comp = {"a": {"prompting": c(0.5, 0.05), "single": c(0.2, 0.05), "cumulative": c(0.7, 0.05)},
            "b": {"prompting": c(0.5, 0.05), "single": c(0.3, 0.1), "cumulative": c(0.4, 0.1)}}
    text = _reading(comp)
    assert "cumulative beats single-layer on a;" in text
    assert "no clear difference on b." in text
    assert "beats prompting on a, loses to it on none, and ties on b." in text


# ---- the report's sections, from result objects with known numbers ---------------------------
def _cell(x, se, d=None, d_se=None, cell="single/15/0.25", norm=None):
    return {"heldout": x, "heldout_se": se, "vs_unsteered": d, "vs_unsteered_se": d_se,
            "cell": cell, "added_norm": norm, "n_heldout": 8}


def _comparison():
    return {"weddings": {
        "unsteered": _cell(0.05, 0.01, cell="unsteered"),
        "prompting": _cell(0.40, 0.05, 0.35, 0.05, cell="prompting"),
        "single": _cell(0.30, 0.04, 0.25, 0.04, norm=12.5),
        "cumulative": _cell(0.20, 0.04, 0.15, 0.03, "cumulative/22/0.05", norm=88.25),
        "cumulative_norm": _cell(0.28, 0.04, 0.23, 0.04, "cumulative_norm/15/0.25", norm=12.5),
        "cumulative_vs_single": {"diff": -0.1, "se": 0.02, "n": 8},
        "equal_norm": {"diff": 0.0123, "diff_se": 0.0321, "n": 16, "cells": [
            {"layer": 15, "coefficient": 0.25, "added_norm": 12.5, "single": 0.3,
             "cumulative_norm": 0.31, "diff": 0.01, "diff_se": 0.02, "cumulative": 0.2,
             "cumulative_added_norm": 88.25}]},
        "split": {"selection": [("I think", 0)], "report": [("Today", 1)]}}}


def test_report_shows_paired_differences_equal_push_and_seed_evidence():
    from saeflow import report
    comp = _comparison()
    text = report._reading(comp)
    assert "single-layer beats cumulative on weddings" in text  # paired: -0.1 +- 0.02
    assert "Against unsteered text (paired), it wins on weddings" in text
    push = report._equal_push(comp)
    assert "-0.100 ± 0.020" in push and "+0.012 ± 0.032" in push and "1 / 16" in push
    assert "88.2" in push and "12.5" in push
    assert report._diff(comp["weddings"]["cumulative"]) == "+0.150 ± 0.030"
    assert "&#x27;I think&#x27; × seeds 0" in report._split(comp["weddings"]["split"])
    info = {"seed": "15/res/7", "seed_label": "wedding", "theme_split": {"seed_texts": 16},
            "ranked": [{"feature": "15/res/9", "seed_score": 1.5, "score": 9.0,
                        "specificity": 0.55, "relevance": 0.2, "fires_on": ["with"]},
                       {"feature": "15/res/7", "seed_score": 4.25, "score": 6.0,
                        "specificity": 0.9, "relevance": 0.6, "theme_density": 0.0123,
                        "fires_on": ["bride", "vows"], "background_density": None}]}
    ev = report._seed_evidence(info)
    assert "\u25b6 15/res/7" in ev and "\u25b6 15/res/9" not in ev
    assert "4.25" in ev and "0.900" in ev and "bride, vows" in ev and "0.0123" in ev


def test_report_deactivation_shows_chance_pre_drop_and_pearson_power(tmp_path):
    from saeflow import report
    from saeflow.deactivate import DeactivationResult, SummaryRow
    rows = [SummaryRow("top1", 0.0, "all", "all", 40, 0.25, 0.5, 0.4, 0.3125, 0.6, 0.7),
            SummaryRow("random_active", 0.0, "all", "all", 40, 0.05, 0.1, 0.0, 0.0625,
                       float("nan"), float("nan")),
            SummaryRow("pearson", 0.0, "all", "all", 30, 0.2, 0.4, 0.3, 0.2, 0.6, 0.7),
            SummaryRow("top1", 0.0, "6", "all", 40, 0.25, 0.5, 0.4, 0.3, 0.6, 0.7)]
    info = {"layers": {"6": {"pearson": {"tokens": 16384, "target_fires_median": 9.0,
                                         "underpowered": True}}}}
    html = report._deactivation(DeactivationResult([], rows, info), tmp_path)
    assert "random active (chance)" in html and "top-1 Pearson (underpowered)" in html
    assert "0.312" in html and "0.062" in html  # pre-activation drops
    assert "16,384 separate tokens" in html and "fires 9 times" in html
    assert html.count("<tr>") == 4  # header + the three "all" rows


def test_report_permutation_section_and_its_reading(tmp_path):
    from saeflow import report
    from saeflow.demo import PermutationStage
    from saeflow.persistence import PersistenceRow
    from saeflow.prune import PruneRow
    nan = float("nan")
    prune = [PruneRow(u, m, ev, dl, 100) for u, m, ev, dl in [
        (1, "permutation", 0.1, 2.0), (1, "skip", 0.4, 3.5), (5, "permutation", 0.45, 1.125),
        (5, "skip", 0.9, 0.25), (9, "permutation", 0.5, 1.5), (9, "skip", 0.8, nan)]]
    pers = [PersistenceRow("all", d, m, mean, ch, 0.01, 64) for d, m, mean, ch in [
        (1, "coactivation", 0.163, 0.003), (2, "coactivation", 0.12, 0.004),
        (1, "semantic", 0.469, 0.181), (2, "semantic", 0.383, 0.177)]]
    stage = PermutationStage("both-folded", [], prune, tmp_path / "prune.json",
                             {"n_seqs": 8, "seq_len": 128, "source": "default",
                              "split": "heldout"}, pers,
                             {"all": {"coactivation": {"half": 2, "significant": 2}}},
                             tmp_path / "persistence.json", {"n_features": 64, "starts": [5]},
                             {"prune": tmp_path / "a.png", "persistence": tmp_path / "b.png"})
    html = report._permutations(stage, tmp_path)
    assert "costs least at layer 5 (1.12 nats)" in html
    assert "it costs less than skip at 1 of 2 layers" in html  # layer 9's skip loss is nan
    assert "1.125" in html and "0.163" in html and "0.181" in html
    assert "half-excess distance 2, above chance to 2" in html and "8 &times; 128" in html
    assert "not produced" in html  # no plot files here
    assert "Not run" in report._permutations(None, tmp_path)


def test_stored_permutation_results_are_used_only_while_valid(tmp_path):
    import os

    from saeflow.demo import _stored_persistence, _stored_prune
    from saeflow.io import write_json_atomic

    class Store:
        folder = tmp_path

        def fingerprint(self, site):
            return f"fp-{site.layer}" if site.layer != 3 else "changed"
    assert _stored_prune(Store()) is None
    row = {"method": "skip", "explained_variance": 0.5, "delta_loss": 0.25, "tokens": 10}
    write_json_atomic(tmp_path / "prune.json", {"settings": {"text": {"n_seqs": 4}}, "layers": {
        "2": {"saes": ["fp-1", "fp-2"], "rows": [{**row, "layer": 2}]},
        "3": {"saes": ["fp-2", "fp-3"], "rows": [{**row, "layer": 3}]}}})
    stored = _stored_prune(Store())
    assert stored is not None
    rows, settings = stored
    assert [r.layer for r in rows] == [2] and settings["text"] == {"n_seqs": 4}
    path = tmp_path / "persistence.json"
    write_json_atomic(path, {"settings": {"a": 1}, "distances": {}, "rows": [
        {"start": 5, "distance": 1, "measure": "coactivation", "mean": 0.2, "chance": 0.0,
         "excess_se": 0.01, "n": 3}]})
    t = path.stat().st_mtime
    found = _stored_persistence(path, t - 1)
    assert found is not None and found[0][0].mean == 0.2
    assert _stored_persistence(path, t - 1, {"a": 2}) is None  # other settings
    os.utime(path, (t - 10, t - 10))
    assert _stored_persistence(path, t) is None  # a permutation was recomputed since


def test_stage_times_add_up_wall_and_cpu():
    from saeflow.demo import Stages
    st = Stages()
    for _ in range(2):
        with st("busy"):
            sum(i * i for i in range(200_000))
    with pytest.raises(RuntimeError):
        with st("fails"):
            raise RuntimeError
    assert set(st.wall) == {"busy", "fails"} and st.cpu["busy"] > 0
    assert st.table().splitlines()[-1].startswith("total")


def test_demo_dtype_auto_follows_the_hardware(monkeypatch):
    import torch

    import saeflow.compute
    from saeflow.compute import model_dtype
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine's answers
    assert model_dtype("float32", "cpu") == "float32" and model_dtype("auto", "cuda:1") == "bfloat16"
    assert model_dtype("auto", "mps") == "float32"
    assert model_dtype("auto", "auto") == "bfloat16"  # auto picks the GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for fast, want in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(saeflow.compute, "bf16_is_fast", lambda *a, fast=fast: fast)
        assert model_dtype("auto", "cpu") == want and model_dtype("auto", "auto") == want
