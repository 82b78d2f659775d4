"""The one flow-graph layout: lanes, order inside a cell, crossings, colours, and that the
SVG export and the viewer's API draw at its positions."""

from __future__ import annotations

import re

from saeflow.flow import FlowEdge, FlowGraph, FlowNode
from saeflow.layout import KIND_COLORS, LANES, crossings, layout, node_color
from saeflow.lineage import COLORS
from saeflow.sites import Feature


def _graph() -> FlowGraph:
    """Layer 0: res 7 and res 3; layer 1: res 1, res 9, mlp 4, att 5. Edges planted so that
    index order crosses (0/res/3 feeds the lower layer-1 node): the sweeps must untangle it."""
    f = Feature.parse
    nodes = [FlowNode(f("0/res/3"), "translated", "a", 1.0),
             FlowNode(f("0/res/7"), "newborn_mlp", "b", 0.6),
             FlowNode(f("1/res/1"), "translated", "c", 0.7),
             FlowNode(f("1/res/9"), None, "d", 0.8),
             FlowNode(f("1/mlp/4"), None, "e", 0.4),
             FlowNode(f("1/att/5"), None, "", 0.3)]
    edges = [FlowEdge(f("0/res/3"), f("1/res/9"), 0.8), FlowEdge(f("0/res/7"), f("1/res/1"), 0.7),
             FlowEdge(f("1/mlp/4"), f("1/res/9"), 0.4), FlowEdge(f("1/att/5"), f("1/res/1"), 0.3)]
    return FlowGraph(f("0/res/3"), nodes, edges)


def test_lanes_columns_and_offsets():
    g = _graph()
    lay = layout(g)
    assert [k for k, _, _ in lay.lanes] == ["att", "res", "mlp"] == list(LANES)
    assert lay.layers == [0, 1] and lay.width == 2.0
    (att_top, att_rows), (res_top, res_rows), (mlp_top, _) = [(t, r) for _, t, r in lay.lanes]
    assert att_rows == 1 and res_rows == 2 and att_top < res_top < mlp_top
    p = lay.positions
    for n in g.nodes:
        x, y = p[n.feature]
        assert int(x) == n.feature.layer  # its layer's column
    assert p[Feature.parse("1/mlp/4")][0] < p[Feature.parse("1/res/1")][0]  # blocks left of res
    assert p[Feature.parse("1/att/5")][1] < p[Feature.parse("1/res/1")][1] < \
        p[Feature.parse("1/mlp/4")][1]


def test_barycentre_sweeps_remove_the_planted_crossing():
    g = _graph()
    lay = layout(g)
    assert crossings(g, lay.positions) == 0
    p = lay.positions
    # index order (the start) crosses the two res edges; now their ends are in the same order
    def y(f):
        return p[Feature.parse(f)][1]
    assert (y("0/res/3") - y("0/res/7")) * (y("1/res/9") - y("1/res/1")) > 0
    no_sweeps = layout(g, sweeps=0)
    assert crossings(g, no_sweeps.positions) == 1


def test_colours_by_lineage_and_kind():
    f = Feature.parse
    assert node_color(f("3/res/1"), "newborn_att") == COLORS["newborn_att"]
    assert node_color(f("3/res/1"), None) == KIND_COLORS["res"]
    assert node_color(f("3/mlp/1"), None) == KIND_COLORS["mlp"]
    assert node_color(f("3/att_z/1"), None) == KIND_COLORS["att"]


def test_svg_export_draws_the_layout():
    from saeflow.export import render
    g = _graph()
    svg = render(g, "svg").lower()
    for color in (COLORS["translated"], COLORS["newborn_mlp"], KIND_COLORS["mlp"],
                  KIND_COLORS["att"], KIND_COLORS["res"]):
        assert color.lower() in svg
    # lane tick labels, top to bottom in the drawing (larger y first in SVG space = lower)
    ticks = [m for m in re.findall(r"<!-- (att|res|mlp) -->", svg)]
    assert ticks[:3] == ["att", "res", "mlp"]
