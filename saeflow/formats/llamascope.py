"""Llama Scope (OpenMOSS, Llama-3.1-8B): ``Llama3_1-8B-Base-L{L}{R,A,M}-{8x,32x}/`` holding
``hyperparams.json`` and ``checkpoints/final.safetensors``.

On disk (bf16): ``encoder.weight [F,d]``, ``encoder.bias [F]``, ``decoder.weight [d,F]``,
``decoder.bias [d]``. Decoder rows are not unit norm. ``hyperparams.json`` gives ``d_model``,
``act_fn`` (``jumprelu`` with one scalar ``jump_relu_threshold``; ``relu``; ``topk`` with
``top_k``), ``norm_activation`` and ``dataset_average_activation_norm {in, out}``.

With ``norm_activation == "dataset-wise"`` the SAE sees ``x * s`` with ``s = sqrt(d) / norm.in``
and its output is mapped back by ``norm.out / sqrt(d)``: these become ``SAE.input_scale`` /
``output_scale``. ``jump_relu_threshold`` is in the units of the *raw* input, as SAELens' Llama
Scope loader reads it (it folds ``s`` into ``W_enc`` and multiplies the threshold by ``s``; the
authors' llamascopium loads the release through SAELens): in the scaled units saeflow computes
in, the threshold is ``jump_relu_threshold * s`` (``s`` runs from about 0.9 to 112 across the
release, so comparing the on-disk value with the scaled pre-activation would change which
features fire). ``apply_decoder_bias_to_pre_encoder`` subtracts ``decoder.bias`` from the
*unscaled* input; that is folded exactly into ``b_enc``. ``sparsity_include_decoder_norm`` is
kept in the metadata only. ``token-wise`` normalisation (a
per-token scale) cannot be expressed as fixed scales and is refused.

Site: explicit, else the folder name (``L15R`` -> ``15/res``, ``A`` -> ``att``, ``M`` -> ``mlp``),
else ``hook_point_in``.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from saeflow.formats.saelens import need, read_json, read_safetensors
from saeflow.sae import SAE, SAEFileError
from saeflow.sites import Site, site_from_hook_name

HYPER = "hyperparams.json"
WEIGHTS = Path("checkpoints") / "final.safetensors"
_FOLDER_RE = re.compile(r"(?:^|-)L(\d+)([RAM])(?:-|$)")
_KIND = {"R": "res", "A": "att", "M": "mlp"}


def _folder(path: Path) -> Path:
    if path.is_file() and path.name == WEIGHTS.name and path.parent.name == WEIGHTS.parent.name:
        return path.parent.parent
    return path


def is_llamascope(path: Path) -> bool:
    folder = _folder(path)
    return (folder / HYPER).is_file() and (folder / WEIGHTS).is_file()


def site_from_llamascope(folder: Path, hyper: dict) -> Site:
    m = _FOLDER_RE.search(folder.name)
    if m:
        return Site(int(m.group(1)), _KIND[m.group(2)])
    hook = hyper.get("hook_point_in")
    if hook:
        try:
            return site_from_hook_name(hook)
        except ValueError as e:
            raise SAEFileError(f"{folder / HYPER}: {e}") from None
    raise SAEFileError(f"{folder}: cannot tell the site: the folder name has no L<layer><R|A|M> "
                       f"part and {HYPER} has no hook_point_in; give the site explicitly")


def load_llamascope(path: str | Path, site: Site | None = None) -> SAE:
    folder = _folder(Path(path))
    hfile, wfile = folder / HYPER, folder / WEIGHTS
    hyper = read_json(hfile)
    hin, hout = hyper.get("hook_point_in"), hyper.get("hook_point_out")
    if hout and hin and hout != hin:
        raise SAEFileError(f"{hfile}: a transcoder ({hin} -> {hout}), not an SAE")
    site = site or site_from_llamascope(folder, hyper)
    t = read_safetensors(wfile)
    f32 = torch.float32
    enc_FD = need(t, "encoder.weight", wfile).to(f32)
    dec_DF = need(t, "decoder.weight", wfile).to(f32)
    F, d = enc_FD.shape
    if tuple(dec_DF.shape) != (d, F):
        raise SAEFileError(f"{wfile}: decoder.weight has shape {tuple(dec_DF.shape)}, expected "
                           f"({d}, {F}) = [d_model, d_sae] as encoder.weight is {(F, d)}")
    if hyper.get("d_model") not in (None, d):
        raise SAEFileError(f"{hfile}: d_model is {hyper['d_model']} but the weights have width {d}")
    b_enc = need(t, "encoder.bias", wfile).to(f32)
    b_dec = t["decoder.bias"].to(f32) if "decoder.bias" in t else torch.zeros(d)
    if not hyper.get("use_decoder_bias", True):
        b_dec = torch.zeros(d)

    norm = hyper.get("norm_activation", "dataset-wise")
    input_scale = output_scale = 1.0
    if norm == "dataset-wise":
        avg = hyper.get("dataset_average_activation_norm")
        if not isinstance(avg, dict) or "in" not in avg or "out" not in avg:
            raise SAEFileError(f"{hfile}: norm_activation is dataset-wise but "
                               "dataset_average_activation_norm {in, out} is missing")
        input_scale = math.sqrt(d) / float(avg["in"])
        output_scale = float(avg["out"]) / math.sqrt(d)
    elif norm not in ("inference", "none", None):
        raise SAEFileError(f"{hfile}: norm_activation {norm!r} is not supported "
                           "(dataset-wise or inference)")
    if hyper.get("apply_decoder_bias_to_pre_encoder", False):
        # pre = ((x - b_dec) * s) @ W_enc + b_enc = (x * s) @ W_enc + (b_enc - s * b_dec @ W_enc)
        b_enc = b_enc - input_scale * (b_dec @ enc_FD.T)

    act = hyper.get("act_fn", "jumprelu")
    threshold, k = None, None
    if act == "jumprelu":
        if "jump_relu_threshold" not in hyper:
            raise SAEFileError(f"{hfile}: act_fn is jumprelu but jump_relu_threshold is missing")
        threshold = torch.full((F,), float(hyper["jump_relu_threshold"]) * input_scale)
    elif act == "topk":
        k = hyper.get("top_k")
    elif act != "relu":
        raise SAEFileError(f"{hfile}: act_fn {act!r} is not supported (jumprelu, topk, relu)")
    meta = {key: v for key, v in hyper.items() if isinstance(v, (str, int, float, bool))}
    meta.update(format="llamascope", model_name="meta-llama/Llama-3.1-8B")
    return SAE(W_enc=enc_FD.T.contiguous(), b_enc=b_enc, W_dec=dec_DF.T.contiguous(), b_dec=b_dec,
               activation=act, threshold=threshold, k=k, site=site, input_scale=input_scale,
               output_scale=output_scale, metadata=meta, source=str(folder))
