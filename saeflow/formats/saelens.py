"""SAELens format: ``cfg.json`` + ``sae_weights.safetensors`` in one folder per SAE.

Reads SAELens v6 configs (``hook_name``, ``model_name`` under ``metadata``) and pre-6 configs
(the same keys at top level). Architectures: ``standard`` (ReLU), ``jumprelu`` (``threshold``
or ``log_threshold``), ``topk`` (``k``). ``normalize_activations``: ``none`` and
``layer_norm``; ``expected_average_only_in`` needs a stored scaling factor.

The writer folds saeflow's input/output scales into the weights, so any SAELens-compatible
tool computes the same function from the files.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from saeflow.io import atomic_dir
from saeflow.sae import SAE, SAEFileError
from saeflow.sites import Site, site_from_hook_name

CFG = "cfg.json"
WEIGHTS = "sae_weights.safetensors"
_ARCH = {"standard": "relu", "relu": "relu", "jumprelu": "jumprelu", "topk": "topk"}


def is_saelens_folder(path: Path) -> bool:
    return (path / CFG).exists() and (path / WEIGHTS).exists()


def read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise SAEFileError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise SAEFileError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise SAEFileError(f"{path}: expected a JSON object")
    return data


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file (torch backend: bf16 works)."""
    from safetensors.torch import load_file
    if not path.exists():
        raise SAEFileError(f"{path}: file not found")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for truncated headers
        raise SAEFileError(f"{path}: cannot read safetensors file ({e})") from None


def need(tensors: dict, key: str, path) -> torch.Tensor:
    if key not in tensors:
        raise SAEFileError(f"{path}: missing tensor {key!r} (found: {', '.join(sorted(tensors))})")
    return tensors[key]


def load_saelens(folder: str | Path, site: Site | None = None) -> SAE:
    folder = Path(folder)
    cfg = read_json(folder / CFG)
    meta = {**cfg, **(cfg.get("metadata") or {})}
    arch = cfg.get("architecture", "standard")
    if arch not in _ARCH:
        raise SAEFileError(f"{folder / CFG}: architecture {arch!r} is not supported; "
                           f"supported: {', '.join(_ARCH)}")
    wpath = folder / WEIGHTS
    t = read_safetensors(wpath)
    threshold = None
    if _ARCH[arch] == "jumprelu":
        if "threshold" in t:
            threshold = t["threshold"]
        elif "log_threshold" in t:
            threshold = t["log_threshold"].exp()
        else:
            raise SAEFileError(f"{wpath}: a jumprelu SAE needs 'threshold' or 'log_threshold'")
    norm = cfg.get("normalize_activations") or "none"
    input_norm, input_scale, output_scale = "none", 1.0, 1.0
    if norm == "layer_norm":
        input_norm = "layer_norm"
    elif norm == "expected_average_only_in":
        factor = meta.get("activation_norm_scaling_factor") or meta.get("scaling_factor")
        if factor is None:
            raise SAEFileError(f"{folder / CFG}: normalize_activations=expected_average_only_in "
                               "but no activation_norm_scaling_factor is stored")
        input_scale, output_scale = float(factor), 1.0 / float(factor)
    elif norm != "none":
        raise SAEFileError(f"{folder / CFG}: normalize_activations={norm!r} is not supported")
    if site is None:
        hook = meta.get("hook_name")
        if not hook:
            raise SAEFileError(f"{folder / CFG}: no hook_name; give the site explicitly")
        try:
            site = site_from_hook_name(hook)
        except ValueError as e:
            raise SAEFileError(f"{folder / CFG}: {e}") from None
    f32 = torch.float32
    return SAE(W_enc=need(t, "W_enc", wpath).to(f32), b_enc=need(t, "b_enc", wpath).to(f32),
               W_dec=need(t, "W_dec", wpath).to(f32), b_dec=need(t, "b_dec", wpath).to(f32),
               activation=_ARCH[arch], threshold=None if threshold is None else threshold.to(f32),
               k=cfg.get("k"), site=site,
               apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", False)),
               input_norm=input_norm, input_scale=input_scale, output_scale=output_scale,
               metadata={k: v for k, v in meta.items() if k != "metadata"}, source=str(folder))


def _plain_weights(sae: SAE) -> dict[str, torch.Tensor]:
    """Weights with input_scale/output_scale folded in (exact)."""
    s, o = sae.input_scale, sae.output_scale
    b_enc = sae.b_enc
    if sae.apply_b_dec_to_input and s * o != 1.0:
        b_enc = b_enc - sae.b_dec @ sae.W_enc  # move the input centring into b_enc
    w = {"W_enc": sae.W_enc * s, "b_enc": b_enc, "W_dec": sae.W_dec * o, "b_dec": sae.b_dec * o}
    if sae.activation == "jumprelu":
        w["threshold"] = sae.threshold
    return {k: v.detach().to(torch.float32).contiguous() for k, v in w.items()}


def save_saelens(sae: SAE, folder: str | Path, model_name: str = "", extra: dict | None = None,
                 dtype: str = "float32") -> Path:
    """Write ``sae`` as a SAELens v6 folder, atomically (temp folder, then rename)."""
    from safetensors.torch import save_file
    if sae.site is None:
        raise ValueError("save_saelens needs an SAE with a site (it names the hook)")
    folder = Path(folder)
    apply_b = sae.apply_b_dec_to_input and sae.input_scale * sae.output_scale == 1.0
    cfg = {
        "architecture": {"relu": "standard", "jumprelu": "jumprelu", "topk": "topk"}[sae.activation],
        "d_in": sae.d_in, "d_sae": sae.d_sae, "dtype": dtype, "device": "cpu",
        "apply_b_dec_to_input": apply_b,
        "normalize_activations": "layer_norm" if sae.input_norm == "layer_norm" else "none",
        "reshape_activations": "none",
        # sae_lens_version marks the v6 layout: without it SAELens rebuilds the metadata from
        # top-level keys (pre-6 files) and drops hook_name.
        "metadata": {"sae_lens_version": "6.0.0", "model_name": model_name,
                     "hook_name": sae.site.hook_name,
                     "hook_layer": sae.site.layer, "saeflow_site": str(sae.site),
                     **(extra or {})},
    }
    if sae.activation == "topk":
        cfg["k"] = sae.k
    weights = _plain_weights(sae)
    if dtype != "float32":
        weights = {k: v.to(getattr(torch, dtype)) for k, v in weights.items()}
    with atomic_dir(folder) as tmp:
        with open(tmp / CFG, "w") as f:
            json.dump(cfg, f, indent=2)
        save_file(weights, str(tmp / WEIGHTS))
    return folder
