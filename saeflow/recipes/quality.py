"""SAE quality of a suite (``saeflow quality``; the metrics are ``saeflow.quality``): which
sites, and storing the table in the suite folder (``suite.json``, ``quality.csv``,
``quality.png``), merged with the stored rows when only some sites were evaluated."""

from __future__ import annotations

from pathlib import Path

from saeflow.sites import Site, parse_sites


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
