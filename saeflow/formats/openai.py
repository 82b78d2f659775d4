"""OpenAI's GPT-2 small autoencoders (openai/sparse_autoencoder):
``{location}_v5_32k/autoencoders/L.pt``.

Each ``L.pt`` is a torch state dict: ``pre_bias [d]``, ``encoder.weight [F,d]``,
``latent_bias [F]``, ``decoder.weight [d,F]`` (unit-norm columns), plus ``activation`` (the
class name, ``TopK`` for v5, ``ReLU`` for v1/v4) and ``activation_state_dict``
(``{"k": 32, "postact_fn": "ReLU"}``). Encoding, as its ``Autoencoder``:
``latents = TopK(encoder(LN(x) - pre_bias) + latent_bias)``, decoding
``decoder(latents) + pre_bias`` then un-normalised. As in the reference code, the input is
LayerNorm-standardised exactly when the activation is ``TopK`` (``SAE.input_norm = "layer_norm"``).

Site: explicit, else the layer from the file name and the kind from the location folder:
``resid_post_mlp`` -> ``res``, ``resid_delta_attn`` -> ``att``, ``resid_delta_mlp`` -> ``mlp``.
``resid_post_attn`` (the stream between attention and MLP) and ``mlp_post_act`` (MLP neurons)
are not saeflow sites and need an explicit site to be read at all.
"""

from __future__ import annotations

import re
from pathlib import Path

from saeflow.formats.dictlearn import read_pt
from saeflow.formats.saelens import need
from saeflow.sae import SAE, SAEFileError
from saeflow.sites import Site

_FILE_RE = re.compile(r"(\d+)\.pt")
_LOCATION_RE = re.compile(r"(resid_post_mlp|resid_delta_attn|resid_delta_mlp|resid_post_attn|"
                          r"mlp_post_act)(?:_v\d+(?:_\w+)?)?")
_KIND = {"resid_post_mlp": "res", "resid_delta_attn": "att", "resid_delta_mlp": "mlp"}


def is_openai_pt(path: Path) -> bool:
    return (path.is_file() and _FILE_RE.fullmatch(path.name) is not None
            and path.parent.name == "autoencoders")


def site_from_openai_path(path: Path) -> Site:
    m = _LOCATION_RE.fullmatch(path.parent.parent.name)
    if not m:
        raise SAEFileError(f"{path}: cannot tell the site: expected .../<location>_v5_32k/"
                           "autoencoders/L.pt with location resid_post_mlp, resid_delta_attn or "
                           "resid_delta_mlp; give the site explicitly")
    if m.group(1) not in _KIND:
        raise SAEFileError(f"{path}: location {m.group(1)} is not a saeflow site (res, att, mlp "
                           "are resid_post_mlp, resid_delta_attn, resid_delta_mlp); give the site "
                           "explicitly to read it anyway")
    return Site(int(_FILE_RE.fullmatch(path.name).group(1)), _KIND[m.group(1)])


def load_openai(path: str | Path, site: Site | None = None) -> SAE:
    path = Path(path)
    sd = read_pt(path)
    act = sd.get("activation", "ReLU")
    if act == "TopK":
        act_sd = sd.get("activation_state_dict") or {}
        if "k" not in act_sd:
            raise SAEFileError(f"{path}: activation is TopK but activation_state_dict has no k")
        if act_sd.get("postact_fn", "ReLU") != "ReLU":
            raise SAEFileError(f"{path}: TopK postact_fn {act_sd['postact_fn']!r} is not "
                               "supported (ReLU)")
        kind, k, input_norm = "topk", int(act_sd["k"]), "layer_norm"
    elif act == "ReLU":
        kind, k, input_norm = "relu", None, "none"
    else:
        raise SAEFileError(f"{path}: activation {act!r} is not supported (TopK, ReLU)")
    enc_FD = need(sd, "encoder.weight", path).float()
    dec_DF = need(sd, "decoder.weight", path).float()
    if enc_FD.ndim != 2 or tuple(dec_DF.shape) != tuple(enc_FD.shape[::-1]):
        raise SAEFileError(f"{path}: decoder.weight has shape {tuple(dec_DF.shape)}, expected "
                           f"{tuple(enc_FD.shape[::-1])} ([d, F], as encoder.weight is [F, d])")
    site = site or site_from_openai_path(path)
    meta = {"format": "openai", "model_name": "gpt2", "location": path.parent.parent.name}
    return SAE(W_enc=enc_FD.T.contiguous(), b_enc=need(sd, "latent_bias", path).float(),
               W_dec=dec_DF.T.contiguous(), b_dec=need(sd, "pre_bias", path).float(),
               activation=kind, k=k, site=site, apply_b_dec_to_input=True, input_norm=input_norm,
               metadata=meta, source=str(path))
