"""What a suite or an atlas name means, in one place (the CLI, the demo and the viewer use it).

A suite is named by
  - ``starter`` (or ``smollm2-starter``): saeflow's own SAEs for the embedded default, trained
    on first use (``saeflow.train.ensure_starter_suite``: about 20 minutes once), then cached;
  - ``standard`` or ``gpu``: the larger training profiles (``saeflow.train.PROFILES``), the same;
  - a folder of SAE folders or a ``.json``/``.toml`` spec file (``saeflow.suite.read_suite``);
  - a hub preset name (``saeflow.presets``).
An atlas is named by its folder, or by a suite whose atlas is in the cache
(``<cache>/atlases/<suite name>``, where ``saeflow.atlas.ensure_atlas`` keeps it).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from saeflow.suite import Suite, atlas_suite_root, is_suite_path, read_suite

if TYPE_CHECKING:
    from saeflow.atlas import Atlas
    from saeflow.models import LM

STARTER = "starter"
STARTER_NAMES = (STARTER, "smollm2-starter")
PROFILE_NAMES = ("standard", "gpu")  # the other training profiles (saeflow.train.PROFILES)


def load_suite(spec: str | Path, model: str | None = None) -> Suite:
    """Open the suite ``spec`` names (module docstring); ``model`` overrides its model."""
    from saeflow import presets
    spec_s = str(spec)
    if spec_s in STARTER_NAMES:
        from saeflow.train import ensure_starter_suite
        return read_suite(ensure_starter_suite(), model=model)
    if spec_s in PROFILE_NAMES or spec_s in {f"smollm2-{n}" for n in PROFILE_NAMES}:
        from saeflow.train import ensure_profile_suite
        return read_suite(ensure_profile_suite(spec_s.removeprefix("smollm2-")), model=model)
    if is_suite_path(spec_s):
        return read_suite(spec_s, model=model)
    if spec_s in presets.PRESETS:
        return presets.open_preset(spec_s, model=model)
    raise FileNotFoundError(f"suite {spec_s!r} is not 'starter', 'standard', 'gpu', an existing "
                            f"folder, a .json/.toml "
                            f"spec file, or a preset ({', '.join(presets.PRESETS)})")


def open_suite(spec: str | Path, model: str | None = None, device: str = "cpu",
               dtype: str = "float32") -> tuple[Suite, LM]:
    """The suite ``spec`` names and its model (whose sites the SAEs are checked to fit)."""
    suite = load_suite(spec, model=model)
    return suite, suite.load_model(device=device, dtype=dtype)


def cached_atlas_dir(suite: Suite) -> Path:
    """Where ``ensure_atlas`` keeps the atlas of ``suite``."""
    from saeflow.models import cache_dir
    return cache_dir() / "atlases" / suite.name


def is_atlas_folder(path: str | Path, unfinished: bool = False) -> bool:
    """Whether ``path`` holds an atlas (``unfinished``: or the start of one)."""
    from saeflow.atlas import ATLAS_JSON, SETTINGS_JSON
    path = Path(path).expanduser()
    return (path / ATLAS_JSON).exists() or (unfinished and (path / SETTINGS_JSON).exists())


def find_atlas(spec: str | Path) -> tuple[Atlas, Suite | None]:
    """``(atlas, suite or None)`` for an atlas folder, or for a suite whose atlas is cached
    (an error says how to compute it when it is not)."""
    from saeflow.atlas import Atlas
    if is_atlas_folder(spec, unfinished=True):
        return Atlas.load(Path(spec).expanduser()), None  # (unfinished: load says how to resume)
    suite = load_suite(spec)
    cached = cached_atlas_dir(suite)
    if not is_atlas_folder(cached):
        raise FileNotFoundError(f"suite {suite.name!r} has no atlas in the cache ({cached}); "
                                f"compute it first with `saeflow atlas {spec}`")
    return Atlas.load(cached), suite


def open_atlas(spec: str | Path, lm: LM | None = None) -> Atlas:
    """An atlas folder, or the cached atlas of the suite ``spec`` names (computed if missing)."""
    from saeflow.atlas import Atlas, ensure_atlas
    if is_atlas_folder(spec):
        return Atlas.load(Path(spec).expanduser())
    return ensure_atlas(load_suite(spec), lm)


def atlas_for(suite: Suite, lm: LM | None = None, atlas: str | Path | None = None) -> Atlas:
    """The atlas folder ``atlas`` when given, else the suite's cached atlas (computed if
    missing)."""
    from saeflow.atlas import Atlas, ensure_atlas
    return Atlas.load(atlas) if atlas else ensure_atlas(suite, lm)


def suite_of_atlas(atlas: Atlas, suite: str | Path | None = None,
                   model: str | None = None) -> Suite:
    """The suite ``suite`` names, else the one the atlas was computed from."""
    if suite:
        return load_suite(suite, model=model)
    root = atlas_suite_root(atlas)
    if root is None:
        raise FileNotFoundError(f"the atlas {atlas.root} names no suite folder on this "
                                "machine; pass --suite")
    return load_suite(root, model=model)


def model_loader(atlas: Atlas, suite_spec: str | None, suite: Suite | None, model: str | None,
                 device: str = "cpu", dtype: str = "float32"
                 ) -> tuple[Callable[[], tuple[LM, Suite]] | None, str | None]:
    """A function that loads ``(lm, suite)`` for steering from an atlas, or ``(None, why
    not)``. The suite is ``suite``, else ``suite_spec``, else the atlas's own folder."""
    if suite is None:
        root = suite_spec or atlas_suite_root(atlas)
        if not root or not Path(root).expanduser().exists():
            return None, "the atlas names no suite folder on this machine; pass --suite to steer"
        suite = load_suite(root, model=model)
    elif model:
        suite.model = model
    if not suite.model:
        return None, f"suite {suite.name!r} names no model; pass --model to steer"
    chosen = suite

    def load() -> tuple[LM, Suite]:
        print(f"saeflow view: loading {chosen.model} for steering ...", file=sys.stderr)
        return chosen.load_model(device=device, dtype=dtype), chosen
    return load, None
