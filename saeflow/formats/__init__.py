"""One reader per on-disk SAE format, and ``load_sae`` that picks the reader by the files present.

Each entry of ``READERS`` is ``(name, detect(path) -> bool, load(path, site) -> SAE)``. Detection
looks only at file names, never guesses from contents; a path no reader claims raises an error
listing the formats saeflow reads. ``incomplete_sae`` tells a folder that holds part of an SAE
(a config without its weights, weights without their config) from one that holds none, so a
suite folder never drops a broken SAE silently.
"""

from __future__ import annotations

from pathlib import Path

from saeflow.formats.dictlearn import is_dictlearn, load_dictlearn
from saeflow.formats.gemmascope import (is_gemmascope2, is_gemmascope_npz, load_gemmascope2,
                                        load_gemmascope_npz)
from saeflow.formats.llamascope import is_llamascope, load_llamascope
from saeflow.formats.openai import is_openai_pt, load_openai
from saeflow.formats.saelens import is_saelens_folder, load_saelens, save_saelens
from saeflow.formats.sparsify import is_sparsify_folder, load_sparsify
from saeflow.sae import SAE, SAEFileError
from saeflow.sites import Site

READERS = [
    ("saelens", is_saelens_folder, load_saelens),
    ("gemmascope", is_gemmascope_npz, load_gemmascope_npz),
    ("gemmascope2", is_gemmascope2, load_gemmascope2),
    ("llamascope", is_llamascope, load_llamascope),
    ("sparsify", is_sparsify_folder, load_sparsify),
    ("dictionary_learning", is_dictlearn, load_dictlearn),
    ("openai", is_openai_pt, load_openai),
]


# The files of each folder format (all needed, except dictionary_learning's optional config.json).
FOLDER_FILES = [
    ("SAELens", ("cfg.json", "sae_weights.safetensors")),
    ("sparsify", ("cfg.json", "sae.safetensors")),
    ("Llama Scope", ("hyperparams.json", "checkpoints/final.safetensors")),
    ("Gemma Scope 2", ("config.json", "params.safetensors")),
    ("dictionary_learning", ("ae.pt", "config.json")),
]


def incomplete_sae(path: str | Path) -> str | None:
    """Why the folder ``path`` looks like a broken SAE (some of a format's files, not all), or
    None when no reader claims it and it holds no SAE file at all (or a reader claims it)."""
    path = Path(path)
    if not path.is_dir() or any(detect(path) for _, detect, _ in READERS):
        return None
    wants = []
    for fmt, files in FOLDER_FILES:
        have = [f for f in files if (path / f).is_file()]
        missing = [f for f in files if not (path / f).is_file()]
        if fmt == "dictionary_learning":
            missing = [f for f in missing if f == "ae.pt"]
        if have and missing:
            wants.append((have, f"{' and '.join(missing)} ({fmt})"))
    if not wants:
        return None
    have = sorted({f for h, _ in wants for f in h})
    return (f"{path}: an incomplete SAE folder: it has {', '.join(have)} but no "
            f"{' or '.join(w for _, w in wants)}")


def load_sae(path: str | Path, site: Site | str | None = None) -> SAE:
    """Read the SAE stored at ``path`` (a folder or a file) in any known format."""
    path = Path(path)
    if not path.exists():
        raise SAEFileError(f"{path}: no such file or folder")
    site = None if site is None else Site.parse(site)
    for _, detect, load in READERS:
        if detect(path):
            return load(path, site)
    why = incomplete_sae(path)
    if why:
        raise SAEFileError(why)
    raise SAEFileError(f"{path}: not an SAE in any format saeflow reads "
                       f"({', '.join(name for name, _, _ in READERS)})")


__all__ = ["READERS", "incomplete_sae", "load_sae", "save_saelens", "SAEFileError"]
