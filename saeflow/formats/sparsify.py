"""EleutherAI sparsify: one folder per hook point, ``<hookpoint>/{cfg.json, sae.safetensors}``.

On disk (often bf16, read with the torch backend): ``encoder.weight [F,d]``, ``encoder.bias [F]``,
``W_dec [F,d]``, ``b_dec [d]``. The encoder always subtracts ``b_dec`` from its input, then
applies ReLU and keeps the ``k`` largest (``cfg.json``: ``k``, ``activation: topk``).
Transcoders (``transcode``), skip connections (``W_skip``) and ``groupmax`` are refused: they are
not SAEs of one site.

Site: explicit, else the folder name read as an HF module name (``layers.10`` -> ``10/res``,
``layers.10.mlp`` -> ``10/mlp``, ``h.3.attn`` -> ``3/att``, ...).
"""

from __future__ import annotations

from pathlib import Path

import torch

from saeflow.formats.saelens import need, read_json, read_safetensors
from saeflow.sae import SAE, SAEFileError
from saeflow.sites import Site, site_from_hook_name

CFG = "cfg.json"
WEIGHTS = "sae.safetensors"


def is_sparsify_folder(path: Path) -> bool:
    return (path / CFG).is_file() and (path / WEIGHTS).is_file()


def load_sparsify(folder: str | Path, site: Site | None = None) -> SAE:
    folder = Path(folder)
    cfile, wfile = folder / CFG, folder / WEIGHTS
    cfg = read_json(cfile)
    if cfg.get("transcode"):
        raise SAEFileError(f"{cfile}: a transcoder (transcode: true), not an SAE")
    if cfg.get("skip_connection"):
        raise SAEFileError(f"{cfile}: skip_connection is not supported")
    if cfg.get("activation", "topk") != "topk":
        raise SAEFileError(f"{cfile}: activation {cfg['activation']!r} is not supported (topk)")
    if "k" not in cfg:
        raise SAEFileError(f"{cfile}: no k (the number of active latents)")
    if site is None:
        try:
            site = site_from_hook_name(folder.name)
        except ValueError as e:
            raise SAEFileError(f"{folder}: the folder name should be the hook point: {e}; "
                               "give the site explicitly") from None
    t = read_safetensors(wfile)
    if "W_skip" in t:
        raise SAEFileError(f"{wfile}: has W_skip (a skip connection), which is not supported")
    f32 = torch.float32
    enc_FD = need(t, "encoder.weight", wfile).to(f32)
    if cfg.get("d_in") not in (None, enc_FD.shape[-1]):
        raise SAEFileError(f"{cfile}: d_in is {cfg['d_in']} but encoder.weight has shape "
                           f"{tuple(enc_FD.shape)} ([d_sae, d_in])")
    meta = {key: v for key, v in cfg.items() if isinstance(v, (str, int, float, bool))}
    meta["format"] = "sparsify"
    return SAE(W_enc=enc_FD.T.contiguous(), b_enc=need(t, "encoder.bias", wfile).to(f32),
               W_dec=need(t, "W_dec", wfile).to(f32), b_dec=need(t, "b_dec", wfile).to(f32),
               activation="topk", k=cfg["k"], site=site, apply_b_dec_to_input=True,
               metadata=meta, source=str(folder))
