"""Each reader on files written in the family's exact on-disk layout, checked against that
family's own encode/decode formula written out here; plus detection and error messages."""

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from saeflow.formats import READERS, load_sae, save_saelens
from saeflow.formats.gemmascope import site_from_hf_hook
from saeflow.sae import SAEFileError
from saeflow.sites import Site

D, F = 6, 10


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def topk_relu(pre, k):
    vals, idx = torch.relu(pre).topk(k, dim=-1)
    return torch.zeros_like(pre).scatter_(-1, idx, vals)


X = rand(16, D, seed=99) * 2


def write_json(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


# ---- Gemma Scope (npz) ---------------------------------------------------------------
def gemma_npz(folder, seed=0):
    w = {"W_enc": rand(D, F, seed=seed), "W_dec": rand(F, D, seed=seed + 1),
         "b_enc": rand(F, seed=seed + 2) * 0.1, "b_dec": rand(D, seed=seed + 3) * 0.1,
         "threshold": rand(F, seed=seed + 4).abs() * 0.5}
    folder.mkdir(parents=True)
    np.savez(folder / "params.npz", **{k: v.numpy() for k, v in w.items()})
    return w


@pytest.mark.parametrize("release, kind", [
    ("gemma-scope-2b-pt-res", "res"), ("gemma-scope-2b-pt-mlp-canonical", "mlp"),
    ("models--google--gemma-scope-2b-pt-att", "att_z")])
def test_gemmascope_npz(tmp_path, release, kind):
    folder = tmp_path / release / "snapshots" / "abc" / "layer_7" / "width_16k" / "average_l0_82"
    w = gemma_npz(folder)
    for target in (folder, folder / "params.npz"):
        sae = load_sae(target)
        assert sae.site == Site(7, kind) and sae.activation == "jumprelu"
        pre = X @ w["W_enc"] + w["b_enc"]  # b_dec is not subtracted
        assert torch.allclose(sae.encode(X), torch.relu(pre) * (pre > w["threshold"]))
        assert torch.allclose(sae.decode(sae.encode(X)), sae.encode(X) @ w["W_dec"] + w["b_dec"])
    assert sae.metadata["model_name"] == "google/gemma-2-2b"


def test_gemmascope_npz_site_from_path_or_explicit(tmp_path):
    gemma_npz(tmp_path / "somewhere" / "params")
    with pytest.raises(SAEFileError, match="cannot tell the site"):
        load_sae(tmp_path / "somewhere" / "params")
    assert load_sae(tmp_path / "somewhere" / "params", "3/att_z").site == Site(3, "att_z")


def test_gemmascope_npz_errors(tmp_path):
    folder = tmp_path / "gemma-scope-2b-pt-res" / "layer_1" / "x"
    folder.mkdir(parents=True)
    np.savez(folder / "params.npz", W_enc=np.zeros((D, F), np.float32))
    with pytest.raises(SAEFileError, match=r"params.npz: missing tensor 'b_enc' \(found: W_enc\)"):
        load_sae(folder)
    good = tmp_path / "gemma-scope-2b-pt-res" / "layer_2" / "x"
    gemma_npz(good)
    data = (good / "params.npz").read_bytes()
    (good / "params.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(SAEFileError, match="params.npz: cannot read npz file"):
        load_sae(good)


# ---- Gemma Scope 2 -------------------------------------------------------------------
@pytest.mark.parametrize("hook, site", [
    ("model.layers.4.output", "4/res"), ("model.layers.4.self_attn.o_proj.input", "4/att_z"),
    ("model.language_model.layers.2.post_feedforward_layernorm.output", "2/mlp"),
    ("model.layers.9.post_attention_layernorm.output", "9/att")])
def test_gemma3_hf_hook_names(hook, site):
    assert str(site_from_hf_hook(hook)) == site


def gemma2_folder(folder, hook="model.layers.4.output", **cfg):
    w = {"w_enc": rand(D, F), "w_dec": rand(F, D, seed=1), "b_enc": rand(F, seed=2) * 0.1,
         "b_dec": rand(D, seed=3) * 0.1, "threshold": rand(F, seed=4).abs() * 0.5}
    write_json(folder / "config.json", {"hf_hook_point_in": hook, "hf_hook_point_out": hook,
                                        "width": F, "model_name": "gemma-3-270m",
                                        "architecture": "jump_relu", "l0": 20, **cfg})
    save_file({k: v.to(torch.bfloat16) for k, v in w.items()}, str(folder / "params.safetensors"))
    return {k: v.to(torch.bfloat16).float() for k, v in w.items()}


def test_gemmascope2(tmp_path):
    folder = tmp_path / "resid_post" / "layer_4_width_16k_l0_medium"
    w = gemma2_folder(folder)
    sae = load_sae(folder)
    assert sae.site == Site(4, "res") and sae.metadata["model_name"] == "gemma-3-270m"
    pre = X @ w["w_enc"] + w["b_enc"]
    assert torch.allclose(sae.encode(X), torch.relu(pre) * (pre > w["threshold"]), atol=1e-5)
    assert load_sae(folder / "params.safetensors").site == Site(4, "res")


def test_gemmascope2_refuses_transcoders(tmp_path):
    gemma2_folder(tmp_path / "t", hf_hook_point_out="model.layers.4.post_feedforward_layernorm")
    with pytest.raises(SAEFileError, match="transcoder"):
        load_sae(tmp_path / "t")


# ---- Llama Scope ---------------------------------------------------------------------
def llama_folder(folder, act="jumprelu", pre_bias=False, dtype=torch.bfloat16):
    w = {"encoder.weight": rand(F, D), "encoder.bias": rand(F, seed=2) * 0.1,
         "decoder.weight": rand(D, F, seed=1), "decoder.bias": rand(D, seed=3) * 0.1}
    w = {k: v.to(dtype) for k, v in w.items()}
    hyper = {"d_model": D, "d_sae": F, "act_fn": act, "jump_relu_threshold": 0.3, "top_k": 3,
             "hook_point_in": "blocks.5.hook_attn_out", "hook_point_out": "blocks.5.hook_attn_out",
             "norm_activation": "dataset-wise", "apply_decoder_bias_to_pre_encoder": pre_bias,
             "dataset_average_activation_norm": {"in": 12.5, "out": 7.0},
             "sparsity_include_decoder_norm": True, "use_decoder_bias": True}
    write_json(folder / "hyperparams.json", hyper)
    (folder / "checkpoints").mkdir()
    save_file(w, str(folder / "checkpoints" / "final.safetensors"))
    return {k: v.float() for k, v in w.items()}


@pytest.mark.parametrize("pre_bias", [False, True])
def test_llamascope_scales_and_threshold(tmp_path, pre_bias):
    folder = tmp_path / "Llama3_1-8B-Base-L5A-8x"
    w = llama_folder(folder, pre_bias=pre_bias)
    sae = load_sae(folder)
    assert sae.site == Site(5, "att") and sae.activation == "jumprelu"
    s_in, s_out = math.sqrt(D) / 12.5, 7.0 / math.sqrt(D)
    xin = X - w["decoder.bias"] if pre_bias else X
    pre = (xin * s_in) @ w["encoder.weight"].T + w["encoder.bias"]
    # jump_relu_threshold is in raw-input units (SAELens' reading): 0.3 * s_in in scaled units
    acts = pre * (pre > 0.3 * s_in)
    assert not torch.equal(acts, pre * (pre > 0.3))  # the two readings differ on this input
    assert torch.allclose(sae.encode(X), acts, atol=1e-5)
    recon = (acts @ w["decoder.weight"].T + w["decoder.bias"]) * s_out
    assert torch.allclose(sae.reconstruct(X), recon, atol=1e-5)
    assert load_sae(folder / "checkpoints" / "final.safetensors").site == Site(5, "att")


def test_llamascope_topk_and_site_from_hook(tmp_path):
    folder = tmp_path / "my-sae"
    llama_folder(folder, act="topk", dtype=torch.float32)
    sae = load_sae(folder)
    assert sae.site == Site(5, "att") and sae.activation == "topk" and sae.k == 3


def test_llamascope_errors(tmp_path):
    folder = tmp_path / "Llama3_1-8B-Base-L1R-8x"
    w = llama_folder(folder, dtype=torch.float32)
    bad = dict(w, **{"decoder.weight": w["decoder.weight"].T.contiguous()})
    save_file(bad, str(folder / "checkpoints" / "final.safetensors"))
    with pytest.raises(SAEFileError, match="decoder.weight has shape"):
        load_sae(folder)
    nan = dict(w, **{"encoder.bias": w["encoder.bias"] * float("nan")})
    save_file(nan, str(folder / "checkpoints" / "final.safetensors"))
    with pytest.raises(SAEFileError, match="NaN"):
        load_sae(folder)
    save_file(w, str(folder / "checkpoints" / "final.safetensors"))
    hyper = json.loads((folder / "hyperparams.json").read_text())
    write_json(folder / "hyperparams.json", {**hyper, "norm_activation": "token-wise"})
    with pytest.raises(SAEFileError, match="token-wise"):
        load_sae(folder)


# ---- sparsify ------------------------------------------------------------------------
def sparsify_folder(folder, **cfg):
    w = {"encoder.weight": rand(F, D), "encoder.bias": rand(F, seed=2) * 0.1,
         "W_dec": rand(F, D, seed=1), "b_dec": rand(D, seed=3) * 0.1}
    write_json(folder / "cfg.json", {"activation": "topk", "expansion_factor": 2,
                                     "normalize_decoder": True, "num_latents": F, "k": 3,
                                     "multi_topk": False, "skip_connection": False,
                                     "transcode": False, "d_in": D, **cfg})
    save_file({k: v.to(torch.bfloat16) for k, v in w.items()}, str(folder / "sae.safetensors"))
    return {k: v.to(torch.bfloat16).float() for k, v in w.items()}


@pytest.mark.parametrize("name, site", [("layers.5", "5/res"), ("layers.5.mlp", "5/mlp"),
                                        ("h.2.attn", "2/att")])
def test_sparsify_bf16_subtracts_b_dec(tmp_path, name, site):
    w = sparsify_folder(tmp_path / name)
    sae = load_sae(tmp_path / name)
    assert str(sae.site) == site and sae.k == 3
    acts = topk_relu((X - w["b_dec"]) @ w["encoder.weight"].T + w["encoder.bias"], 3)
    assert torch.allclose(sae.encode(X), acts, atol=1e-5)
    assert torch.allclose(sae.reconstruct(X), acts @ w["W_dec"] + w["b_dec"], atol=1e-5)


def test_sparsify_refusals(tmp_path):
    sparsify_folder(tmp_path / "layers.1", transcode=True)
    with pytest.raises(SAEFileError, match="transcoder"):
        load_sae(tmp_path / "layers.1")
    sparsify_folder(tmp_path / "embed_tokens")
    with pytest.raises(SAEFileError, match="folder name should be the hook point"):
        load_sae(tmp_path / "embed_tokens")
    assert load_sae(tmp_path / "embed_tokens", "0/res").site == Site(0, "res")


# ---- dictionary_learning -------------------------------------------------------------
def test_dictlearn_autoencoder_renormalises_decoder(tmp_path):
    folder = tmp_path / "dictionaries" / "pythia-70m-deduped" / "resid_out_layer2" / "10_32768"
    folder.mkdir(parents=True)
    sd = {"bias": rand(D, seed=3) * 0.1, "encoder.weight": rand(F, D),
          "encoder.bias": rand(F, seed=2) * 0.1, "decoder.weight": rand(D, F, seed=1) * 3}
    torch.save(sd, folder / "ae.pt")  # no config.json: the classic key set is accepted
    sae = load_sae(folder)
    assert sae.site == Site(2, "res") and sae.activation == "relu"
    acts = torch.relu((X - sd["bias"]) @ sd["encoder.weight"].T + sd["encoder.bias"])
    assert torch.allclose(sae.reconstruct(X), acts @ sd["decoder.weight"].T + sd["bias"], atol=1e-5)
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(F), atol=1e-6)


def dl_folder(folder, dict_class, sd, **trainer):
    folder.mkdir(parents=True)
    torch.save(sd, folder / "ae.pt")
    trainer = {"dict_class": dict_class, "activation_dim": D, "dict_size": F, "layer": 3,
               "submodule_name": "resid_post_layer_3", "lm_name": "EleutherAI/pythia-70m-deduped",
               **trainer}
    write_json(folder / "config.json", {"trainer": trainer})


def test_dictlearn_topk_batchtopk_jumprelu(tmp_path):
    enc, dec = rand(F, D), rand(D, F, seed=1)
    b, bd = rand(F, seed=2) * 0.1, rand(D, seed=3) * 0.1
    dl_folder(tmp_path / "topk", "AutoEncoderTopK",
              {"encoder.weight": enc, "encoder.bias": b, "decoder.weight": dec, "b_dec": bd,
               "k": torch.tensor(3), "threshold": torch.tensor(-1.0)})
    sae = load_sae(tmp_path / "topk")
    assert sae.site == Site(3, "res") and sae.metadata["model_name"].endswith("pythia-70m-deduped")
    acts = topk_relu((X - bd) @ enc.T + b, 3)
    assert torch.allclose(sae.encode(X), acts, atol=1e-6)
    dl_folder(tmp_path / "batch", "BatchTopKSAE",
              {"encoder.weight": enc, "encoder.bias": b, "decoder.weight": dec, "b_dec": bd,
               "k": torch.tensor(3), "threshold": torch.tensor(0.4)})
    sae = load_sae(tmp_path / "batch")
    post = torch.relu((X - bd) @ enc.T + b)
    assert sae.activation == "jumprelu" and sae.metadata["k"] == 3
    assert torch.allclose(sae.encode(X), post * (post > 0.4), atol=1e-6)
    theta = rand(F, seed=4).abs() * 0.3
    dl_folder(tmp_path / "jump", "JumpReluAutoEncoder",
              {"W_enc": enc.T, "b_enc": b, "W_dec": dec.T, "b_dec": bd, "threshold": theta})
    pre = X @ enc.T + b
    assert torch.allclose(load_sae(tmp_path / "jump").encode(X), torch.relu(pre) * (pre > theta),
                          atol=1e-6)


def test_dictlearn_errors(tmp_path):
    dl_folder(tmp_path / "gated", "GatedAutoEncoder", {"decoder_bias": torch.zeros(D)})
    with pytest.raises(SAEFileError, match="dict_class 'GatedAutoEncoder' is not supported"):
        load_sae(tmp_path / "gated")
    dl_folder(tmp_path / "trunc", "AutoEncoderTopK", {"encoder.weight": rand(F, D)})
    data = (tmp_path / "trunc" / "ae.pt").read_bytes()
    (tmp_path / "trunc" / "ae.pt").write_bytes(data[:100])
    with pytest.raises(SAEFileError, match="ae.pt: cannot read torch file"):
        load_sae(tmp_path / "trunc")
    dl_folder(tmp_path / "size", "JumpReluAutoEncoder",
              {"W_enc": rand(D, F), "b_enc": torch.zeros(F), "W_dec": rand(F, D),
               "b_dec": torch.zeros(D), "threshold": torch.ones(F)}, dict_size=F + 1)
    with pytest.raises(SAEFileError, match="dict_size"):
        load_sae(tmp_path / "size")


# ---- OpenAI v5 -----------------------------------------------------------------------
def openai_state(act="TopK"):
    sd = {"pre_bias": rand(D, seed=3) * 0.1, "encoder.weight": rand(F, D),
          "latent_bias": rand(F, seed=2) * 0.1, "decoder.weight": rand(D, F, seed=1),
          "stats_last_nonzero": torch.zeros(F, dtype=torch.long), "activation": act}
    if act == "TopK":
        sd["activation_state_dict"] = {"k": 3, "postact_fn": "ReLU"}
    return sd


def openai_reference(sd, x):
    """openai/sparse_autoencoder's Autoencoder.forward, written out."""
    mu = x.mean(-1, keepdim=True)
    std = (x - mu).std(-1, keepdim=True)
    xn = (x - mu) / (std + 1e-5)
    pre = (xn - sd["pre_bias"]) @ sd["encoder.weight"].T + sd["latent_bias"]
    top = pre.topk(3, dim=-1)
    lat = torch.zeros_like(pre).scatter_(-1, top.indices, torch.relu(top.values))
    return lat, (lat @ sd["decoder.weight"].T + sd["pre_bias"]) * std + mu


@pytest.mark.parametrize("location, site", [("resid_delta_attn_v5_32k", "5/att"),
                                            ("resid_post_mlp_v5_128k", "5/res"),
                                            ("resid_delta_mlp_v5_32k", "5/mlp")])
def test_openai_v5(tmp_path, location, site):
    path = tmp_path / location / "autoencoders" / "5.pt"
    path.parent.mkdir(parents=True)
    sd = openai_state()
    torch.save(sd, path)
    sae = load_sae(path)
    assert str(sae.site) == site and sae.input_norm == "layer_norm" and sae.k == 3
    lat, recon = openai_reference(sd, X)
    assert torch.allclose(sae.encode(X), lat, atol=1e-5)
    assert torch.allclose(sae.reconstruct(X), recon, atol=1e-5)


def test_openai_locations_that_are_not_sites(tmp_path):
    path = tmp_path / "resid_post_attn_v5_32k" / "autoencoders" / "0.pt"
    path.parent.mkdir(parents=True)
    torch.save(openai_state("ReLU"), path)
    with pytest.raises(SAEFileError, match="not a saeflow site"):
        load_sae(path)
    sae = load_sae(path, "0/res")
    assert sae.activation == "relu" and sae.input_norm == "none"


# ---- detection -----------------------------------------------------------------------
def test_unknown_or_missing_paths(tmp_path):
    with pytest.raises(SAEFileError, match="no such file"):
        load_sae(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SAEFileError, match="not an SAE in any format") as e:
        load_sae(tmp_path / "empty")
    for name, _, _ in READERS:
        assert name in str(e.value)


def test_each_folder_is_claimed_by_exactly_one_reader(tmp_path):
    gemma_npz(tmp_path / "gemma-scope-2b-pt-res" / "layer_1" / "a")
    gemma2_folder(tmp_path / "g2")
    llama_folder(tmp_path / "Llama3_1-8B-Base-L1R-8x")
    sparsify_folder(tmp_path / "layers.1")
    dl_folder(tmp_path / "dl", "JumpReluAutoEncoder", {})
    save_saelens(load_sae(tmp_path / "layers.1"), tmp_path / "sl")
    targets = [tmp_path / "gemma-scope-2b-pt-res" / "layer_1" / "a", tmp_path / "g2",
               tmp_path / "Llama3_1-8B-Base-L1R-8x", tmp_path / "layers.1", tmp_path / "dl",
               tmp_path / "sl"]
    for t in targets:
        assert sum(detect(t) for _, detect, _ in READERS) == 1, t


# ---- SAELens folders: v6 and pre-6 configs, read as SAELens reads them ------------------
def saelens_folder(folder, cfg, **weights):
    w = {"W_enc": rand(D, F), "b_enc": rand(F, seed=2) * 0.1, "W_dec": rand(F, D, seed=1),
         "b_dec": rand(D, seed=3) * 0.5, **weights}
    write_json(folder / "cfg.json", {"d_in": D, "d_sae": F, "dtype": "float32", **cfg})
    save_file(w, str(folder / "sae_weights.safetensors"))
    return w


PRE6 = {"model_name": "gpt2", "hook_point": "blocks.3.hook_resid_post", "hook_point_layer": 3,
        "apply_b_dec_to_input": True, "activation_fn_str": "relu", "architecture": "standard"}


@pytest.mark.parametrize("cfg", [
    {**PRE6, "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 3}},  # pre-6 "standard"
    {**PRE6, "architecture": "topk", "activation_fn_str": "topk",
     "activation_fn_kwargs": {"k": 3}},  # sae_lens 5 TopK training: k only in the kwargs
    {"architecture": "topk", "k": 3, "metadata": {"sae_lens_version": "6.54.12",
                                                  "hook_name": "blocks.3.hook_resid_post"}},
])
def test_saelens_topk_forms(tmp_path, cfg):
    w = saelens_folder(tmp_path / "s", cfg)
    sae = load_sae(tmp_path / "s")
    assert sae.site == Site(3, "res") and sae.activation == "topk" and sae.k == 3
    acts = topk_relu((X - w["b_dec"]) @ w["W_enc"] + w["b_enc"], 3)
    assert torch.allclose(sae.encode(X), acts, atol=1e-6)
    assert ((sae.encode(X) > 0).sum(-1) <= 3).all()


def test_saelens_apply_b_dec_defaults_to_true_and_old_keys(tmp_path):
    cfg = {k: v for k, v in PRE6.items() if k != "apply_b_dec_to_input"}
    w = saelens_folder(tmp_path / "old", {**cfg, "normalize_activations": False})
    sae = load_sae(tmp_path / "old")
    assert sae.apply_b_dec_to_input and sae.site == Site(3, "res")
    assert torch.allclose(sae.encode(X), torch.relu((X - w["b_dec"]) @ w["W_enc"] + w["b_enc"]))
    v6 = {"architecture": "standard", "metadata": {"sae_lens_version": "6.1.0",
                                                   "hook_name": "blocks.2.attn.hook_z"}}
    saelens_folder(tmp_path / "v6", v6)
    assert load_sae(tmp_path / "v6").apply_b_dec_to_input
    saelens_folder(tmp_path / "head", {**PRE6, "hook_point_head_index": 4})
    with pytest.raises(SAEFileError, match="hook_head_index is 4"):
        load_sae(tmp_path / "head")
    saelens_folder(tmp_path / "tanh", {**PRE6, "activation_fn_str": "tanh-relu"})
    with pytest.raises(SAEFileError, match="activation_fn 'tanh-relu' is not supported"):
        load_sae(tmp_path / "tanh")


def test_saelens_expected_average_without_factor_is_identity(tmp_path):
    w = saelens_folder(tmp_path / "b", {**PRE6, "normalize_activations": True})
    sae = load_sae(tmp_path / "b")
    assert sae.input_scale == 1.0 and "identity" in sae.metadata["normalization_note"]
    assert torch.allclose(sae.encode(X), torch.relu((X - w["b_dec"]) @ w["W_enc"] + w["b_enc"]))
    saelens_folder(tmp_path / "f", {**PRE6, "normalize_activations": "expected_average_only_in",
                                    "activation_norm_scaling_factor": 2.0})
    assert load_sae(tmp_path / "f").input_scale == 2.0


def test_saelens_topk_rescale_acts_by_decoder_norm(tmp_path):
    W_dec = rand(F, D, seed=1) * torch.linspace(0.2, 3.0, F)[:, None]  # non-unit rows
    cfg = {"architecture": "topk", "k": 3, "rescale_acts_by_decoder_norm": True,
           "metadata": {"sae_lens_version": "6.54.12", "hook_name": "blocks.3.hook_resid_post"}}
    w = saelens_folder(tmp_path / "s", cfg, W_dec=W_dec)
    sae = load_sae(tmp_path / "s")
    n = W_dec.norm(dim=1)
    pre = ((X - w["b_dec"]) @ w["W_enc"] + w["b_enc"]) * n  # SAELens TopKSAE.encode
    acts = topk_relu(pre, 3)
    assert torch.allclose(sae.encode(X), acts, atol=1e-5)
    assert torch.allclose(sae.reconstruct(X), (acts / n) @ W_dec + w["b_dec"], atol=1e-5)
    plain = load_sae(tmp_path / "s").encode(X)
    write_json(tmp_path / "s" / "cfg.json", {**cfg, "rescale_acts_by_decoder_norm": False,
                                             "d_in": D, "d_sae": F})
    assert not torch.equal((load_sae(tmp_path / "s").encode(X) > 0), plain > 0)


def test_saelens_finetuning_scaling_factor(tmp_path):
    s = torch.linspace(0.5, 2.0, F)
    w = saelens_folder(tmp_path / "s", {**PRE6, "finetuning_scaling_factor": True},
                       scaling_factor=s)
    sae = load_sae(tmp_path / "s")
    acts = torch.relu((X - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
    assert torch.allclose(sae.encode(X), acts)
    assert torch.allclose(sae.reconstruct(X), (acts * s) @ w["W_dec"] + w["b_dec"], atol=1e-5)
    saelens_folder(tmp_path / "ones", PRE6, scaling_factor=torch.ones(F))
    assert torch.equal(load_sae(tmp_path / "ones").W_dec, w["W_dec"])
    saelens_folder(tmp_path / "off", {**PRE6, "finetuning_scaling_factor": False},
                   scaling_factor=s)
    with pytest.raises(SAEFileError, match="scaling_factor is not all ones"):
        load_sae(tmp_path / "off")


def test_saelens_constant_norm_rescale(tmp_path):
    w = saelens_folder(tmp_path / "s", {**PRE6, "normalize_activations": "constant_norm_rescale"})
    sae = load_sae(tmp_path / "s")
    coeff = math.sqrt(D) / X.norm(dim=-1, keepdim=True)
    acts = torch.relu((X * coeff - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
    assert sae.input_norm == "constant_norm"
    assert torch.allclose(sae.encode(X), acts, atol=1e-5)
    assert torch.allclose(sae.reconstruct(X), (acts @ w["W_dec"] + w["b_dec"]) / coeff, atol=1e-5)
    back = load_sae(save_saelens(sae, tmp_path / "back"))
    assert json.loads((tmp_path / "back" / "cfg.json").read_text())["normalize_activations"] == \
        "constant_norm_rescale"
    assert torch.allclose(back.reconstruct(X), sae.reconstruct(X), atol=1e-5)


def test_saelens_config_and_weights_must_agree(tmp_path):
    saelens_folder(tmp_path / "s", {**PRE6, "d_in": D + 1})
    with pytest.raises(SAEFileError, match=r"cfg.json: d_in is 7 but sae_weights.safetensors has "
                                           r"W_enc of shape \(6, 10\)"):
        load_sae(tmp_path / "s")
    saelens_folder(tmp_path / "t", {**PRE6, "d_sae": 4})
    with pytest.raises(SAEFileError, match="d_sae is 4"):
        load_sae(tmp_path / "t")


def test_saelens_writer_marks_hook_z(tmp_path):
    from saeflow.sae import SAE
    sae = SAE(W_enc=rand(D, F), b_enc=torch.zeros(F), W_dec=rand(F, D), b_dec=torch.zeros(D),
              site=Site(2, "att_z"))
    cfg = json.loads((save_saelens(sae, tmp_path / "z") / "cfg.json").read_text())
    assert cfg["reshape_activations"] == "hook_z"
    assert cfg["metadata"]["hook_name"] == "blocks.2.attn.hook_z"
    cfg = json.loads((save_saelens(sae.replace(site=Site(2, "att")), tmp_path / "a")
                      / "cfg.json").read_text())
    assert cfg["reshape_activations"] == "none"


# ---- broken SAE folders inside a suite folder fail loudly -----------------------------
def small_suite(folder):
    from saeflow.sae import SAE
    from saeflow.suite import Suite
    saes = {f"{layer}/res": SAE(W_enc=rand(D, F, seed=layer), b_enc=torch.zeros(F),
                                W_dec=rand(F, D, seed=layer + 9), b_dec=torch.zeros(D))
            for layer in range(3)}
    Suite.from_saes(saes, model="tiny", name="small").save(folder)
    (folder / "notes").mkdir()  # a folder with no SAE file in it is not part of the suite
    (folder / "notes" / "README.txt").write_text("not an SAE")
    return folder


def test_suite_folder_with_a_broken_sae_stops_atlas(tmp_path, capsys):
    from saeflow.cli import main
    from saeflow.suite import read_suite
    suite = small_suite(tmp_path / "suite")
    assert read_suite(suite).sites() == [Site(0, "res"), Site(1, "res"), Site(2, "res")]
    cfg = json.loads((suite / "1-res" / "cfg.json").read_text())
    write_json(suite / "1-res" / "cfg.json", {**cfg, "d_in": D * 2})
    assert main(["atlas", str(suite), "--out", str(tmp_path / "atlas")]) == 2
    err = capsys.readouterr().err
    assert "1-res" in err and "d_in is 12" in err and "disagree" in err
    write_json(suite / "1-res" / "cfg.json", cfg)
    (suite / "2-res" / "sae_weights.safetensors").unlink()
    assert main(["atlas", str(suite), "--out", str(tmp_path / "atlas")]) == 2
    err = capsys.readouterr().err
    assert "2-res" in err and "incomplete SAE folder" in err and "sae_weights.safetensors" in err
    assert not (tmp_path / "atlas").exists()
    with pytest.raises(SAEFileError, match=r"2-res: an incomplete SAE folder: it has cfg.json"):
        read_suite(suite)
    with pytest.raises(SAEFileError, match="incomplete SAE folder"):
        load_sae(suite / "2-res")


def test_suite_json_sites_must_all_be_there(tmp_path):
    from saeflow.suite import read_suite
    suite = small_suite(tmp_path / "suite")
    info = json.loads((suite / "suite.json").read_text())
    write_json(suite / "suite.json", {**info, "sites": ["0/res", "1/res", "2/res"]})
    assert len(read_suite(suite)) == 3
    write_json(suite / "suite.json", {**info, "sites": ["0/res", "1/res", "2/res", "3/res"]})
    with pytest.raises(SAEFileError, match=r"suite.json lists site 3/res, but .*3-res: no such"):
        read_suite(suite)
    write_json(suite / "suite.json", {**info, "sites": ["0/res", "1/res", "2/res"]})
    (suite / "0-res" / "cfg.json").unlink()
    with pytest.raises(SAEFileError, match=r"lists site 0/res, but .*0-res: an incomplete SAE "
                                           r"folder: it has sae_weights.safetensors but no "
                                           r"cfg.json"):
        read_suite(suite)
