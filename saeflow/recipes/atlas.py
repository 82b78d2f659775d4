"""An atlas run (``saeflow atlas``; the atlas itself is ``saeflow.atlas``): the model it needs
(for promoted-token labels, and for att_z SAEs whose decoders reach the residual basis through
W_O), the threshold rule (null, minimum cosine, a reference suite, a calibration from a
deactivation run), the computation into a folder or the cache (the layers' matching on Ray
with ``ray``, ``recipes.distribute``), and its timing."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple
from typing import TYPE_CHECKING

from saeflow.configs import (DEFAULT_BLOCK, DEFAULT_K, DEFAULT_MIN_COS, DEFAULT_NULL,
                             DEFAULT_NULL_SAMPLES, DEFAULT_QUANTILE, NULLS)

if TYPE_CHECKING:
    from saeflow.atlas import Atlas
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
    contexts: bool = True  # with labels: top activating contexts, for "fires on" labels
    explanations: str | None = None  # a folder of Neuronpedia explanation exports
    null: str = DEFAULT_NULL  # gaussian | rotation | reference (needs null_suite)
    min_cos: float = DEFAULT_MIN_COS  # the minimum effect size: no threshold below it
    null_suite: str | None = None  # a suite (name or path): same sites, another training seed
    calibrate: str | None = None  # a deactivation result (its folder or pairs.csv)
    calibrate_level: float = 0.5  # the top-1 success rate the calibrated threshold reaches
    ray: str | None = None  # the layers' matching on Ray: "local", "auto" or an address

    def __post_init__(self):
        if self.thresholds is not None:  # a bad override fails before anything loads
            from saeflow.lineage import parse_threshold_spec
            parse_threshold_spec(self.thresholds)
        if self.null not in NULLS:
            raise ValueError(f"--null: unknown null {self.null!r}; known: {', '.join(NULLS)}")
        if self.null == "reference" and not self.null_suite:
            raise ValueError("--null reference needs --null-suite: SAEs of the same residual "
                             "sites trained with another seed")
        if not -1.0 <= self.min_cos <= 1.0:
            raise ValueError(f"--min-cos is a cosine, between -1 and 1; got {self.min_cos}")
        if not 0.0 < self.calibrate_level <= 1.0:
            raise ValueError(f"--calibrate-level is a success rate in (0, 1], got "
                             f"{self.calibrate_level}")


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
                out: str | Path | None = None, loader=None) -> AtlasRun:
    """Compute (or resume) the atlas into ``out``, or into / from the cache without one. With
    ``opts.ray`` the layers' matching runs on Ray workers, which open the suite (and the model,
    for att_z SAEs) with ``loader`` (``distribute.SuiteLoader``; default: ship them); labels
    and the classification are computed here."""
    from saeflow.atlas import compute_atlas, ensure_atlas
    from saeflow.labels import DEFAULT_CONTEXTS
    from saeflow.lineage import parse_threshold_spec
    thresholds = parse_threshold_spec(opts.thresholds)
    contexts = DEFAULT_CONTEXTS if opts.labels and opts.contexts else None
    t0 = time.perf_counter()
    null_suite = calibration = None
    if opts.null_suite:
        from saeflow.catalog import load_suite
        null_suite = load_suite(opts.null_suite)
    if opts.calibrate:
        from saeflow.thresholds import calibrate
        calibration = calibrate(opts.calibrate, opts.calibrate_level)
    if opts.ray is not None:
        from saeflow.catalog import cached_atlas_dir
        from saeflow.recipes.distribute import Given, Pool, atlas_layers
        att_z = any(s.kind == "att_z" for s in suite.sites())
        pool = Pool(opts.ray, loader or Given(lm if att_z else None, suite))
        atlas_layers(pool, suite, out or cached_atlas_dir(suite), k=opts.k, block=opts.block,
                     precision=opts.precision, null_samples=opts.null_samples,
                     null_suite=null_suite, cache=not out)
    if out:
        atlas = compute_atlas(suite, out, lm, k=opts.k, block=opts.block,
                              precision=opts.precision, null_samples=opts.null_samples,
                              quantile=opts.quantile, thresholds=thresholds, labels=opts.labels,
                              null=opts.null, min_cos=opts.min_cos, null_suite=null_suite,
                              calibration=calibration, contexts=contexts,
                              explanations=opts.explanations)
    else:
        atlas = ensure_atlas(suite, lm, k=opts.k, null_samples=opts.null_samples,
                             quantile=opts.quantile, thresholds=thresholds, block=opts.block,
                             precision=opts.precision, labels=opts.labels, null=opts.null,
                             min_cos=opts.min_cos, null_suite=null_suite,
                             calibration=calibration, contexts=contexts,
                             explanations=opts.explanations)
    return AtlasRun(atlas, time.perf_counter() - t0)
