"""One layered layout for flow graphs, used by every drawing (the SVG/PNG export and the
viewer, which gets the positions from the API), so a graph looks the same everywhere.

Layers run left to right, one column each; inside a column the site kinds are lanes, top to
bottom ``LANES`` = att, res, mlp, so the residual chain runs through the middle and the blocks
that write into it sit above (attention) and below (MLP). Block nodes sit left of their layer's
residual nodes (``OFFSET``), so block -> res edges of one layer do not run through each other.
Inside a cell (layer, lane) nodes are ordered to cut edge crossings: a few barycentre sweeps
(Sugiyama et al. 1981), left to right by the mean slot of each node's predecessors, then right
to left by its successors, ties broken by feature index. Coordinates are in abstract units (x in
columns, y in rows from the top); the drawings scale them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from saeflow.flow import FlowGraph
from saeflow.lineage import COLORS
from saeflow.sites import Feature

LANES = ("att", "res", "mlp")  # top to bottom (att_z draws in the att lane)
OFFSET = {"att": 0.2, "mlp": 0.2, "res": 0.65}  # x inside a layer's column
KIND_COLORS = {"res": "#4c78a8", "mlp": "#f58518", "att": "#e45756"}  # res: no lineage known
LANE_GAP = 0.35  # rows between lanes
SWEEPS = 4


def lane_of(feature: Feature) -> str:
    return "att" if feature.kind == "att_z" else feature.kind


def node_color(feature: Feature, lineage: str | None) -> str:
    """Residual nodes by lineage class (``lineage.COLORS``), block nodes by kind."""
    if feature.kind == "res":
        return COLORS.get(lineage or "", KIND_COLORS["res"])
    return KIND_COLORS[lane_of(feature)]


@dataclass(frozen=True)
class Layout:
    positions: dict[Feature, tuple[float, float]]  # node -> (x, y): x in columns, y in rows
    layers: list[int]  # the columns, left to right
    lanes: list[tuple[str, float, int]]  # (kind, top y, rows) of each lane present
    width: float  # columns
    height: float  # rows

    def to_json(self) -> dict:
        return {"positions": {str(f): [round(x, 4), round(y, 4)]
                              for f, (x, y) in self.positions.items()},
                "layers": self.layers, "width": self.width, "height": self.height,
                "lanes": [{"kind": k, "top": top, "rows": rows} for k, top, rows in self.lanes]}


def crossings(graph: FlowGraph, positions: dict[Feature, tuple[float, float]]) -> int:
    """Pairs of edges between the same two columns whose ends are in opposite order."""
    spans: dict[tuple[float, float], list[tuple[float, float]]] = {}
    for e in graph.edges:
        (x0, y0), (x1, y1) = positions[e.source], positions[e.target]
        spans.setdefault((x0, x1), []).append((y0, y1))
    n = 0
    for ends in spans.values():
        if len(ends) > 12:  # every pair at once (each crossing is counted twice)
            y = np.asarray(ends)
            d0, d1 = y[:, None, 0] - y[None, :, 0], y[:, None, 1] - y[None, :, 1]
            n += int(np.count_nonzero(d0 * d1 < 0)) // 2
            continue
        for i, (a0, a1) in enumerate(ends):
            n += sum((a0 - b0) * (a1 - b1) < 0 for b0, b1 in ends[i + 1:])
    return n


def layout(graph: FlowGraph, sweeps: int = SWEEPS) -> Layout:
    """Positions of every node of ``graph`` (module docstring)."""
    layers = graph.layers
    col = {layer: i for i, layer in enumerate(layers)}
    cells: dict[tuple[int, str], list[Feature]] = {}
    for n in graph.nodes:
        cells.setdefault((n.feature.layer, lane_of(n.feature)), []).append(n.feature)
    lanes = [k for k in LANES if any(key[1] == k for key in cells)]
    rows = {k: max(len(v) for key, v in cells.items() if key[1] == k) for k in lanes}
    top, y = {}, 0.0
    for k in lanes:
        top[k] = y
        y += rows[k] + LANE_GAP
    height = max(y - LANE_GAP, 1.0)
    preds: dict[Feature, list[Feature]] = {f: [] for f in graph.features}
    succs: dict[Feature, list[Feature]] = {f: [] for f in graph.features}
    for e in graph.edges:
        preds[e.target].append(e.source)
        succs[e.source].append(e.target)

    def place_cell(pos: dict, key: tuple[int, str]) -> dict[Feature, tuple[float, float]]:
        (layer, k), fs = key, cells[key]
        off = (rows[k] - len(fs)) / 2
        for i, f in enumerate(fs):
            pos[f] = (col[layer] + OFFSET[k], top[k] + off + i + 0.5)
        return pos

    def place() -> dict[Feature, tuple[float, float]]:
        pos: dict[Feature, tuple[float, float]] = {}
        for key in cells:
            place_cell(pos, key)
        return pos

    for key in cells:  # start: the seed first, then by index
        cells[key].sort(key=lambda f: (f != graph.seed, f.index))
    pos = place()
    best = (crossings(graph, pos), {k: list(v) for k, v in cells.items()})
    order = sorted(cells, key=lambda key: (key[0], LANES.index(key[1])))
    for sweep in range(2 * sweeps):
        forward = sweep % 2 == 0
        for key in (order if forward else order[::-1]):
            nbrs = preds if forward else succs

            def bary(f: Feature) -> tuple[float, int]:
                ys = [pos[g][1] for g in nbrs[f]]
                return (sum(ys) / len(ys) if ys else pos[f][1]), f.index
            cells[key].sort(key=bary)
            place_cell(pos, key)  # only this cell moved
        n = crossings(graph, pos)
        if n < best[0]:  # keep the best ordering seen (a sweep can also make things worse)
            best = (n, {k: list(v) for k, v in cells.items()})
    cells = best[1]
    pos = place()
    return Layout(pos, layers, [(k, top[k], rows[k]) for k in lanes], float(len(layers)),
                  height)
