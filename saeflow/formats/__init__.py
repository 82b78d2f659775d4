"""One reader per on-disk SAE format, and ``load_sae`` that picks the reader by the files present.

Each entry of ``READERS`` is ``(name, detect(path) -> bool, load(path, site) -> SAE)``. Detection
looks only at file names, never guesses from contents; a path no reader claims raises an error
listing the formats saeflow reads.
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


def load_sae(path: str | Path, site: Site | str | None = None) -> SAE:
    """Read the SAE stored at ``path`` (a folder or a file) in any known format."""
    path = Path(path)
    if not path.exists():
        raise SAEFileError(f"{path}: no such file or folder")
    site = None if site is None else Site.parse(site)
    for _, detect, load in READERS:
        if detect(path):
            return load(path, site)
    raise SAEFileError(f"{path}: not an SAE in any format saeflow reads "
                       f"({', '.join(name for name, _, _ in READERS)})")


__all__ = ["READERS", "load_sae", "save_saelens", "SAEFileError"]
