"""A suite: a model plus one SAE per site, and its reader.

On disk a suite is
  - a folder of SAE folders (each SAE's own file names its site through its hook name), with an
    optional ``suite.json`` (``{"model": ..., "name": ..., ...}``) beside them, or
  - a spec file (``.json`` or ``.toml``): ``{"model": "smollm2", "saes": {"12/res": "path", ...}}``
    and/or ``"folder": "path"``; relative paths are relative to the spec file.
``read_suite(path)`` opens either. What other names mean (``starter``, a hub preset) is decided
one layer up, in ``saeflow.catalog.load_suite``. SAEs are read lazily on first access, so a
90-site suite opens instantly.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, cast

from saeflow.formats import load_sae, save_saelens
from saeflow.io import write_json_atomic
from saeflow.sae import SAE, SAEFileError
from saeflow.sites import Site

if TYPE_CHECKING:
    from saeflow.models import LM

SUITE_JSON = "suite.json"


@dataclass
class Suite:
    paths: dict[Site, Path | None]  # where each site's SAE lives (None: in memory only)
    model: str | None = None  # a model spec for saeflow.models.load_model
    name: str = "suite"
    root: Path | None = None
    info: dict = field(default_factory=dict)  # suite.json: training settings, quality, ...
    _saes: dict[Site, SAE] = field(default_factory=dict, repr=False)

    @classmethod
    def from_saes(cls, saes: dict[Site | str, SAE] | Iterable[SAE], model: str | None = None,
                  name: str = "suite") -> Suite:
        pairs: list[tuple[Site | str | None, SAE]]
        if isinstance(saes, dict):
            pairs = list(cast("dict[Site | str, SAE]", saes).items())
        else:
            pairs = [(s.site, s) for s in saes]
        by_site: dict[Site, SAE] = {}
        for key, sae in pairs:
            if key is None:
                raise ValueError(f"suite {name!r}: an SAE without a site ({sae.source}); pass "
                                 "a {site: SAE} mapping")
            site = Site.parse(key)
            by_site[site] = sae if sae.site is not None else sae.replace(site=site)
        paths: dict[Site, Path | None] = {s: None for s in by_site}
        return cls(paths=paths, model=model, name=name, _saes=by_site)

    # ---- access -----------------------------------------------------------------------
    def sites(self, kind: str | None = None) -> list[Site]:
        return sorted(s for s in self.paths if kind is None or s.kind == kind)

    @property
    def layers(self) -> list[int]:
        return sorted({s.layer for s in self.paths})

    @property
    def n_layers(self) -> int:
        return max(self.layers) + 1 if self.paths else 0

    def __contains__(self, site) -> bool:
        return Site.parse(site) in self.paths

    def __getitem__(self, site: Site | str) -> SAE:
        site = Site.parse(site)
        if site not in self.paths:
            raise KeyError(f"suite {self.name!r} has no SAE at {site}; it has: "
                           f"{', '.join(map(str, self.sites()))}")
        if site not in self._saes:
            path = self.paths[site]
            if path is None:  # from_saes keeps every SAE, so this is a suite built by hand
                raise KeyError(f"suite {self.name!r}: the SAE at {site} is neither in memory "
                               "nor on disk")
            sae = load_sae(path, site)
            if sae.site != site:
                raise SAEFileError(f"{self.paths[site]}: its hook names site {sae.site}, but the "
                                   f"suite lists it as {site}")
            self._saes[site] = sae
        return self._saes[site]

    def __len__(self) -> int:
        return len(self.paths)

    def load_model(self, device: str | None = "cpu", dtype: str = "float32") -> LM:
        """Load the suite's model and check every SAE fits its site."""
        from saeflow.models import load_model
        if not self.model:
            raise ValueError(f"suite {self.name!r} names no model; pass --model")
        lm = load_model(self.model, device=device, dtype=dtype)
        self.check_widths(lm)
        return lm

    def check_widths(self, lm: LM) -> None:
        """Raise if any SAE's input width does not fit the model's site."""
        for site in self.sites():
            sae = self[site]
            if site.layer >= lm.n_layers or sae.d_in != lm.site_width(site):
                raise ValueError(f"SAE at {site} ({self.paths[site] or 'memory'}) has d_in "
                                 f"{sae.d_in}; model {lm.name} has layers 0..{lm.n_layers - 1} "
                                 f"of width {lm.d_model}")

    # ---- saving -----------------------------------------------------------------------
    def save(self, folder: str | Path, model_name: str = "") -> Path:
        """Write every SAE as a SAELens folder named by its site slug, plus suite.json."""
        folder = Path(folder)
        for site in self.sites():
            save_saelens(self[site], folder / site.slug, model_name=model_name or self.model or "")
        write_json_atomic(folder / SUITE_JSON, {**self.info, "model": self.model, "name": self.name})
        return folder


def _read_spec(path: Path) -> dict:
    if path.suffix == ".toml":
        import tomllib
        try:
            return tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: not valid TOML ({e})") from None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _scan_folder(folder: Path) -> dict[Site, Path]:
    """Every SAE folder directly inside ``folder``, keyed by the site its file names. A folder
    with part of an SAE's files (or whose files do not agree) is an error, not skipped."""
    from saeflow.formats import READERS, incomplete_sae
    found: dict[Site, Path] = {}
    for sub in sorted(p for p in folder.iterdir() if not p.name.startswith(".")):
        if not any(detect(sub) for _, detect, _ in READERS):
            why = incomplete_sae(sub)  # part of an SAE: never drop its site silently
            if why:
                raise SAEFileError(f"suite folder {folder}: {why}")
            continue
        sae_site = load_sae(sub).site  # reads the config; weights are small next to a model
        if sae_site is None:
            raise ValueError(f"{sub}: the SAE's file names no site (its hook name); list the "
                             "suite's SAEs in a spec file instead")
        if sae_site in found:
            raise ValueError(f"{folder}: two SAEs for site {sae_site}: {found[sae_site]} and {sub}")
        found[sae_site] = sub
    return found


def _check_listed(folder: Path, paths: dict[Site, Path]) -> None:
    """Every site ``suite.json`` lists must have an SAE folder that a reader claims."""
    from saeflow.formats import READERS, incomplete_sae
    for site, sub in paths.items():
        if not any(detect(sub) for _, detect, _ in READERS):
            why = incomplete_sae(sub) or (f"{sub}: not an SAE in any format saeflow reads"
                                          if sub.exists() else f"{sub}: no such folder")
            raise SAEFileError(f"suite folder {folder}: {SUITE_JSON} lists site {site}, but {why}")


def read_suite(path: str | Path, model: str | None = None) -> Suite:
    """Open a suite folder or spec file (module docstring); ``model`` overrides its model."""
    path = Path(path).expanduser()
    paths: dict[Site, Path | None]
    if path.is_dir():
        info = {}
        if (path / SUITE_JSON).exists():
            info = json.loads((path / SUITE_JSON).read_text())
            sites = info.get("sites")
            if sites:
                listed = {Site.parse(s): path / Site.parse(s).slug for s in sites}
                _check_listed(path, listed)
                paths = dict(listed)
            else:
                paths = dict(_scan_folder(path))
        else:
            paths = dict(_scan_folder(path))
        if not paths:
            raise ValueError(f"{path}: no SAE folders found inside")
        return Suite(paths=paths, model=model or info.get("model"),
                     name=info.get("name", path.name), root=path, info=info)
    if path.suffix in (".json", ".toml") and path.exists():
        data = _read_spec(path)
        paths = {}
        if "folder" in data:
            paths.update(read_suite(path.parent / data["folder"]).paths)
        for site, p in (data.get("saes") or {}).items():
            paths[Site.parse(site)] = (path.parent / p).resolve()
        if not paths:
            raise ValueError(f"{path}: a suite spec needs 'saes' (site -> path) or 'folder'")
        return Suite(paths=paths, model=model or data.get("model"), name=data.get("name", path.stem),
                     root=path.parent, info=data)
    raise FileNotFoundError(f"suite {str(path)!r} is not an existing folder or .json/.toml spec "
                            "file")


def atlas_suite_root(atlas) -> Path | None:
    """The folder of the suite an atlas (``saeflow.atlas.Atlas``) was computed from, when it
    is on this machine."""
    root = (atlas.info.get("suite") or {}).get("root")
    return Path(root).expanduser() if root and Path(root).expanduser().exists() else None


def is_suite_path(spec: str | Path) -> bool:
    """Whether ``spec`` names a suite folder or spec file on this machine."""
    path = Path(spec).expanduser()
    return path.is_dir() or (path.suffix in (".json", ".toml") and path.exists())
