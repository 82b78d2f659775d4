"""Which sites a residual feature's lineage comes from (Feature Flow, sec. 3): one rule for the
atlas, which matches ``L/res`` against them, and the deactivation check, which switches their
features off.

The sources of ``L/res`` are, where the suite has SAEs there: ``res`` = ``(L-1)/res`` (none at
layer 0), ``mlp`` = ``L/mlp`` and ``att`` = ``L/att``, else ``L/att_z`` (an attention-output SAE
before W_O stands in for one after it)."""

from __future__ import annotations

from collections.abc import Container, Iterable

from saeflow.sites import Site


def source_sites(have: Container[Site], layer: int) -> dict[str, Site]:
    """The source sites of ``layer/res`` by kind, among ``have`` (a set of sites or a suite)."""
    candidates = [("res", Site(layer - 1, "res"))] if layer > 0 else []
    candidates += [("mlp", Site(layer, "mlp")), ("att", Site(layer, "att")),
                   ("att", Site(layer, "att_z"))]
    out: dict[str, Site] = {}
    for kind, site in candidates:
        if kind not in out and site in have:
            out[kind] = site
    return out


def layer_sources(sites: Iterable[Site]) -> dict[int, dict[str, Site]]:
    """For each layer with a residual SAE, the sites its features are matched against."""
    have = set(sites)
    return {s.layer: source_sites(have, s.layer)
            for s in sorted(x for x in have if x.kind == "res")}
