"""saeflow: feature flow across the layers of a language model, from SAE weights.

The public API, importable from here (each name is loaded on first use, so ``import saeflow``
stays light); docs/architecture.md shows the layers behind it.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_PUBLIC = {
    "saeflow.sites": ("Site", "Feature", "parse_sites"),
    "saeflow.sae": ("SAE",),
    "saeflow.formats": ("load_sae", "save_saelens"),
    "saeflow.models": ("LM", "load_model"),
    "saeflow.hooks": ("recording", "editing", "run_sites"),
    "saeflow.suite": ("Suite", "read_suite"),
    "saeflow.match": ("cosine_topk", "permutation_match"),
    "saeflow.atlas": ("Atlas", "compute_atlas", "ensure_atlas"),
    "saeflow.flow": ("FlowGraph", "trace"),
    "saeflow.steer": ("SteeringPlan", "plan_from_graph", "plan_from_features", "generate"),
    "saeflow.catalog": ("load_suite", "open_atlas", "find_atlas"),
}
_WHERE = {name: module for module, names in _PUBLIC.items() for name in names}
__all__ = ["LM", "SAE", "Atlas", "Feature", "FlowGraph", "Site", "SteeringPlan", "Suite",
           "compute_atlas", "cosine_topk", "editing", "ensure_atlas", "find_atlas", "generate",
           "load_model", "load_sae", "load_suite", "open_atlas", "parse_sites",
           "permutation_match", "plan_from_features", "plan_from_graph", "read_suite",
           "recording", "run_sites", "save_saelens", "trace"]

if TYPE_CHECKING:
    from saeflow.atlas import Atlas, compute_atlas, ensure_atlas
    from saeflow.catalog import find_atlas, load_suite, open_atlas
    from saeflow.flow import FlowGraph, trace
    from saeflow.formats import load_sae, save_saelens
    from saeflow.hooks import editing, recording, run_sites
    from saeflow.match import cosine_topk, permutation_match
    from saeflow.models import LM, load_model
    from saeflow.sae import SAE
    from saeflow.sites import Feature, Site, parse_sites
    from saeflow.steer import SteeringPlan, generate, plan_from_features, plan_from_graph
    from saeflow.suite import Suite, read_suite


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'saeflow' has no attribute {name!r}")
    value = getattr(import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
