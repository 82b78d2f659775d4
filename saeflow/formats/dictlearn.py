"""dictionary_learning (saprmarks): ``ae.pt`` (a state dict) + ``config.json`` in one folder.

``config.json`` is ``{"trainer": {"dict_class", "activation_dim", "dict_size", "k", ...}, ...}``.
Classes read (one small converter each, looked up in a table):
  - ``AutoEncoder``: ``bias [d]``, ``encoder.weight [F,d]``, ``encoder.bias [F]``,
    ``decoder.weight [d,F]``; ``f = relu(W_e (x - bias) + b_e)``, ``x_hat = W_d f + bias``.
    Like dictionary_learning's own loader, decoder columns are renormalised to unit length and
    the encoder rescaled to match (the function is unchanged).
  - ``AutoEncoderTopK``: ``encoder.*``, ``decoder.weight [d,F]``, ``b_dec``, ``k``, scalar
    ``threshold``; top-k of ``relu(W_e (x - b_dec) + b_e)`` (its default encode).
  - ``BatchTopKSAE`` / ``MatryoshkaBatchTopKSAE``: as TopK (Matryoshka stores ``W_enc [d,F]``,
    ``W_dec [F,d]``); their default encode at inference is the learned scalar ``threshold``,
    i.e. a JumpReLU with that threshold on every feature (``k`` is kept in the metadata).
  - ``JumpReluAutoEncoder``: ``W_enc [d,F]``, ``W_dec [F,d]``, ``b_enc``, ``b_dec``,
    ``threshold [F]``; b_dec not subtracted from the input.
A missing ``config.json`` or ``dict_class`` is accepted only for the classic ``AutoEncoder``
key set (the 2024 Pythia releases); anything else must name its class.

Site: explicit, else the folder layout of the released dictionaries
(``resid_out_layer3`` -> ``3/res``, ``attn_out_layer3`` -> ``3/att``, ``mlp_out_layer3`` ->
``3/mlp``, also ``resid_post_layer_3``), else the trainer's ``layer`` + ``submodule_name``.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path

import torch

from saeflow.formats.saelens import need, read_json
from saeflow.sae import SAE, SAEFileError
from saeflow.sites import Site

AE = "ae.pt"
CONFIG = "config.json"
_SITE_RE = re.compile(r"(resid|attn|mlp)_(?:out|post)_layer_?(\d+)")
_KIND = {"resid": "res", "attn": "att", "mlp": "mlp"}
_CLASSIC_KEYS = {"bias", "encoder.weight", "encoder.bias", "decoder.weight"}


def read_pt(path: Path) -> dict:
    """A torch-saved state dict, loaded safely (``weights_only``) on the CPU."""
    if not path.exists():
        raise SAEFileError(f"{path}: file not found")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SAEFileError(f"{path}: cannot read torch file, it may be truncated or not a state "
                           f"dict ({why})") from None
    if not isinstance(sd, dict):
        raise SAEFileError(f"{path}: expected a state dict, found {type(sd).__name__}")
    return sd


def is_dictlearn(path: Path) -> bool:
    return path.name == AE if path.is_file() else (path / AE).is_file()


def _site_from_path(folder: Path, trainer: dict) -> Site | None:
    for part in reversed(folder.parts):
        m = _SITE_RE.fullmatch(part)
        if m:
            return Site(int(m.group(2)), _KIND[m.group(1)])
    sub, layer = str(trainer.get("submodule_name") or ""), trainer.get("layer")
    m = _SITE_RE.fullmatch(sub)
    if m:
        return Site(int(m.group(2)), _KIND[m.group(1)])
    if isinstance(layer, int):
        for word, kind in (("resid", "res"), ("attn", "att"), ("mlp", "mlp")):
            if sub.startswith(word):
                return Site(layer, kind)
    return None


def _linear_pair(sd, path, enc="encoder.weight", dec="decoder.weight"):
    """``encoder.weight [F,d]`` and ``decoder.weight [d,F]`` -> ``W_enc [d,F]``, ``W_dec [F,d]``."""
    enc_FD, dec_DF = need(sd, enc, path).float(), need(sd, dec, path).float()
    if enc_FD.ndim != 2 or tuple(dec_DF.shape) != tuple(enc_FD.shape[::-1]):
        raise SAEFileError(f"{path}: {dec} has shape {tuple(dec_DF.shape)}, expected "
                           f"{tuple(enc_FD.shape[::-1])} ([d, F], as {enc} is [F, d])")
    return enc_FD.T.contiguous(), dec_DF.T.contiguous()


def _autoencoder(sd, path, trainer) -> dict:
    W_enc, W_dec = _linear_pair(sd, path)
    b_enc = need(sd, "encoder.bias", path).float()
    norms = W_dec.norm(dim=1)
    ok = norms > 0
    scale = torch.where(ok, norms, torch.ones_like(norms))
    return dict(W_enc=W_enc * scale, b_enc=b_enc * scale, W_dec=W_dec / scale[:, None],
                b_dec=need(sd, "bias", path).float(), activation="relu",
                apply_b_dec_to_input=True)


def _topk(sd, path, trainer) -> dict:
    W_enc, W_dec = _linear_pair(sd, path)
    return dict(W_enc=W_enc, b_enc=need(sd, "encoder.bias", path).float(), W_dec=W_dec,
                b_dec=need(sd, "b_dec", path).float(), activation="topk",
                k=int(sd["k"]) if "k" in sd else trainer.get("k"), apply_b_dec_to_input=True)


def _batch_topk(sd, path, trainer) -> dict:
    if "W_enc" in sd:  # Matryoshka stores the matrices directly
        W_enc, W_dec = need(sd, "W_enc", path).float(), need(sd, "W_dec", path).float()
        b_enc = need(sd, "b_enc", path).float()
    else:
        W_enc, W_dec = _linear_pair(sd, path)
        b_enc = need(sd, "encoder.bias", path).float()
    thr = need(sd, "threshold", path).float()
    if thr.numel() != 1:
        raise SAEFileError(f"{path}: threshold should be a scalar, has shape {tuple(thr.shape)}")
    k = int(sd["k"]) if "k" in sd else trainer.get("k")
    return dict(W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=need(sd, "b_dec", path).float(),
                activation="jumprelu", threshold=thr.reshape(()), apply_b_dec_to_input=True,
                metadata={"k": k})


def _jumprelu(sd, path, trainer) -> dict:
    return dict(W_enc=need(sd, "W_enc", path).float(), b_enc=need(sd, "b_enc", path).float(),
                W_dec=need(sd, "W_dec", path).float(), b_dec=need(sd, "b_dec", path).float(),
                activation="jumprelu", threshold=need(sd, "threshold", path).float())


CLASSES = {"AutoEncoder": _autoencoder, "AutoEncoderTopK": _topk, "BatchTopKSAE": _batch_topk,
           "MatryoshkaBatchTopKSAE": _batch_topk, "JumpReluAutoEncoder": _jumprelu}


def load_dictlearn(path: str | Path, site: Site | None = None) -> SAE:
    path = Path(path)
    folder = path.parent if path.is_file() else path
    ae = folder / AE
    cfg = read_json(folder / CONFIG) if (folder / CONFIG).exists() else {}
    trainer = cfg.get("trainer") if isinstance(cfg.get("trainer"), dict) else cfg
    sd = read_pt(ae)
    cls = trainer.get("dict_class")
    if cls is None:
        if set(sd) != _CLASSIC_KEYS:
            raise SAEFileError(f"{folder / CONFIG}: no trainer.dict_class, and the keys of {ae} "
                               f"({', '.join(sorted(sd))}) are not the classic AutoEncoder's")
        cls = "AutoEncoder"
    if cls not in CLASSES:
        raise SAEFileError(f"{folder / CONFIG}: dict_class {cls!r} is not supported; "
                           f"supported: {', '.join(CLASSES)}")
    fields = CLASSES[cls](sd, ae, trainer)
    site = site or _site_from_path(folder, trainer)
    if site is None:
        raise SAEFileError(f"{folder}: cannot tell the site (expected a folder such as "
                           "resid_out_layer3 / attn_out_layer3 / mlp_out_layer3, or trainer.layer "
                           "and submodule_name in config.json); give the site explicitly")
    for key in ("activation_dim", "dict_size"):
        want = {"activation_dim": fields["W_enc"].shape[0], "dict_size": fields["W_enc"].shape[1]}
        if trainer.get(key) not in (None, want[key]):
            raise SAEFileError(f"{folder / CONFIG}: {key} is {trainer[key]} but {ae} has "
                               f"{want[key]}")
    meta = {k: v for k, v in trainer.items() if isinstance(v, (str, int, float, bool))}
    meta.update(fields.pop("metadata", {}), format="dictionary_learning", dict_class=cls)
    if "lm_name" in trainer:
        meta.setdefault("model_name", trainer["lm_name"])
    return SAE(**fields, site=site, metadata=meta, source=str(folder))
