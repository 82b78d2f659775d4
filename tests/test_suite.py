"""Suites (in memory, folders, spec files), the hub preset registry and its offline behaviour,
and ``saeflow info``."""

import json
import zipfile

import numpy as np
import pytest
import torch

from saeflow import presets
from saeflow.cli import main
from saeflow.formats import load_sae, save_saelens
from saeflow.presets import PRESETS, Pack, Preset, PresetUnavailable, open_preset, preset_dir
from saeflow.sae import SAE, SAEFileError
from saeflow.catalog import load_suite
from saeflow.suite import Suite
from saeflow.sites import Site


def sae(d=64, F=32, seed=0, site=None):
    g = torch.Generator().manual_seed(seed)
    return SAE(W_enc=torch.randn(d, F, generator=g), b_enc=torch.zeros(F),
               W_dec=torch.randn(F, d, generator=g), b_dec=torch.zeros(d), site=site)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """No network, an empty HF cache and an empty saeflow cache in tmp."""
    from huggingface_hub import constants
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("SAEFLOW_CACHE", str(tmp_path / "saeflow"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    return tmp_path


def test_suite_from_saes_access_and_errors(tiny_llama):
    suite = Suite.from_saes({"0/res": sae(seed=0), "0/mlp": sae(seed=1), "1/res": sae(seed=2)},
                            model="tiny")
    assert [str(s) for s in suite.sites()] == ["0/mlp", "0/res", "1/res"]
    assert [str(s) for s in suite.sites("res")] == ["0/res", "1/res"]
    assert suite.layers == [0, 1] and suite.n_layers == 2 and len(suite) == 3
    assert "0/mlp" in suite and suite["1/res"].site == Site(1, "res")
    with pytest.raises(KeyError, match="has no SAE at 2/res; it has: 0/mlp, 0/res, 1/res"):
        suite["2/res"]
    suite.check_widths(tiny_llama)
    bad = Suite.from_saes({"0/res": sae(d=10)})
    with pytest.raises(ValueError, match="d_in 10"):
        bad.check_widths(tiny_llama)


def test_save_and_reopen_folder_and_spec_files(tmp_path):
    suite = Suite.from_saes({"0/res": sae(seed=0), "2/att": sae(seed=1)}, model="smollm2",
                            name="mine")
    folder = suite.save(tmp_path / "suite")
    again = load_suite(folder)
    assert again.sites() == suite.sites() and again.model == "smollm2" and again.name == "mine"
    x = torch.randn(4, 64)
    assert torch.allclose(again["2/att"].reconstruct(x), suite["2/att"].reconstruct(x), atol=1e-5)
    # a spec file with relative paths, in JSON and TOML
    (tmp_path / "spec.json").write_text(json.dumps(
        {"model": "other", "saes": {"0/res": "suite/0-res"}}))
    spec = load_suite(tmp_path / "spec.json")
    assert spec.sites() == [Site(0, "res")] and spec.model == "other"
    (tmp_path / "spec.toml").write_text('folder = "suite"\nmodel = "m"\n')
    assert load_suite(tmp_path / "spec.toml").sites() == suite.sites()
    assert load_suite(folder, model="override").model == "override"


def test_folder_scan_mixes_formats_and_catches_clashes(tmp_path):
    root = tmp_path / "mixed"
    save_saelens(sae(seed=0, site=Site(0, "res")), root / "a")
    sp = root / "layers.1"  # an EleutherAI sparsify folder
    sp.mkdir(parents=True)
    (sp / "cfg.json").write_text(json.dumps({"k": 4, "d_in": 64}))
    from safetensors.torch import save_file
    save_file({"encoder.weight": torch.randn(32, 64), "encoder.bias": torch.zeros(32),
               "W_dec": torch.randn(32, 64), "b_dec": torch.zeros(64)}, str(sp / "sae.safetensors"))
    (root / "notes").mkdir()
    suite = load_suite(root)
    assert suite.sites() == [Site(0, "res"), Site(1, "res")]
    assert suite["1/res"].activation == "topk"
    save_saelens(sae(seed=3, site=Site(0, "res")), root / "b")
    with pytest.raises(ValueError, match="two SAEs for site 0/res"):
        load_suite(root)


def test_suite_refuses_a_file_that_names_another_site(tmp_path):
    save_saelens(sae(site=Site(3, "res")), tmp_path / "x")
    suite = Suite(paths={Site(4, "res"): tmp_path / "x"})
    assert suite["4/res"].site == Site(4, "res")  # an explicit site wins over the file's hook


def test_unknown_suite_lists_presets(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_suite(tmp_path / "nowhere")
    for name in PRESETS:
        assert name in str(e.value)


# ---- the preset registry -------------------------------------------------------------
def test_preset_registry_is_complete():
    assert set(PRESETS) == {"gemmascope-2b-16k", "llamascope-8x", "openai-gpt2-v5-32k",
                            "pythia-70m-sm"}
    for p in PRESETS.values():
        assert p.model.count("/") == 1  # a hub id
        assert {pk.kind for pk in p.packs} in ({"res", "mlp", "att"}, {"res", "mlp", "att_z"})
        assert len(p.sites()) == 3 * p.n_layers
        for pk in p.packs:
            assert len(pk.folders) == p.n_layers and len(set(pk.folders)) == p.n_layers
    g = PRESETS["gemmascope-2b-16k"]
    assert g.pack("res").repo == "google/gemma-scope-2b-pt-res"
    assert g.pack("res").folders[12] == "layer_12/width_16k/average_l0_82"
    assert g.pack("att_z").folders[0] == "layer_0/width_16k/average_l0_104"
    assert PRESETS["llamascope-8x"].pack("mlp").folders[7] == "Llama3_1-8B-Base-L7M-8x"
    assert PRESETS["llamascope-8x"].pack("att").repo == "fnlp/Llama3_1-8B-Base-LXA-8x"


def test_offline_preset_says_exactly_what_to_download(offline_hub):
    with pytest.raises(PresetUnavailable) as e:
        open_preset("gemmascope-2b-16k", sites=["12/res", "3/att_z"])
    msg = str(e.value)
    assert "HF_HUB_OFFLINE" in msg
    assert "hf download google/gemma-scope-2b-pt-" in msg
    local = preset_dir("gemmascope-2b-16k")
    assert str(local) in msg
    assert ("layer_12/width_16k/average_l0_82/params.npz" in msg
            or "layer_3/width_16k/average_l0_117/params.npz" in msg)
    with pytest.raises(KeyError, match="no SAE at 30/res"):
        open_preset("gemmascope-2b-16k", sites=["30/res"])
    with pytest.raises(KeyError, match="known presets"):
        open_preset("nope")
    with pytest.raises(FileNotFoundError, match="llamascope-8x"):
        load_suite("llamascope-8x")  # load_suite routes preset names here


def test_unreachable_hub_fails_with_the_file_list(offline_hub, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(presets, "_offline", lambda: False)
    tiny = Preset("t", "x/y", 1, 4, 8, "relu", "test", (
        Pack("res", "saeflow-tests/surely-missing-repo", ("layer0",), ("cfg.json",), 1),))
    with pytest.raises(PresetUnavailable, match=r"(?s)cannot be downloaded.*layer0/cfg.json"):
        presets._resolve(tiny, tiny.packs[0], [0])


def test_preset_files_copied_by_hand_are_used_offline(offline_hub):
    g = PRESETS["gemmascope-2b-16k"]
    root = preset_dir(g.name)
    rng = np.random.default_rng(0)
    for site in (Site(12, "res"), Site(3, "att_z")):
        pack = g.pack(site.kind)
        d = 2048 if site.kind == "att_z" else 2304
        folder = root / pack.repo.replace("/", "--") / pack.folders[site.layer]
        folder.mkdir(parents=True)
        np.savez(folder / "params.npz", W_enc=rng.normal(size=(d, 8)).astype(np.float32),
                 W_dec=rng.normal(size=(8, d)).astype(np.float32), b_enc=np.zeros(8, np.float32),
                 b_dec=np.zeros(d, np.float32), threshold=np.ones(8, np.float32))
    suite = open_preset(g.name, sites=["12/res", "3/att_z"])
    assert suite.model == "google/gemma-2-2b" and suite.name == g.name
    assert suite["3/att_z"].d_in == 2048 and suite["12/res"].activation == "jumprelu"


def test_pythia_archive_from_the_hf_cache_is_extracted_once(offline_hub):
    """A fake HF cache holding the dictionary zip: the preset opens offline."""
    p = PRESETS["pythia-70m-sm"]
    pack = p.pack("res")
    snap = offline_hub / "hf" / "models--saprmarks--pythia-70m-deduped-saes"
    (snap / "refs").mkdir(parents=True)
    (snap / "refs" / "main").write_text("c0ffee")
    (snap / "snapshots" / "c0ffee").mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    with zipfile.ZipFile(snap / "snapshots" / "c0ffee" / pack.archive, "w") as zf:
        for kind, L in (("resid_out", 1), ("mlp_out", 1)):
            sd = {"bias": torch.zeros(512), "encoder.weight": torch.randn(16, 512, generator=g),
                  "encoder.bias": torch.zeros(16),
                  "decoder.weight": torch.randn(512, 16, generator=g)}
            tmp = offline_hub / "ae.pt"
            torch.save(sd, tmp)
            base = f"dictionaries/pythia-70m-deduped/{kind}_layer{L}/10_32768"
            zf.write(tmp, f"{base}/ae.pt")
            cfg = {"trainer": {"dict_class": "AutoEncoder"}}
            zf.writestr(f"{base}/config.json", json.dumps(cfg))
    suite = open_preset(p.name, sites=["1/res", "1/mlp"])
    assert suite.sites() == [Site(1, "mlp"), Site(1, "res")]
    assert suite["1/mlp"].d_sae == 16 and suite.model == "EleutherAI/pythia-70m-deduped"
    assert str(suite.paths[Site(1, "res")]).startswith(str(preset_dir(p.name)))
    with pytest.raises(PresetUnavailable, match="resid_out_layer2"):
        open_preset(p.name, sites=["2/res"])  # not in the archive


# ---- saeflow info --------------------------------------------------------------------
def test_info_on_one_sae_a_suite_and_a_preset(tmp_path, capsys, offline_hub):
    s = SAE(W_enc=torch.eye(4), b_enc=torch.zeros(4), W_dec=2 * torch.eye(4), b_dec=torch.zeros(4),
            activation="topk", k=2, site=Site(5, "mlp"))
    save_saelens(s, tmp_path / "suite" / "a", model_name="tiny-model")
    assert main(["info", str(tmp_path / "suite" / "a")]) == 0
    out = capsys.readouterr().out
    assert "5/mlp" in out and "topk k=2" in out and "tiny-model" in out and "2..2" in out
    assert main(["info", str(tmp_path / "suite"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["n_sites"] == 1 and data["sites"][0]["width"] == 4
    assert main(["info", "openai-gpt2-v5-32k"]) == 0
    out = capsys.readouterr().out
    assert "openai-community/gpt2" in out and "32768" in out
    assert main(["info", str(tmp_path / "missing")]) == 2
    assert "error" in capsys.readouterr().err


def test_info_names_the_bad_file(tmp_path, capsys):
    folder = save_saelens(sae(site=Site(0, "res")), tmp_path / "x")
    (folder / "sae_weights.safetensors").write_bytes(b"\x00" * 10)
    assert main(["info", str(folder)]) == 2
    assert "sae_weights.safetensors" in capsys.readouterr().err
    with pytest.raises(SAEFileError):
        load_sae(folder)
