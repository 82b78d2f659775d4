"""The peer libraries' side of tests/test_peers.py, run by the interpreter of a separate virtual
environment that has them (never imported by saeflow's own tests).

    python tests/peer_side.py saelens5 ROOT   # sae-lens 5.x (its own environment)
    python tests/peer_side.py peers ROOT      # sae-lens 6.x, eai-sparsify, dictionary-learning

ROOT already holds ``x.safetensors`` (the inputs) and the folders saeflow wrote (``ours/``,
``llamascope/``). Each case below makes an SAE with the peer library itself (random weights with
biases and thresholds that matter), saves it in that library's own way under ``ROOT/files/<case>``,
loads it back with the library's own loader and writes what the library computes from the files
to ``ROOT/<env>/<case>.safetensors`` (``feats``, ``recon``). Files written by sae-lens 5 are read
by sae-lens 6 as well. A case the library cannot read is recorded in ``ROOT/<env>/errors.json``
with its error, for the test to judge. No saeflow import here: only torch, safetensors and the
peers.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

D, F, K, HEADS = 16, 48, 4, 4  # D = HEADS * d_head for the hook_z cases
HOOK = "blocks.3.hook_resid_post"
HOOK_Z = "blocks.2.attn.hook_z"
GEN = torch.Generator().manual_seed(1234)


def rand(*shape, scale=1.0):
    return torch.randn(*shape, generator=GEN) * scale


def randomise(module, threshold_scale=0.4):
    """Random weights in every parameter (thresholds positive), so no bias is trivially zero."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "threshold" in name:
                p.copy_(rand(*p.shape).abs() * threshold_scale + 0.05)
            elif "scaling_factor" in name:
                p.copy_(rand(*p.shape).abs() + 0.5)
            elif p.ndim == 2:
                p.copy_(rand(*p.shape, scale=1 / p.shape[0] ** 0.5 * 2))
            else:
                p.copy_(rand(*p.shape, scale=0.3))
    return module


def edit_json(path: Path, change) -> None:
    cfg = json.loads(path.read_text())
    change(cfg)
    path.write_text(json.dumps(cfg))


def sae_lens_io(sae, x, hook_z=False):
    """feats, recon of a SAELens SAE on x ([N, D]; hook_z SAEs get [N, heads, d_head])."""
    with torch.no_grad():
        xin = x.reshape(len(x), HEADS, D // HEADS) if hook_z else x
        feats = sae.encode(xin)
        recon = sae.decode(feats)
    return {"feats": feats.float().contiguous(), "recon": recon.reshape(len(x), -1).float()}


# ---- sae-lens 5 ------------------------------------------------------------------------
def saelens5_cases(root: Path, x: torch.Tensor):
    from sae_lens import SAE, SAEConfig
    base = dict(d_in=D, d_sae=F, activation_fn_str="relu", apply_b_dec_to_input=True,
                finetuning_scaling_factor=False, context_size=128, model_name="gpt2",
                hook_name=HOOK, hook_layer=3, hook_head_index=None, prepend_bos=True,
                dataset_path="x", dataset_trust_remote_code=False,
                normalize_activations="none", dtype="float32", device="cpu",
                sae_lens_training_version="5.11.0", architecture="standard")
    variants = {
        "v5_standard": {},
        "v5_jumprelu": dict(architecture="jumprelu"),
        "v5_standard_topk": dict(activation_fn_str="topk", activation_fn_kwargs={"k": K}),
        "v5_topk": dict(architecture="topk", activation_fn_str="topk",
                        activation_fn_kwargs={"k": K}),
        "v5_finetuning_scale": dict(finetuning_scaling_factor=True),
        "v5_constant_norm": dict(normalize_activations="constant_norm_rescale"),
        "v5_layer_norm": dict(normalize_activations="layer_norm", apply_b_dec_to_input=False),
        "v5_hook_z": dict(hook_name=HOOK_Z, hook_layer=2),
        "v5_no_apply_b_dec_key": {},
        "v5_bool_normalize": {},
        "v5_hook_point_key": {},
    }
    for case, change in variants.items():
        folder = root / "files" / case
        sae = randomise(SAE(SAEConfig.from_dict({**base, **change})))
        sae.save_model(str(folder))
        cfg = folder / "cfg.json"
        if case == "v5_finetuning_scale":  # the tensor's name in released files, and the one
            w = load_file(str(folder / "sae_weights.safetensors"))  # sae-lens 5 loads
            w["scaling_factor"] = w.pop("finetuning_scaling_factor")
            save_file(w, str(folder / "sae_weights.safetensors"))
        if case == "v5_no_apply_b_dec_key":
            edit_json(cfg, lambda c: c.pop("apply_b_dec_to_input"))
        if case == "v5_bool_normalize":
            edit_json(cfg, lambda c: c.update(normalize_activations=True))
        if case == "v5_hook_point_key":
            edit_json(cfg, lambda c: c.update(hook_point=c.pop("hook_name")))
        yield case, lambda folder=folder, case=case: sae_lens_io(
            SAE.load_from_disk(str(folder)), x, hook_z=case == "v5_hook_z")


# ---- sae-lens 6 ------------------------------------------------------------------------
def saelens6_cases(root: Path, x: torch.Tensor, x_llama: torch.Tensor):
    import sae_lens
    from sae_lens import (SAE, JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig,
                          TopKSAE, TopKSAEConfig)
    from sae_lens.saes.sae import SAEMetadata

    def meta(hook=HOOK):
        return SAEMetadata(hook_name=hook, model_name="gpt2", sae_lens_version=sae_lens.__version__)

    made = {
        "v6_standard": StandardSAE(StandardSAEConfig(d_in=D, d_sae=F, metadata=meta())),
        "v6_jumprelu": JumpReLUSAE(JumpReLUSAEConfig(d_in=D, d_sae=F, metadata=meta())),
        "v6_topk": TopKSAE(TopKSAEConfig(d_in=D, d_sae=F, k=K, metadata=meta())),
        "v6_topk_rescale": TopKSAE(TopKSAEConfig(d_in=D, d_sae=F, k=K, metadata=meta(),
                                                 rescale_acts_by_decoder_norm=True)),
        "v6_layer_norm": TopKSAE(TopKSAEConfig(d_in=D, d_sae=F, k=K, metadata=meta(),
                                               normalize_activations="layer_norm")),
        "v6_constant_norm": StandardSAE(StandardSAEConfig(
            d_in=D, d_sae=F, metadata=meta(), normalize_activations="constant_norm_rescale")),
        "v6_no_b_dec_in": JumpReLUSAE(JumpReLUSAEConfig(d_in=D, d_sae=F, metadata=meta(),
                                                        apply_b_dec_to_input=False)),
        "v6_no_apply_b_dec_key": StandardSAE(StandardSAEConfig(d_in=D, d_sae=F, metadata=meta())),
        "v6_hook_z": StandardSAE(StandardSAEConfig(d_in=D, d_sae=F, metadata=meta(HOOK_Z),
                                                   reshape_activations="hook_z")),
        "v6_bf16": JumpReLUSAE(JumpReLUSAEConfig(d_in=D, d_sae=F, metadata=meta(),
                                                 dtype="bfloat16")),
    }
    for case, sae in made.items():
        folder = root / "files" / case
        randomise(sae)
        if case == "v6_topk_rescale":  # decoder rows far from unit norm
            with torch.no_grad():
                sae.W_dec.mul_(torch.linspace(0.2, 3.0, F)[:, None])
        sae.save_model(str(folder))
        if case == "v6_no_apply_b_dec_key":
            edit_json(folder / "cfg.json", lambda c: c.pop("apply_b_dec_to_input"))
        yield case, lambda folder=folder, case=case: sae_lens_io(
            SAE.load_from_disk(str(folder), dtype="float32"), x, hook_z=case == "v6_hook_z")

    # sae-lens 5 files, read by sae-lens 6
    for folder in sorted((root / "files").glob("v5_*")):
        yield f"{folder.name}", lambda folder=folder: sae_lens_io(
            SAE.load_from_disk(str(folder)), x, hook_z=folder.name == "v5_hook_z")

    # saeflow's files, read by sae-lens 6; and sae-lens 6's re-save, for saeflow to read back
    for folder in sorted((root / "ours").iterdir()):
        def ours(folder=folder):
            sae = SAE.load_from_disk(str(folder))
            sae.save_model(str(root / "files" / f"resaved_{folder.name}"))
            return sae_lens_io(sae, x, hook_z=folder.name.endswith("att_z"))
        yield f"ours_{folder.name}", ours

    # Llama Scope through SAELens' own pretrained loader, the download replaced by local files
    import sae_lens.loading.pretrained_sae_loaders as loaders
    local = root / "llamascope"

    def from_local(repo_id, filename, subfolder=None, **_):
        return str(local / (f"{subfolder}/{filename}" if subfolder else filename))
    loaders.hf_hub_download = from_local

    def llama():
        sae = SAE.from_pretrained("llama_scope_lxr_8x", "l15r_8x", device="cpu")
        with torch.no_grad():
            feats = sae.encode(x_llama)
            return {"feats": feats, "recon": sae.decode(feats)}
    yield "llamascope_l15r_8x", llama


# ---- eai-sparsify ----------------------------------------------------------------------
def sparsify_cases(root: Path, x: torch.Tensor):
    from sparsify import SparseCoder, SparseCoderConfig
    for case, hook, dtype in (("sparsify_res", "layers.3", torch.float32),
                              ("sparsify_mlp_bf16", "layers.3.mlp", torch.bfloat16)):
        folder = root / "files" / case / hook
        sae = SparseCoder(D, SparseCoderConfig(num_latents=F, k=K), dtype=dtype)
        randomise(sae)
        sae.set_decoder_norm_to_unit_norm()
        sae.save_to_disk(folder)

        def run(folder=folder):
            back = SparseCoder.load_from_disk(folder).to(torch.float32)
            with torch.no_grad():
                top_acts, top_idx, _ = back.encode(x)
                feats = torch.zeros(len(x), F).scatter_(-1, top_idx, top_acts.float())
                return {"feats": feats, "recon": back.decode(top_acts, top_idx).float()}
        yield case, run


# ---- dictionary-learning ---------------------------------------------------------------
def dictlearn_cases(root: Path, x: torch.Tensor):
    from dictionary_learning import AutoEncoder, JumpReluAutoEncoder
    from dictionary_learning.trainers.batch_top_k import BatchTopKSAE
    from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKSAE
    from dictionary_learning.trainers.top_k import AutoEncoderTopK
    from dictionary_learning.utils import load_dictionary
    made = {
        "AutoEncoder": AutoEncoder(D, F),
        "AutoEncoderTopK": AutoEncoderTopK(D, F, K),
        "BatchTopKSAE": BatchTopKSAE(D, F, K),
        "MatryoshkaBatchTopKSAE": MatryoshkaBatchTopKSAE(D, F, K, [F // 4, F // 4, F // 2]),
        "JumpReluAutoEncoder": JumpReluAutoEncoder(D, F),
    }
    for cls, ae in made.items():
        folder = root / "files" / f"dl_{cls}" / "resid_out_layer2"
        randomise(ae)
        with torch.no_grad():
            if cls == "AutoEncoder":  # its loader renormalises non-unit decoder columns
                ae.decoder.weight.mul_(torch.linspace(0.5, 2.0, F)[None, :])
            if hasattr(ae, "threshold") and ae.threshold.ndim == 0:  # learned batch threshold
                ae.threshold.fill_(0.3)
        folder.mkdir(parents=True)
        torch.save(ae.state_dict(), folder / "ae.pt")
        trainer = {"dict_class": cls, "trainer_class": "x", "activation_dim": D, "dict_size": F,
                   "k": K, "layer": 2, "lm_name": "EleutherAI/pythia-70m-deduped",
                   "submodule_name": "resid_post_layer_2"}
        (folder / "config.json").write_text(json.dumps({"trainer": trainer}))

        def run(folder=folder):
            back, _ = load_dictionary(str(folder), device="cpu")
            with torch.no_grad():
                feats = back.encode(x)
                return {"feats": feats, "recon": back.decode(feats)}
        yield f"dl_{cls}", run


def main() -> None:
    env, root = sys.argv[1], Path(sys.argv[2])
    x = load_file(str(root / "x.safetensors"))
    out = root / env
    out.mkdir(parents=True, exist_ok=True)
    if env == "saelens5":
        cases = saelens5_cases(root, x["x"])
    else:
        def chain():
            yield from saelens6_cases(root, x["x"], x["x_llama"])
            yield from sparsify_cases(root, x["x"])
            yield from dictlearn_cases(root, x["x"])
        cases = chain()
    errors, versions = {}, {}
    for case, compute in cases:
        try:
            result = compute()
            save_file({k: v.detach().float().contiguous() for k, v in result.items()},
                      str(out / f"{case}.safetensors"))
        except Exception as e:  # recorded for the test, which knows which cases must work
            errors[case] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
    from importlib.metadata import version
    for dist in ("sae-lens", "eai-sparsify", "dictionary-learning", "torch"):
        try:
            versions[dist] = version(dist)
        except Exception:
            pass
    (out / "errors.json").write_text(json.dumps(errors, indent=1))
    (out / "versions.json").write_text(json.dumps(versions, indent=1))


if __name__ == "__main__":
    main()
