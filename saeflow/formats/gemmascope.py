"""Gemma Scope (Gemma 2, ``params.npz``) and Gemma Scope 2 (Gemma 3, ``params.safetensors``).

Gemma Scope: ``<release>/layer_L/width_16k/average_l0_M/params.npz`` with ``W_enc [d,F]``,
``W_dec [F,d]``, ``b_enc [F]``, ``b_dec [d]``, ``threshold [F]``; JumpReLU, b_dec is not
subtracted from the input. The file names no hook, so the site comes from the path: the layer
from ``layer_L``, the kind from the release folder (``gemma-scope-2b-pt-res`` -> ``res``,
``-mlp`` -> ``mlp``, ``-att`` -> ``att_z``: Gemma Scope's attention SAEs read the input of
``o_proj``, not the residual basis), or from an explicit ``site``. In the HF cache the release
folder is ``models--google--gemma-scope-2b-pt-res``, which matches too.

Gemma Scope 2: ``<site>/layer_L_width_16k_l0_medium/{config.json, params.safetensors}`` with
lowercase ``w_enc``, ``w_dec``, ``b_enc``, ``b_dec``, ``threshold``; ``config.json`` names the HF
module in ``hf_hook_point_in`` (``model.layers.L.output``, ``...self_attn.o_proj.input``, ...).
Transcoders (``hf_hook_point_out`` differs, or ``type`` is ``transcoder``) are refused.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import torch

from saeflow.formats.saelens import need, read_json, read_safetensors
from saeflow.sae import SAE, SAEFileError
from saeflow.sites import Site, site_from_hook_name

NPZ = "params.npz"
CONFIG2 = "config.json"
WEIGHTS2 = "params.safetensors"
_RELEASE_RE = re.compile(r"gemma-scope-(\d+b)-(pt|it)-(res|mlp|att)(?:-|$)")
_KIND = {"res": "res", "mlp": "mlp", "att": "att_z"}
_MODEL = {"2b": "google/gemma-2-2b", "9b": "google/gemma-2-9b", "27b": "google/gemma-2-27b"}


# ---- Gemma Scope (npz) ---------------------------------------------------------------
def is_gemmascope_npz(path: Path) -> bool:
    return path.name == NPZ if path.is_file() else (path / NPZ).is_file()


def site_from_gemmascope_path(path: Path) -> Site:
    """``.../gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_82`` -> ``12/res``."""
    layer = kind = None
    for part in path.parts:
        m = re.fullmatch(r"layer_(\d+)", part)
        if m:
            layer = int(m.group(1))
        r = _RELEASE_RE.search(part)
        if r:
            kind = _KIND[r.group(3)]
    if layer is None or kind is None:
        raise SAEFileError(f"{path}: cannot tell the site from the path (Gemma Scope files name no "
                           "hook): expected a release folder such as gemma-scope-2b-pt-res and a "
                           "layer_L folder above the file; give the site explicitly")
    return Site(layer, kind)


def _read_npz(path: Path) -> dict[str, torch.Tensor]:
    import numpy as np
    if not path.exists():
        raise SAEFileError(f"{path}: file not found")
    try:
        with np.load(path) as data:
            return {k: torch.from_numpy(np.asarray(data[k], dtype=np.float32)) for k in data.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as e:
        raise SAEFileError(f"{path}: cannot read npz file, it may be truncated ({e})") from None


def load_gemmascope_npz(path: str | Path, site: Site | None = None) -> SAE:
    path = Path(path)
    file = path if path.is_file() else path / NPZ
    t = _read_npz(file)
    scale = t.get("scaling_factor")
    if scale is not None and not torch.allclose(scale, torch.ones_like(scale)):
        raise SAEFileError(f"{file}: a scaling_factor other than 1 is not supported")
    site = site or site_from_gemmascope_path(file.parent)
    meta = {"format": "gemmascope"}
    release = next((m for m in map(_RELEASE_RE.search, file.parts) if m), None)
    if release:
        meta["model_name"] = _MODEL.get(release.group(1), f"google/gemma-2-{release.group(1)}")
        if release.group(2) == "it":
            meta["model_name"] += "-it"
    return SAE(W_enc=need(t, "W_enc", file), b_enc=need(t, "b_enc", file),
               W_dec=need(t, "W_dec", file), b_dec=need(t, "b_dec", file), activation="jumprelu",
               threshold=need(t, "threshold", file), site=site, metadata=meta, source=str(file))


# ---- Gemma Scope 2 (safetensors + config.json) ---------------------------------------
def is_gemmascope2(path: Path) -> bool:
    folder = path.parent if path.is_file() and path.name == WEIGHTS2 else path
    return (folder / CONFIG2).is_file() and (folder / WEIGHTS2).is_file()


def site_from_hf_hook(hook: str) -> Site:
    """``model.layers.3.output`` / ``model.language_model.layers.3.self_attn.o_proj.input`` /
    ``model.layers.3.post_feedforward_layernorm.output`` -> a site."""
    name = hook.strip().replace("language_model.", "")
    if name.endswith(".output"):
        name = name[: -len(".output")]
    return site_from_hook_name(name)


def load_gemmascope2(path: str | Path, site: Site | None = None) -> SAE:
    path = Path(path)
    folder = path.parent if path.is_file() else path
    cfg = read_json(folder / CONFIG2)
    where = folder / CONFIG2
    hook_in, hook_out = cfg.get("hf_hook_point_in"), cfg.get("hf_hook_point_out")
    if cfg.get("type", "sae") != "sae" or (hook_out and hook_out != hook_in):
        raise SAEFileError(f"{where}: a transcoder ({hook_in} -> {hook_out}), not an SAE")
    if cfg.get("affine_connection"):
        raise SAEFileError(f"{where}: affine_connection is not supported")
    arch = cfg.get("architecture", "jump_relu")
    if arch not in ("jump_relu", "jumprelu"):
        raise SAEFileError(f"{where}: architecture {arch!r} is not supported (only jump_relu)")
    if site is None:
        if not hook_in:
            raise SAEFileError(f"{where}: no hf_hook_point_in; give the site explicitly")
        try:
            site = site_from_hf_hook(hook_in)
        except ValueError as e:
            raise SAEFileError(f"{where}: {e}") from None
    wfile = folder / WEIGHTS2
    t = read_safetensors(wfile)
    f32 = torch.float32
    meta = {k: v for k, v in cfg.items() if isinstance(v, (str, int, float, bool))}
    meta["format"] = "gemmascope2"
    return SAE(W_enc=need(t, "w_enc", wfile).to(f32), b_enc=need(t, "b_enc", wfile).to(f32),
               W_dec=need(t, "w_dec", wfile).to(f32), b_dec=need(t, "b_dec", wfile).to(f32),
               activation="jumprelu", threshold=need(t, "threshold", wfile).to(f32), site=site,
               metadata=meta, source=str(folder))
