"""An atlas run (``saeflow atlas``; the atlas itself is ``saeflow.atlas``): the model it needs
(for promoted-token labels, and for att_z SAEs whose decoders reach the residual basis through
W_O), the computation into a folder or the cache, and its timing."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple
from typing import TYPE_CHECKING

from saeflow.atlas import DEFAULT_K, Atlas
from saeflow.lineage import DEFAULT_NULL_SAMPLES, DEFAULT_QUANTILE, parse_threshold_spec
from saeflow.match import DEFAULT_BLOCK

if TYPE_CHECKING:
    from saeflow.models import LM
    from saeflow.suite import Suite


@dataclass(frozen=True)
class AtlasOptions:
    k: int = DEFAULT_K  # matches stored per feature
    block: int = DEFAULT_BLOCK  # tile size of the blocked matmul
    precision: str = "auto"  # auto | bf16 | fp32 (results are exact fp32 either way)
    null_samples: int = DEFAULT_NULL_SAMPLES
    quantile: float = DEFAULT_QUANTILE
    thresholds: str | None = None  # a threshold override (``lineage.parse_threshold_spec``)
    labels: bool = True

    def __post_init__(self):
        parse_threshold_spec(self.thresholds)  # a bad override fails before anything loads


class AtlasRun(NamedTuple):
    atlas: Atlas
    seconds: float  # wall time of this run (a cached atlas: the time to open it)


def atlas_model(suite: Suite, labels: bool, device: str = "cpu",
                dtype: str = "float32") -> LM | None:
    """The model an atlas of ``suite`` needs, or None (labels are then skipped)."""
    needs_model = any(s.kind == "att_z" for s in suite.sites())
    if not (needs_model or labels):
        return None
    if suite.model:
        return suite.load_model(device=device, dtype=dtype)
    if needs_model:
        raise ValueError(f"suite {suite.name!r} has att_z SAEs, which need the model's W_O, "
                         "but names no model: pass --model")
    print("saeflow atlas: the suite names no model, so labels are skipped "
          "(pass --model to add them)", file=sys.stderr)
    return None


def build_atlas(suite: Suite, opts: AtlasOptions, lm: LM | None = None,
                out: str | Path | None = None) -> AtlasRun:
    """Compute (or resume) the atlas into ``out``, or into / from the cache without one."""
    from saeflow.atlas import compute_atlas, ensure_atlas
    thresholds = parse_threshold_spec(opts.thresholds)
    t0 = time.perf_counter()
    if out:
        atlas = compute_atlas(suite, out, lm, k=opts.k, block=opts.block,
                              precision=opts.precision, null_samples=opts.null_samples,
                              quantile=opts.quantile, thresholds=thresholds, labels=opts.labels)
    else:
        atlas = ensure_atlas(suite, lm, k=opts.k, null_samples=opts.null_samples,
                             quantile=opts.quantile, thresholds=thresholds, block=opts.block,
                             precision=opts.precision, labels=opts.labels)
    return AtlasRun(atlas, time.perf_counter() - t0)
