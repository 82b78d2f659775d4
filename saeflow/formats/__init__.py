"""One reader per on-disk SAE format, and ``load_sae`` that picks the reader by the files present.

Each entry of ``READERS`` is ``(name, detect(path) -> bool, load(path, site) -> SAE)``. Detection
looks only at file names, never guesses from contents; a path no reader claims raises an error
listing the formats saeflow reads.
"""

from __future__ import annotations

from pathlib import Path

from saeflow.formats.saelens import is_saelens_folder, load_saelens, save_saelens
from saeflow.sae import SAE, SAEFileError
from saeflow.sites import Site

READERS = [
    ("saelens", is_saelens_folder, load_saelens),
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
