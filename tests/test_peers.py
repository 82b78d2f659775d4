"""saeflow's readers and writer against the peer libraries themselves, on files they write.

The peers live in their own virtual environments, made by ``bash scripts/setup.sh --test``:
``.venv-peers`` (sae-lens 6, eai-sparsify, dictionary-learning) and ``.venv-peers5``
(sae-lens 5, for the pre-6 layout: the two sae-lens majors cannot share an environment).
``tests/peer_side.py`` runs in them once per session: it creates SAEs with each library, saves
them the library's own way, and writes what the library computes from its files on shared
inputs; it also reads the files saeflow wrote. The tests here read the same files with
saeflow and compare encode and decode. Without the environments these tests skip, except under
CI (``CI`` set), where a missing environment is a failure: CI runs setup.sh --test.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from saeflow.formats import load_sae, save_saelens
from saeflow.sae import SAE
from saeflow.sites import Site

REPO = Path(__file__).resolve().parents[1]
ENVS = {"saelens5": REPO / ".venv-peers5", "peers": REPO / ".venv-peers"}
D, F, K = 16, 48, 4
LLAMA_D, LLAMA_F = 64, 512
LLAMA_FACTOR = 5.91907514450867  # norm_scaling_factor of SAELens' llama_scope_lxr_8x / l15r_8x
LLAMA_THRESHOLD = 0.12  # jump_relu_threshold, in raw-input units

V5_CASES = ["v5_standard", "v5_jumprelu", "v5_standard_topk", "v5_topk", "v5_finetuning_scale",
            "v5_constant_norm", "v5_layer_norm", "v5_hook_z", "v5_no_apply_b_dec_key",
            "v5_bool_normalize", "v5_hook_point_key"]
V6_CASES = ["v6_standard", "v6_jumprelu", "v6_topk", "v6_topk_rescale", "v6_layer_norm",
            "v6_constant_norm", "v6_no_b_dec_in", "v6_no_apply_b_dec_key", "v6_hook_z", "v6_bf16"]
# sae-lens 6 no longer reads finetuning scaling factors (it dropped the parameter).
V5_FILES_SAELENS6_REFUSES = {"v5_finetuning_scale"}
OURS = ["jumprelu_scaled", "topk_layer_norm", "relu", "relu_att_z", "constant_norm"]
SPARSIFY = {"sparsify_res": ("layers.3", "3/res"), "sparsify_mlp_bf16": ("layers.3.mlp", "3/mlp")}
DICTLEARN = ["AutoEncoder", "AutoEncoderTopK", "BatchTopKSAE", "MatryoshkaBatchTopKSAE",
             "JumpReluAutoEncoder"]


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def our_saes() -> dict[str, SAE]:
    def make(site="3/res", **kw):
        return SAE(W_enc=rand(D, F) / 2, b_enc=rand(F, seed=2) * 0.2, W_dec=rand(F, D, seed=1),
                   b_dec=rand(D, seed=3) * 0.3, site=Site.parse(site), **kw)
    return {
        "jumprelu_scaled": make(activation="jumprelu", threshold=rand(F, seed=4).abs() * 0.3,
                                apply_b_dec_to_input=True, input_scale=2.0, output_scale=0.25),
        "topk_layer_norm": make(activation="topk", k=K, apply_b_dec_to_input=True,
                                input_norm="layer_norm"),
        "relu": make(),
        "relu_att_z": make(site="2/att_z", apply_b_dec_to_input=True),
        "constant_norm": make(apply_b_dec_to_input=True, input_norm="constant_norm"),
    }


def write_llamascope(root: Path) -> dict:
    """A Llama Scope-shaped folder (the release's layout, bf16) at SAELens' l15r_8x scale."""
    folder = root / "Llama3_1-8B-Base-L15R-8x"
    (folder / "checkpoints").mkdir(parents=True)
    w = {"encoder.weight": rand(LLAMA_F, LLAMA_D, seed=10) / math.sqrt(LLAMA_D),
         "encoder.bias": rand(LLAMA_F, seed=11) * 0.1,
         "decoder.weight": rand(LLAMA_D, LLAMA_F, seed=12) * 0.05,
         "decoder.bias": rand(LLAMA_D, seed=13) * 0.01}
    save_file({k: v.to(torch.bfloat16) for k, v in w.items()},
              str(folder / "checkpoints" / "final.safetensors"))
    norm = math.sqrt(LLAMA_D) / LLAMA_FACTOR
    hyper = {"d_model": LLAMA_D, "d_sae": LLAMA_F, "act_fn": "jumprelu",
             "jump_relu_threshold": LLAMA_THRESHOLD, "hook_point_in": "blocks.15.hook_resid_post",
             "hook_point_out": "blocks.15.hook_resid_post", "norm_activation": "dataset-wise",
             "dataset_average_activation_norm": {"in": norm, "out": norm},
             "apply_decoder_bias_to_pre_encoder": False, "use_decoder_bias": True,
             "sparsity_include_decoder_norm": True, "top_k": 50}
    (folder / "hyperparams.json").write_text(json.dumps(hyper))
    return hyper


@pytest.fixture(scope="session")
def peers(tmp_path_factory):
    missing = [str(p.relative_to(REPO)) for p in ENVS.values()
               if not (p / "bin" / "python").exists()]
    if missing:
        why = (f"peer environment(s) {', '.join(missing)} missing: `bash scripts/setup.sh --test` "
               "creates them")
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    root = tmp_path_factory.mktemp("peers")
    x = rand(64, D, seed=99) * 1.5
    # tokens whose norm is dataset_average_activation_norm.in, as the release's inputs are
    x_llama = rand(128, LLAMA_D, seed=98) / LLAMA_FACTOR
    save_file({"x": x, "x_llama": x_llama}, str(root / "x.safetensors"))
    for name, sae in our_saes().items():
        save_saelens(sae, root / "ours" / name, model_name="gpt2")
    write_llamascope(root / "llamascope")
    timings = {}
    for env, venv in ENVS.items():  # sae-lens 5 first: sae-lens 6 reads its files too
        t0 = time.perf_counter()
        run = subprocess.run([str(venv / "bin" / "python"), str(REPO / "tests" / "peer_side.py"),
                              env, str(root)], capture_output=True, text=True, timeout=900,
                             env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled",
                                  "TOKENIZERS_PARALLELISM": "false"})
        timings[env] = time.perf_counter() - t0
        if run.returncode != 0:
            pytest.fail(f"tests/peer_side.py {env} failed (exit {run.returncode}):\n"
                        f"{run.stderr[-4000:]}")
    print(f"peer side: {timings}", file=sys.stderr)
    return root


def peer_out(root: Path, env: str, case: str) -> dict:
    errors = json.loads((root / env / "errors.json").read_text())
    assert case not in errors, f"{env} could not compute {case}: {errors[case]}"
    return load_file(str(root / env / f"{case}.safetensors"))


def agree(sae: SAE, out: dict, x: torch.Tensor, atol=1e-4):
    feats = sae.encode(x)
    assert feats.shape == out["feats"].shape
    assert torch.equal(feats > 0, out["feats"] > 0), "different features fire"
    assert torch.allclose(feats, out["feats"], atol=atol, rtol=1e-4)
    assert torch.allclose(sae.reconstruct(x), out["recon"], atol=atol, rtol=1e-4)


def inputs(root: Path) -> dict:
    return load_file(str(root / "x.safetensors"))


def test_peer_versions(peers):
    v5 = json.loads((peers / "saelens5" / "versions.json").read_text())
    v6 = json.loads((peers / "peers" / "versions.json").read_text())
    assert v5["sae-lens"].startswith("5.") and v6["sae-lens"].startswith("6.")
    assert {"eai-sparsify", "dictionary-learning"} <= set(v6)


# ---- sae-lens 5 (pre-6 layout) ---------------------------------------------------------
@pytest.mark.parametrize("case", V5_CASES)
def test_saelens5_files(peers, case):
    sae = load_sae(peers / "files" / case)
    assert sae.site == (Site(2, "att_z") if case == "v5_hook_z" else Site(3, "res"))
    agree(sae, peer_out(peers, "saelens5", case), inputs(peers)["x"])
    if "topk" in case:
        assert sae.activation == "topk" and sae.k == K


def test_saelens6_reads_saelens5_files_as_saeflow_does(peers):
    errors = json.loads((peers / "peers" / "errors.json").read_text())
    assert {c for c in errors if c.startswith("v5_")} == V5_FILES_SAELENS6_REFUSES
    x = inputs(peers)["x"]
    for case in sorted(set(V5_CASES) - V5_FILES_SAELENS6_REFUSES):
        agree(load_sae(peers / "files" / case), peer_out(peers, "peers", case), x)


# ---- sae-lens 6 ------------------------------------------------------------------------
@pytest.mark.parametrize("case", V6_CASES)
def test_saelens6_files(peers, case):
    sae = load_sae(peers / "files" / case)
    assert sae.site == (Site(2, "att_z") if case == "v6_hook_z" else Site(3, "res"))
    agree(sae, peer_out(peers, "peers", case), inputs(peers)["x"])


@pytest.mark.parametrize("name", OURS)
def test_saelens6_reads_saeflow_files(peers, name):
    ours = our_saes()[name]
    x = inputs(peers)["x"]
    agree(ours, peer_out(peers, "peers", f"ours_{name}"), x)
    back = load_sae(peers / "files" / f"resaved_{name}")  # sae-lens 6's save_model of our file
    assert back.site == ours.site
    assert torch.allclose(back.encode(x), ours.encode(x), atol=1e-5)
    assert torch.allclose(back.reconstruct(x), ours.reconstruct(x), atol=1e-5)


def test_llamascope_as_saelens_reads_it(peers):
    x = inputs(peers)["x_llama"]
    out = peer_out(peers, "peers", "llamascope_l15r_8x")
    sae = load_sae(peers / "llamascope" / "Llama3_1-8B-Base-L15R-8x")
    assert sae.input_scale == pytest.approx(LLAMA_FACTOR)
    agree(sae, out, x, atol=2e-4)
    l0_saelens = (out["feats"] > 0).sum(-1).float().mean().item()
    l0_ours = (sae.encode(x) > 0).sum(-1).float().mean().item()
    # the old reading compared the on-disk threshold with the scaled pre-activation
    old = sae.replace(threshold=sae.threshold / sae.input_scale)
    l0_old = (old.encode(x) > 0).sum(-1).float().mean().item()
    print(f"Llama Scope-shaped l15r_8x: L0 per token SAELens {l0_saelens:.1f}, saeflow "
          f"{l0_ours:.1f}, threshold in scaled units {l0_old:.1f}", file=sys.stderr)
    assert l0_ours == l0_saelens and l0_old > 1.5 * l0_saelens


# ---- eai-sparsify ----------------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(SPARSIFY))
def test_sparsify_files(peers, case):
    hook, site = SPARSIFY[case]
    sae = load_sae(peers / "files" / case / hook)
    assert str(sae.site) == site and sae.activation == "topk" and sae.k == K
    agree(sae, peer_out(peers, "peers", case), inputs(peers)["x"], atol=1e-3)


# ---- dictionary-learning ---------------------------------------------------------------
@pytest.mark.parametrize("cls", DICTLEARN)
def test_dictlearn_files(peers, cls):
    sae = load_sae(peers / "files" / f"dl_{cls}" / "resid_out_layer2")
    assert sae.site == Site(2, "res") and sae.metadata["dict_class"] == cls
    agree(sae, peer_out(peers, "peers", f"dl_{cls}"), inputs(peers)["x"])
