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
    assert page.count("data:image/png;base64,") >= 4  # plots are inlined: one self-contained file
    # everything went into the test's cache; a second run reuses the suite and the atlas
    assert (own_cache / "suites" / "smollm2-quick" / "suite.json").exists()
    assert (own_cache / "atlases" / "smollm2-quick" / "atlas.json").exists()
    assert main(["demo", "--quick", "--out", str(out)]) == 0


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
