"""The one flow-graph layout: lanes, order inside a cell, crossings, colours, and that the
SVG export and the viewer's API draw at its positions."""

from __future__ import annotations

import random
import re

import pytest

from saeflow.flow import FlowEdge, FlowGraph, FlowNode
from saeflow.layout import KIND_COLORS, LANE_GAP, LANES, OFFSET, crossings, lane_of, layout, \
    node_color
from saeflow.lineage import COLORS
from saeflow.sites import Feature, Site


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
    svg = render(g, "svg")
    assert isinstance(svg, str)
    svg = svg.lower()
    for color in (COLORS["translated"], COLORS["newborn_mlp"], KIND_COLORS["mlp"],
                  KIND_COLORS["att"], KIND_COLORS["res"]):
        assert color.lower() in svg
    # lane tick labels, top to bottom in the drawing (larger y first in SVG space = lower)
    ticks = [m for m in re.findall(r"<!-- (att|res|mlp) -->", svg)]
    assert ticks[:3] == ["att", "res", "mlp"]


def test_planted_graph_exact_positions():
    data = layout(_graph()).to_json()
    assert data.pop("height") == pytest.approx(2 + 1 + 1 + 2 * LANE_GAP)
    assert data == {
        "positions": {"0/res/7": [0.65, 1.85], "0/res/3": [0.65, 2.85],
                      "1/res/1": [1.65, 1.85], "1/res/9": [1.65, 2.85],
                      "1/mlp/4": [1.2, 4.2], "1/att/5": [1.2, 0.5]},
        "layers": [0, 1], "width": 2.0,
        "lanes": [{"kind": "att", "top": 0.0, "rows": 1},
                  {"kind": "res", "top": 1 + LANE_GAP, "rows": 2},
                  {"kind": "mlp", "top": 3 + 2 * LANE_GAP, "rows": 1}]}


def test_equal_barycentres_break_by_index_and_lone_nodes_keep_their_row():
    """Layer 0: res 0, 1, 2. Layer 1: res 8 (the seed, so it starts on top), 3, 5, 7. Res 8 and
    res 5 are both fed by res 0 (same barycentre: index order puts 5 above 8, against the start),
    res 3 by res 2 (crossing 0 -> 5 at the start), res 7 by nothing: its key is its own current
    row, the lowest."""
    f = Feature.parse
    names = ["0/res/0", "0/res/1", "0/res/2", "1/res/8", "1/res/5", "1/res/3", "1/res/7"]
    nodes = [FlowNode(f(n), None, "", 1.0) for n in names]
    edges = [FlowEdge(f("0/res/0"), f("1/res/8"), 0.5), FlowEdge(f("0/res/0"), f("1/res/5"), 0.5),
             FlowEdge(f("0/res/2"), f("1/res/3"), 0.5)]
    g = FlowGraph(f("1/res/8"), nodes, edges)
    start, lay = layout(g, sweeps=0), layout(g)

    def column(lay, layer):
        return [n for n in sorted(names, key=lambda n: lay.positions[f(n)][1])
                if f(n).layer == layer]
    assert column(start, 1) == ["1/res/8", "1/res/3", "1/res/5", "1/res/7"]
    # rows (lane top 0): layer 0 at 1, 2, 3; keys: 5 and 8 -> 1 (then by index), 3 -> 3, 7 -> 3.5
    assert column(lay, 0) == ["0/res/0", "0/res/1", "0/res/2"]
    assert column(lay, 1) == ["1/res/5", "1/res/8", "1/res/3", "1/res/7"]
    assert crossings(g, lay.positions) == 0 and crossings(g, start.positions) == 1


def _random_graph(rng: random.Random, n: int, n_layers: int) -> FlowGraph:
    feats: set[Feature] = set()
    while len(feats) < n:
        kind = rng.choice(("res", "mlp", "att", "att_z"))
        feats.add(Feature(Site(rng.randrange(n_layers), kind), rng.randrange(3 * n)))
    order = sorted(feats)
    rng.shuffle(order)
    edges = []
    for _ in range(rng.randrange(2 * n + 1)):
        a, b = rng.choice(order), rng.choice(order)
        if a.layer > b.layer and rng.random() < 0.8:
            a, b = b, a
        edges.append(FlowEdge(a, b, 0.5))
    return FlowGraph(rng.choice(order), [FlowNode(x, None, "", 1.0) for x in order], edges)


@pytest.mark.parametrize("seed", range(12))
def test_random_graphs_hold_the_layout_rules(seed):
    rng = random.Random(seed)
    g = _random_graph(rng, rng.choice([3, 7, 20, 60, 150]), rng.choice([1, 2, 5, 9]))
    lay = layout(g)
    p = lay.positions
    assert set(p) == set(g.features) and len(p) == len(g.nodes)
    assert lay.layers == sorted({x.layer for x in g.features}) and lay.width == len(lay.layers)
    tops = {k: (top, rows) for k, top, rows in lay.lanes}
    assert [k for k, _, _ in lay.lanes] == [k for k in LANES if k in {lane_of(x) for x in p}]
    cells: dict[tuple[int, str], list[float]] = {}
    for x, (cx, cy) in p.items():
        k = lane_of(x)
        assert cx == pytest.approx(lay.layers.index(x.layer) + OFFSET[k])
        top, rows = tops[k]
        assert top < cy < top + rows and cy < lay.height
        cells.setdefault((x.layer, k), []).append(cy)
    for (_, k), ys in cells.items():  # one row per node, centred in its lane
        ys.sort()
        assert all(b - a == pytest.approx(1.0) for a, b in zip(ys, ys[1:]))
        top, rows = tops[k]
        assert ys[0] - top == pytest.approx(top + rows - ys[-1])
    # the sweeps keep the best ordering seen, the start included
    assert crossings(g, p) <= crossings(g, layout(g, sweeps=0).positions)
    assert layout(g).to_json() == lay.to_json()


def test_equal_features_that_are_other_objects_lay_out_the_same():
    rng = random.Random(99)
    g = _random_graph(rng, 80, 4)
    copy = FlowGraph(g.seed, g.nodes, [FlowEdge(Feature.parse(str(e.source)),
                                                Feature.parse(str(e.target)), e.cos)
                                       for e in g.edges])
    assert layout(copy).to_json() == layout(g).to_json()


def test_bad_graphs_are_named():
    g = _graph()
    stray = FlowGraph(g.seed, g.nodes, g.edges + [FlowEdge(g.seed, Feature.parse("5/res/1"), 1.0)])
    with pytest.raises(ValueError, match="5/res/1.*not a node"):
        layout(stray)
    with pytest.raises(ValueError, match="0/res/3 appears more than once"):
        layout(FlowGraph(g.seed, g.nodes + g.nodes[:1], g.edges))
