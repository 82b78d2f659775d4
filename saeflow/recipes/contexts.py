"""Top activating contexts of an atlas's features (``saeflow contexts``; the search is
``saeflow.contexts``): which atlas and suite a name means, which sites, and the timed run."""

from __future__ import annotations

import time
from pathlib import Path
from typing import NamedTuple

from saeflow.configs import ContextSettings


class ContextsRun(NamedTuple):
    path: Path  # contexts.safetensors beside the atlas
    info: dict  # what it holds (sites, n_sequences, ...)
    seconds: float


def run_contexts(atlas: str, settings: ContextSettings, suite: str | None = None,
                 model: str | None = None, sites: str | None = None, device: str = "cpu",
                 dtype: str = "float32") -> ContextsRun:
    """Compute (or resume) the contexts of ``atlas`` (a folder, or a suite whose atlas is
    cached) with the SAEs of ``suite`` (default: the atlas's own)."""
    from saeflow.catalog import find_atlas, suite_of_atlas
    from saeflow.contexts import Contexts, compute_contexts, context_sites
    opened, found = find_atlas(atlas)
    if suite or found is None:
        found = suite_of_atlas(opened, suite, model=model)
    if model:
        found.model = model
    chosen = context_sites(opened, found, sites)
    lm = found.load_model(device=device, dtype=dtype)
    t0 = time.perf_counter()
    path = compute_contexts(lm, found, opened.root, settings, sites=chosen)
    return ContextsRun(path, Contexts(path).info(), time.perf_counter() - t0)
