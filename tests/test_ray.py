"""The Ray back end (saeflow.recipes.distribute) on a local Ray started here (2 CPUs): the
steering evaluation, deactivation and the atlas give the same summaries with and without Ray,
and a unit whose worker dies (os._exit on its first attempt) is run again with the same
result. One Ray for the module; everything runs on tiny offline models."""

from __future__ import annotations

import csv
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'saeflow[ray]'; "
                                        "scripts/setup.sh --test installs it)")

from saeflow.recipes.distribute import Given, Pool, SuiteLoader  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # KillOnce, on the workers
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a worker of one CPU runs (and no spinning on a busy machine)
    yield
    torch.set_num_threads(threads)
    ray.shutdown()


class KillOnce:
    """A loader that, on the worker, makes ``target`` ("module.function") kill its process the
    first time any worker calls it (``marker`` records that it happened)."""

    def __init__(self, inner, target: str, marker: Path):
        self.inner, self.target, self.marker = inner, target, str(marker)

    def __call__(self):
        import importlib
        import os
        mod, name = self.target.rsplit(".", 1)
        module = importlib.import_module(mod)
        real, marker = getattr(module, name), self.marker

        def dying(*args, **kwargs):
            if not os.path.exists(marker):
                open(marker, "w").close()
                os._exit(1)
            return real(*args, **kwargs)
        setattr(module, name, dying)
        return self.inner()


def without_seconds(data):
    """A summary with the wall times taken out (the only thing a run on Ray changes)."""
    if isinstance(data, dict):
        return {k: without_seconds(v) for k, v in data.items() if "seconds" not in k}
    if isinstance(data, list):
        return [without_seconds(v) for v in data]
    return data


# ---- steer-eval ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def steering():
    from test_evaluate import _sweep_setup
    from test_steer import char_lm, flow_graph
    lm = char_lm()
    suite, topic, coherence, sweep = _sweep_setup(lm)
    return lm, suite, topic, coherence, sweep, flow_graph()


def _steer_eval(steering, out: Path, ray_address=None, loader=None, monkeypatch=None):
    from test_evaluate import toy_embed

    import saeflow.recipes.steer_eval as se
    lm, suite, topic, coherence, sweep, graph = steering
    cfg = se.SteerEvalConfig(themes=("weddings",), out=str(out), layers=(1,),
                             modes=sweep.modes, coefficients=(4.0,), prompts=sweep.prompts,
                             seeds=(0,), samples=1, max_new_tokens=sweep.max_new_tokens,
                             report_prompts=sweep.report_prompts, judge_sample=0,
                             equal_norm=False, ray=ray_address)
    setup = se.ThemeSetup(graph, None, topic, coherence, [1],
                          {"seed": str(graph.seed), "seed_label": ""})
    monkeypatch.setattr(se, "setup_theme", lambda *a, **k: setup)  # no theme corpus here
    return se.run_steer_eval(cfg, suite, lm, atlas=None, embed=toy_embed, log=lambda s: None,
                             loader=loader)


def test_steer_eval_cells_on_ray_equal_the_local_run(steering, tmp_path, monkeypatch):
    local = _steer_eval(steering, tmp_path / "local", monkeypatch=monkeypatch)
    lm, suite = steering[:2]
    marker = tmp_path / "killed"
    on_ray = _steer_eval(steering, tmp_path / "ray", "local", monkeypatch=monkeypatch,
                         loader=KillOnce(Given(lm, suite), "saeflow.evaluate.generate", marker))
    assert marker.exists()  # a worker died in a cell, and the cell was run again
    want = json.loads((tmp_path / "local" / "summary.json").read_text())
    got = json.loads((tmp_path / "ray" / "summary.json").read_text())
    assert len(want["rows"]) == 4 + 4 and without_seconds(got) == without_seconds(want)
    res = [json.loads((tmp_path / d / "weddings" / "results.json").read_text())
           for d in ("local", "ray")]
    assert list(res[1]["cells"]) == list(res[0]["cells"])  # saved in sweep order
    assert without_seconds(res[1]) == without_seconds(res[0])  # the generations too
    assert [r.theme for r in on_ray.runs] == [r.theme for r in local.runs]


def stop_after(n: int, results):
    """Pass ``n`` results on, then stop as a killed run does."""
    for i, r in enumerate(results):
        if i == n:
            raise KeyboardInterrupt
        yield r


def test_an_interrupted_sweep_on_ray_resumes_with_the_cells_left(steering, tmp_path):
    from saeflow.evaluate import cells, load_results, run_sweep
    lm, suite, topic, coherence, sweep, graph = steering
    pool = Pool("local", Given(lm, suite))
    out = tmp_path / "results.json"
    asked = []

    def fan_out(fn, args, units):
        asked.append([u[0] for u in units])
        return stop_after(3, pool.map(fn, args, units)) if len(asked) == 1 else \
            pool.map(fn, args, units)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(lm, suite, "weddings", graph, sweep, out, topic, coherence, fan_out=fan_out)
    assert len(load_results(out)) == 3
    res = run_sweep(lm, suite, "weddings", graph, sweep, out, topic, coherence, fan_out=fan_out)
    every = [c[0] for c in cells(sweep)]
    assert len(asked[1]) == len(every) - 3 and not set(asked[1]) & (set(every) - set(asked[0]))
    assert [r.cell for r in res] == every  # saved in sweep order
    local = run_sweep(lm, suite, "weddings", graph, sweep, tmp_path / "local.json", topic,
                      coherence)
    assert [without_seconds(r.row()) for r in res] == [without_seconds(r.row()) for r in local]


# ---- deactivation -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def deactivation_files(tmp_path_factory):
    """A tiny model with the byte tokenizer saved as a folder, a suite folder naming it, and
    a text file of the user's own."""
    from tiny import byte_tokenizer, tiny_llama

    from saeflow.sae import SAE
    from saeflow.suite import Suite
    root = tmp_path_factory.mktemp("deactivation")
    tiny_llama(seed=3).save_pretrained(root / "model")
    byte_tokenizer().save_pretrained(root / "model")
    g = torch.Generator().manual_seed(0)
    saes = {}
    for site in ("1/res", "2/res", "2/mlp", "2/att", "3/res", "3/mlp", "3/att"):
        W = torch.randn(96, 64, generator=g)
        saes[site] = SAE(W_enc=W.T.clone(), b_enc=torch.zeros(96), W_dec=W,
                         b_dec=torch.zeros(64), activation="topk", k=8)
    Suite.from_saes(saes, model=str(root / "model"), name="tiny").save(root / "suite")
    words = "the cat sat on a mat while dogs ran far over green hills and rivers".split()
    paras = [" ".join(words[j] for j in torch.randint(0, len(words), (12,), generator=g))
             for _ in range(30)]
    (root / "texts.txt").write_text("\n\n".join(paras))
    return root


def _deactivate_argv(root: Path, out: Path) -> list[str]:
    return ["deactivate", str(root / "suite"), "--texts", str(root / "texts.txt"),
            "--layers", "2,3", "--n-texts", "9", "--tokens-per-text", "2", "--max-pairs", "400",
            "--r", "0,0.5", "--corr-tokens", "300", "--strategies", "top1,random5,pearson",
            "--no-plots", "--out", str(out)]


def test_deactivation_layers_on_ray_equal_the_local_run(deactivation_files, tmp_path):
    from saeflow.catalog import open_suite
    from saeflow.cli import main
    from saeflow.deactivate import DeactivationConfig
    from saeflow.recipes.deactivation import (DeactivationRun, run_deactivation_check,
                                              save_deactivation)
    root = deactivation_files
    assert main(_deactivate_argv(root, tmp_path / "local")) == 0
    assert main(_deactivate_argv(root, tmp_path / "ray") + ["--ray", "--ray-units", "3"]) == 0
    want = json.loads((tmp_path / "local" / "summary.json").read_text())
    got = json.loads((tmp_path / "ray" / "summary.json").read_text())
    assert got["summary"] == want["summary"] and want["summary"]
    for L in ("2", "3"):  # the counts and notes; not the times, nor the float check of the
        a, b = (without_seconds(x["info"]["layers"][L]) for x in (want, got))  # block re-run
        assert a.pop("recompute_error") < 1e-3 and b.pop("recompute_error") < 1e-3
        assert a == b
    pairs = [list(csv.reader(open(tmp_path / d / "pairs.csv"))) for d in ("local", "ray")]
    assert pairs[1] == pairs[0] and len(pairs[0]) > 20
    # the layer checkpoints are a local run's (a run resumes with or without Ray)
    for L in (2, 3):
        ckpt = [json.loads((tmp_path / d / "checkpoints" / f"layer-{L}.json").read_text())
                for d in ("local", "ray")]
        assert ckpt[0]["fingerprint"] == ckpt[1]["fingerprint"]
        assert ckpt[0]["pairs"] == ckpt[1]["pairs"]
    units = sorted(p.name for p in (tmp_path / "ray" / "checkpoints" / "units").iterdir())
    assert units == [f"layer-{L}-part-{i}-of-3.npz" for L in (2, 3) for i in range(3)]

    # a worker dies inside a layer (in the re-run of edited rows): that layer is redone
    cfg = DeactivationConfig(layers=(2, 3), strategies=("top1", "random5", "pearson"),
                             rs=(0.0, 0.5), tokens_per_text=2, max_pairs=400, corr_tokens=300)
    suite, lm = open_suite(root / "suite")
    marker = tmp_path / "killed"
    run = DeactivationRun(cfg, texts=str(root / "texts.txt"), n_texts=9,
                          out=str(tmp_path / "killed-run"), ray="local")
    loader = KillOnce(SuiteLoader(str(root / "suite")), "saeflow.deactivate.iter_edited_acts",
                      marker)
    result = run_deactivation_check(run, suite, lm, log=lambda s: None, loader=loader)
    assert marker.exists()
    save_deactivation(result, tmp_path / "killed-run", plots=False)
    again = json.loads((tmp_path / "killed-run" / "summary.json").read_text())
    assert again["summary"] == want["summary"]

    # the run stopped after one unit of its first layer came back: the re-run keeps that unit
    from saeflow.deactivate import run_deactivation, tokenize_texts
    from saeflow.recipes.deactivation import choose_texts
    from saeflow.recipes.distribute import deactivation_fan_out
    ids = tokenize_texts(lm, choose_texts(run)[0], cfg.max_len)
    quick = replace(cfg, strategies=("top1", "random5"))
    ckpt = tmp_path / "ckpt"
    fan = deactivation_fan_out(Pool("local", Given(lm, suite)), quick, 3, ckpt)
    calls = []

    def fan_out(*args):
        calls.append(1)
        return stop_after(1, fan(*args)) if len(calls) == 1 else fan(*args)
    with pytest.raises(KeyboardInterrupt):
        run_deactivation(lm, suite, ids, None, quick, ckpt, progress=False, fan_out=fan_out)
    saved = {f: f.stat().st_mtime_ns for f in (ckpt / "units").iterdir()}
    assert 1 <= len(saved) < 3  # (saved as it came back, before the run stopped)
    resumed = run_deactivation(lm, suite, ids, None, quick, ckpt, progress=False,
                               fan_out=fan_out)
    assert {f: f.stat().st_mtime_ns for f in saved} == saved  # reused, not redone
    assert len(list((ckpt / "units").iterdir())) == 6
    assert resumed.pairs == run_deactivation(lm, suite, ids, None, quick, progress=False).pairs


# ---- atlas --------------------------------------------------------------------------------
def _same_atlas(a: Path, b: Path) -> None:
    from saeflow.atlas import Atlas
    x, y = Atlas.load(a), Atlas.load(b)
    assert json.dumps(x.thresholds) == json.dumps(y.thresholds)  # NaN where no R_(L-1)
    assert x.class_fractions() == y.class_fractions()
    assert x.info["threshold_rule"] == y.info["threshold_rule"]
    for L in x.layers:
        names = sorted(p.name for p in (a / "layers" / f"{L:03d}").glob("*.npy"))
        assert names == sorted(p.name for p in (b / "layers" / f"{L:03d}").glob("*.npy"))
        for n in names:
            assert np.array_equal(np.load(a / "layers" / f"{L:03d}" / n),
                                  np.load(b / "layers" / f"{L:03d}" / n)), (L, n)


def test_atlas_layers_on_ray_equal_the_local_run(tmp_path, monkeypatch):
    from saeflow.cli import main
    from saeflow.recipes.atlas import AtlasOptions, build_atlas
    from saeflow.synthetic import planted_suite
    suite, _ = planted_suite(4, 128, 32, seed=4)
    suite.save(tmp_path / "suite")
    monkeypatch.chdir(tmp_path)  # a relative suite path reaches the workers resolved
    base = ["atlas", "suite", "--no-labels", "--k", "3", "--null", "rotation",
            "--min-cos", "0.1"]
    assert main(base + ["--out", str(tmp_path / "local")]) == 0
    assert main(base + ["--out", str(tmp_path / "ray"), "--ray"]) == 0
    _same_atlas(tmp_path / "local", tmp_path / "ray")

    # a worker dies while matching a layer; that layer is matched again
    marker = tmp_path / "killed"
    opts = AtlasOptions(k=3, null="rotation", min_cos=0.1, labels=False, ray="local")
    loader = KillOnce(Given(None, suite), "saeflow.match.cosine_topk_pair", marker)
    build_atlas(suite, opts, None, out=tmp_path / "killed-run", loader=loader)
    assert marker.exists()
    _same_atlas(tmp_path / "local", tmp_path / "killed-run")


def test_atlas_on_ray_into_the_cache(tmp_path, monkeypatch):
    from saeflow.atlas import ensure_atlas
    from saeflow.recipes.atlas import AtlasOptions, build_atlas
    from saeflow.synthetic import planted_suite
    monkeypatch.setenv("SAEFLOW_CACHE", str(tmp_path / "cache"))
    suite, _ = planted_suite(2, 64, 16, seed=7, name="cached-planted")
    run = build_atlas(suite, AtlasOptions(labels=False, ray="local"), None)
    assert run.atlas.root == tmp_path / "cache" / "atlases" / "cached-planted"
    (run.atlas.root / "contexts.safetensors").write_bytes(b"computed contexts")
    k2 = build_atlas(suite, AtlasOptions(k=2, labels=False, ray="local"), None).atlas
    assert k2.info["settings"]["k"] == 2 and k2.column(1, "pred_res_idx").shape[1] == 2
    assert (k2.root / "contexts.safetensors").read_bytes() == b"computed contexts"
    monkeypatch.setenv("SAEFLOW_CACHE", str(tmp_path / "local"))
    local = ensure_atlas(suite, k=2, labels=False, progress=False)
    _same_atlas(local.root, k2.root)


def test_ray_option_on_the_commands():
    from saeflow.cli import build_parser
    from saeflow.commands import steer_eval
    parser = build_parser()
    for extra, want in (([], None), (["--ray"], "local"), (["--ray", "auto"], "auto"),
                        (["--ray", "10.0.0.5:6379"], "10.0.0.5:6379")):
        args = parser.parse_args(["steer-eval", "starter", "--theme", "weddings", *extra])
        assert steer_eval.config(args).ray == want
        assert parser.parse_args(["deactivate", "starter", *extra]).ray == want
        assert parser.parse_args(["atlas", "starter", *extra]).ray == want


def test_pool_reuses_the_running_ray_and_reports_unit_errors():
    pool = Pool("local", Given(None, None))
    assert sorted(pool.map(_double, (), [1, 2, 3])) == [(1, 2), (2, 4), (3, 6)]
    with pytest.raises(ValueError, match="unit 7 is bad"):
        list(pool.map(_double, (), [7]))


def _double(lm, suite, unit):
    if unit == 7:
        raise ValueError("unit 7 is bad")
    return 2 * unit


def test_without_ray_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if it were not installed
    with pytest.raises(ImportError, match=r"pip install 'saeflow\[ray\]'"):
        Pool("local", Given(None, None))


def test_saeflow_and_its_parsers_do_not_import_ray():
    import subprocess
    code = ("import sys, saeflow, saeflow.recipes.distribute\n"
            "from saeflow.cli import build_parser\n"
            "build_parser()\n"
            "print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
