"""Recipes: the experiments the CLI, the demo and the viewer run, as functions over small
configs that return named results. The commands only parse arguments into these configs, call
a recipe and print; the demo calls the same recipes and renders their results.

  - ``saeflow.recipes.atlas``: an atlas run with the model it needs (``saeflow atlas``);
  - ``saeflow.recipes.steering``: steering plans from a plan file, a flow graph, features or a
    theme, and unsteered/steered generations (``saeflow steer``, ``saeflow themes``, viewer);
  - ``saeflow.recipes.steer_eval``: the steering evaluation over themes (``saeflow steer-eval``);
  - ``saeflow.recipes.deactivation``: the causal check of the matches (``saeflow deactivate``);
  - ``saeflow.recipes.permutation``: permutations over depth and layer pruning (``saeflow
    permute``, ``saeflow prune``); ``.training``: a training run (``saeflow train``);
  - ``saeflow.recipes.graph``, ``.contexts``: a flow graph exported, top contexts computed;
  - ``saeflow.recipes.describe``, ``.match``, ``.quality``: ``saeflow info``, ``match`` and
    ``quality``.
What a suite or atlas name means is ``saeflow.catalog``; plots are ``saeflow.plots``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

Log = Callable[[str], None]


def slug(text: str) -> str:
    """A file-name form of a theme: lowercase letters and digits joined by '-'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "theme"


def config_default(cls, name: str):
    """The default of dataclass field ``name`` (parsers and derived configs read it here)."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    if f.default is dataclasses.MISSING and f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default
