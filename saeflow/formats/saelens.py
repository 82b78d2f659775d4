"""SAELens format: ``cfg.json`` + ``sae_weights.safetensors`` in one folder per SAE.

Read as SAELens 6.54 reads a folder from disk (``SAE.load_from_disk``):
  - v6 configs (``sae_lens_version >= 6`` at top level or under ``metadata``; ``hook_name``,
    ``model_name`` under ``metadata``) and pre-6 configs (everything at top level), converted as
    SAELens' ``handle_pre_6_0_config`` does: ``hook_point`` is the old ``hook_name``,
    ``activation_fn_str`` the old ``activation_fn``; ``activation_fn: topk`` with
    ``activation_fn_kwargs.k`` is a TopK SAE whatever ``architecture`` says, and
    ``architecture: topk`` takes ``k`` from ``activation_fn_kwargs`` too (what sae_lens 5 TopK
    training writes); a boolean ``normalize_activations`` means ``expected_average_only_in``
    (true) or ``none`` (false).
  - ``apply_b_dec_to_input`` defaults to true when absent (SAELens' default in every version).
  - architectures ``standard`` (ReLU), ``jumprelu`` (``threshold`` or ``log_threshold``),
    ``topk`` (``k``; with ``rescale_acts_by_decoder_norm`` the pre-activations are multiplied by
    the decoder row norms before the top-k and the activations divided by them before decoding,
    which is folded exactly into the weights).
  - ``normalize_activations``: ``none``; ``layer_norm`` and ``constant_norm_rescale`` (per-token,
    ``SAE.input_norm``); ``expected_average_only_in`` applies a stored
    ``activation_norm_scaling_factor`` and otherwise reads as the identity, as SAELens does when
    it has no factor for the file (noted in ``metadata["normalization_note"]``).
  - a ``scaling_factor`` / ``finetuning_scaling_factor`` tensor that is not all ones (sae_lens 5
    finetuning scaling: ``decode(f) = (f * s) @ W_dec + b_dec``) is folded into the decoder rows;
    SAELens refuses such a tensor when ``finetuning_scaling_factor`` is false, and so does saeflow.
  - per-head SAEs (``hook_head_index`` set) are refused: a saeflow site is a whole hook.
``cfg.json``'s ``d_in`` / ``d_sae`` must agree with the weights' shapes.

The writer folds saeflow's input/output scales into the weights, so any SAELens-compatible
tool computes the same function from the files; ``att_z`` sites get ``reshape_activations:
hook_z`` so SAELens flattens TransformerLens' ``[..., n_heads, d_head]`` ``hook_z`` input.
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
_ARCH_NAME = {"relu": "standard", "jumprelu": "jumprelu", "topk": "topk"}
_NORMS = {"layer_norm": "layer_norm", "constant_norm_rescale": "constant_norm"}


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


def _is_v6(cfg: dict) -> bool:
    version = cfg.get("sae_lens_version") or (cfg.get("metadata") or {}).get("sae_lens_version")
    try:
        return int(str(version).split(".")[0]) >= 6
    except ValueError:
        return False


def saelens_config(cfg: dict, where) -> dict:
    """One flat view of a v6 or pre-6 ``cfg.json``, with SAELens' defaults filled in."""
    flat = {**cfg, **(cfg.get("metadata") or {})}
    flat.pop("metadata", None)
    if not _is_v6(cfg):
        for old, new in (("hook_point", "hook_name"), ("hook_point_head_index", "hook_head_index"),
                         ("activation_fn_str", "activation_fn")):
            if old in flat:
                flat.setdefault(new, flat.pop(old))
        kwargs = flat.get("activation_fn_kwargs") or {}
        if flat.get("activation_fn") == "topk" and kwargs.get("k") is not None:
            flat["architecture"] = "topk"
        if flat.get("architecture") == "topk" and kwargs.get("k") is not None:
            flat["k"] = kwargs["k"]
        act = flat.get("activation_fn") or "relu"
        if act not in ("relu", "topk"):
            raise SAEFileError(f"{where}: activation_fn {act!r} is not supported (relu, topk)")
        if isinstance(flat.get("normalize_activations"), bool):
            flat["normalize_activations"] = ("expected_average_only_in"
                                             if flat["normalize_activations"] else "none")
    flat.setdefault("architecture", "standard")
    flat.setdefault("apply_b_dec_to_input", True)
    if flat.get("normalize_activations") is None:
        flat["normalize_activations"] = "none"
    return flat


def _check_shapes(cfg: dict, W_enc: torch.Tensor, cfile, wpath) -> None:
    if W_enc.ndim != 2:
        raise SAEFileError(f"{wpath}: W_enc should be 2-d [d_in, d_sae], has shape "
                           f"{tuple(W_enc.shape)}")
    for key, got in (("d_in", W_enc.shape[0]), ("d_sae", W_enc.shape[1])):
        want = cfg.get(key)
        if want is not None and want != got:
            raise SAEFileError(f"{cfile}: {key} is {want} but {wpath.name} has W_enc of shape "
                               f"{tuple(W_enc.shape)} ([d_in, d_sae]): config and weights disagree")


def _finetuning_scale(t: dict, cfg: dict, wpath) -> torch.Tensor | None:
    for key in ("finetuning_scaling_factor", "scaling_factor"):
        if key in t:
            s = t[key].float()
            if torch.allclose(s, torch.ones_like(s)):
                return None
            if cfg.get("finetuning_scaling_factor") is False:
                raise SAEFileError(f"{wpath}: {key} is not all ones but cfg.json says "
                                   "finetuning_scaling_factor: false")
            return s
    return None


def load_saelens(folder: str | Path, site: Site | None = None) -> SAE:
    folder = Path(folder)
    cfile, wpath = folder / CFG, folder / WEIGHTS
    cfg = saelens_config(read_json(cfile), cfile)
    arch = cfg["architecture"]
    if arch not in _ARCH:
        raise SAEFileError(f"{cfile}: architecture {arch!r} is not supported; "
                           f"supported: {', '.join(_ARCH)}")
    if cfg.get("hook_head_index") is not None:
        raise SAEFileError(f"{cfile}: hook_head_index is {cfg['hook_head_index']}: an SAE of one "
                           "attention head, which is not a saeflow site")
    t = read_safetensors(wpath)
    f32 = torch.float32
    W_enc, b_enc = need(t, "W_enc", wpath).to(f32), need(t, "b_enc", wpath).to(f32)
    W_dec, b_dec = need(t, "W_dec", wpath).to(f32), need(t, "b_dec", wpath).to(f32)
    _check_shapes(cfg, W_enc, cfile, wpath)
    threshold = None
    if _ARCH[arch] == "jumprelu":
        if "threshold" in t:
            threshold = t["threshold"].to(f32)
        elif "log_threshold" in t:
            threshold = t["log_threshold"].to(f32).exp()
        else:
            raise SAEFileError(f"{wpath}: a jumprelu SAE needs 'threshold' or 'log_threshold'")
    scale = _finetuning_scale(t, cfg, wpath)
    if scale is not None:
        if tuple(scale.shape) != (W_dec.shape[0],):
            raise SAEFileError(f"{wpath}: scaling_factor has shape {tuple(scale.shape)}, expected "
                               f"({W_dec.shape[0]},)")
        W_dec = W_dec * scale[:, None]
    if _ARCH[arch] == "topk" and cfg.get("rescale_acts_by_decoder_norm"):
        n = W_dec.norm(dim=1).clamp_min(1e-8)  # SAELens' get_W_dec_norm
        W_enc, b_enc, W_dec = W_enc * n, b_enc * n, W_dec / n[:, None]
    meta = dict(cfg)
    norm = cfg["normalize_activations"]
    input_norm, input_scale, output_scale = "none", 1.0, 1.0
    if norm in _NORMS:
        input_norm = _NORMS[norm]
    elif norm == "expected_average_only_in":
        factor = cfg.get("activation_norm_scaling_factor")
        if factor is None and isinstance(cfg.get("scaling_factor"), (int, float)):
            factor = cfg["scaling_factor"]
        if factor is not None:
            input_scale, output_scale = float(factor), 1.0 / float(factor)
        else:
            meta["normalization_note"] = ("normalize_activations is expected_average_only_in but "
                                          "no scaling factor is stored: read as the identity, "
                                          "as SAELens does")
    elif norm != "none":
        raise SAEFileError(f"{cfile}: normalize_activations={norm!r} is not supported (none, "
                           "layer_norm, constant_norm_rescale, expected_average_only_in)")
    if site is None:
        hook = cfg.get("hook_name")
        if not hook:
            raise SAEFileError(f"{cfile}: no hook_name; give the site explicitly")
        try:
            site = site_from_hook_name(hook)
        except ValueError as e:
            raise SAEFileError(f"{cfile}: {e}") from None
    return SAE(W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec, activation=_ARCH[arch],
               threshold=threshold, k=cfg.get("k"), site=site,
               apply_b_dec_to_input=bool(cfg["apply_b_dec_to_input"]), input_norm=input_norm,
               input_scale=input_scale, output_scale=output_scale, metadata=meta,
               source=str(folder))


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
        "architecture": _ARCH_NAME[sae.activation],
        "d_in": sae.d_in, "d_sae": sae.d_sae, "dtype": dtype, "device": "cpu",
        "apply_b_dec_to_input": apply_b,
        "normalize_activations": {"layer_norm": "layer_norm", "none": "none",
                                  "constant_norm": "constant_norm_rescale"}[sae.input_norm],
        "reshape_activations": "hook_z" if sae.site.kind == "att_z" else "none",
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
