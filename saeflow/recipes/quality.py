"""SAE quality of a suite (``saeflow quality``; the metrics are ``saeflow.quality``): which
sites, and storing the table in the suite folder (``suite.json``, ``quality.csv``,
``quality.png``), merged with the stored rows when only some sites were evaluated."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

from saeflow.sites import Site, parse_sites


@dataclass(frozen=True)
class QualityOptions:
    """The held-out evaluation of ``saeflow quality`` (``quality.evaluate``'s settings)."""
    tokens: int = 8192  # held-out tokens for FVU, L0 and dead fraction
    loss_tokens: int = 2048  # held-out tokens for loss recovered
    source: str = "default"  # held-out text source
    res_ablation: str = "mean"  # baseline of res sites in loss recovered: mean or zero
    workers: int = 2  # worker threads


class QualityRun(NamedTuple):
    rows: list  # quality.QualityRow
    convergence: dict | None  # the weight diagnostics (all sites only)
    saved: Path | None  # the suite.json written, if any


def quality_sites(suite, spec: str | None, n_layers: int) -> list[Site]:
    """All the suite's sites, or those ``spec`` names (each must be in the suite)."""
    sites = suite.sites()
    if not spec:
        return sites
    wanted = set(parse_sites(spec, n_layers))
    missing = wanted - set(sites)
    if missing:
        raise ValueError(f"suite {suite.name!r} has no SAE at "
                         f"{', '.join(map(str, sorted(missing)))}")
    return sorted(wanted)


def store_quality(suite, rows, settings: dict, title: str, merge: bool) -> Path | None:
    """Write the table into the suite's folder (when it has a ``suite.json``); ``merge``
    keeps the stored rows of the sites not evaluated. Returns the ``suite.json`` written, if any."""
    from saeflow import quality
    from saeflow.io import write_json_atomic
    from saeflow.suite import SUITE_JSON
    if suite.root is None or not (suite.root / SUITE_JSON).exists():
        return None
    if merge:
        old = {r.site: r for r in quality.rows_from_json(suite.info.get("quality") or [])}
        old.update({r.site: r for r in rows})
        rows = list(old.values())
    info = {**suite.info, "quality": quality.rows_to_json(rows),
            "quality_summary": quality.summarize(rows), "quality_settings": settings}
    write_json_atomic(suite.root / SUITE_JSON, info)
    quality.write_reports(rows, suite.root, title=title)
    return suite.root / SUITE_JSON


def run_quality(suite, lm, opts: QualityOptions, sites: str | None = None, save: bool = True,
                dtype: str = "float32", progress: bool = True) -> QualityRun:
    """Evaluate the suite's SAEs (or ``sites``) and, with ``save``, store the table in its
    folder (merged with the stored rows when only some sites were evaluated)."""
    from saeflow import convergence, quality
    chosen = quality_sites(suite, sites, lm.n_layers)
    rows = quality.evaluate(lm, {s: suite[s] for s in chosen}, source=opts.source,
                            tokens=opts.tokens, loss_tokens=opts.loss_tokens,
                            res_ablation=opts.res_ablation, workers=opts.workers,
                            progress=progress)
    report = None if sites else convergence.for_suite(suite)
    settings = {k: v for k, v in asdict(opts).items() if k != "workers"}
    saved = store_quality(suite, rows, {**settings, "model_dtype": dtype},
                          f"{suite.name} ({lm.name})", merge=bool(sites)) if save else None
    return QualityRun(rows, report, saved)


def stored_quality(suite) -> QualityRun:
    """The table and diagnostics stored in the suite's ``suite.json`` (an error when none is)."""
    from saeflow import quality
    rows = quality.rows_from_json(suite.info.get("quality") or [])
    if not rows:
        raise ValueError(f"suite {suite.name!r} has no stored quality table; run without "
                         "--cached to compute it")
    return QualityRun(rows, suite.info.get("convergence"), None)
