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


def _crossing_pairs(x: list[float], src: list[int], tgt: list[int]) -> tuple[np.ndarray, ...]:
    """For every pair of edges between the same two columns, the ids of both ends of both (four
    arrays over the pairs), so a crossing count is one numpy comparison."""
    groups: dict[tuple[float, float], list[int]] = {}
    for e, (s, t) in enumerate(zip(src, tgt)):
        groups.setdefault((x[s], x[t]), []).append(e)
    first, second = [], []
    for es in groups.values():
        if len(es) > 1:
            i, j = np.triu_indices(len(es), 1)
            g = np.asarray(es, dtype=np.intp)
            first.append(g[i])
            second.append(g[j])
    if not first:
        return tuple(np.zeros(0, dtype=np.intp) for _ in range(4))
    a, b = np.concatenate(first), np.concatenate(second)
    s_ids, t_ids = np.asarray(src, dtype=np.intp), np.asarray(tgt, dtype=np.intp)
    return s_ids[a], t_ids[a], s_ids[b], t_ids[b]


def layout(graph: FlowGraph, sweeps: int = SWEEPS) -> Layout:
    """Positions of every node of ``graph`` (module docstring). Nodes are numbered once; the
    sweeps and crossing counts run on those ids (``crossings`` counts the same pairs)."""
    layers = graph.layers
    col = {layer: i for i, layer in enumerate(layers)}
    feats = graph.features
    ids = {f: i for i, f in enumerate(feats)}
    if len(ids) != len(feats):
        dup = next(f for i, f in enumerate(feats) if ids[f] != i)
        raise ValueError(f"layout: node {dup} appears more than once in the graph")
    index = [f.index for f in feats]
    cells: dict[tuple[int, str], list[int]] = {}
    for i, f in enumerate(feats):
        cells.setdefault((f.layer, lane_of(f)), []).append(i)
    lanes = [k for k in LANES if any(key[1] == k for key in cells)]
    rows = {k: max(len(v) for key, v in cells.items() if key[1] == k) for k in lanes}
    top, y = {}, 0.0
    for k in lanes:
        top[k] = y
        y += rows[k] + LANE_GAP
    height = max(y - LANE_GAP, 1.0)
    same = {id(f): i for i, f in enumerate(feats)}  # traced edges hold the nodes' own objects

    def node_id(f: Feature) -> int:
        i = same.get(id(f))
        if i is None:  # an equal Feature, not the same object: hash it
            i = ids.get(f)
            if i is None:
                raise ValueError(f"layout: an edge ends at {f}, which is not a node")
        return i
    src = [node_id(e.source) for e in graph.edges]
    tgt = [node_id(e.target) for e in graph.edges]
    preds: dict[int, list[int]] = {}  # only nodes that have some
    succs: dict[int, list[int]] = {}
    for s, t in zip(src, tgt):
        preds.setdefault(t, []).append(s)
        succs.setdefault(s, []).append(t)
    xs = {key: col[key[0]] + OFFSET[key[1]] for key in cells}
    x = [0.0] * len(feats)
    for key, members in cells.items():
        for i in members:
            x[i] = xs[key]
    pos_y = [0.0] * len(feats)
    s0, t0, s1, t1 = _crossing_pairs(x, src, tgt)

    def place_cell(key: tuple[int, str]) -> None:
        members = cells[key]
        base = top[key[1]] + (rows[key[1]] - len(members)) / 2
        for j, i in enumerate(members):
            pos_y[i] = base + j + 0.5

    def count() -> int:
        yy = np.asarray(pos_y)
        return int(np.count_nonzero((yy[s0] - yy[s1]) * (yy[t0] - yy[t1]) < 0))

    seed = ids.get(graph.seed, -1)
    for key in cells:  # start: the seed first, then by index
        cells[key].sort(key=lambda i: (i != seed, index[i]))
        place_cell(key)
    best = (count(), {k: list(v) for k, v in cells.items()})
    order = sorted(cells, key=lambda key: (key[0], LANES.index(key[1])))
    for sweep in range(2 * sweeps):
        forward = sweep % 2 == 0
        nbrs = preds if forward else succs
        for key in (order if forward else order[::-1]):
            members = cells[key]
            keys = {i: ((sum([pos_y[g] for g in nbrs[i]]) / len(nbrs[i]) if i in nbrs
                         else pos_y[i]), index[i]) for i in members}
            members.sort(key=keys.__getitem__)
            place_cell(key)  # only this cell moved
        n = count()
        if n < best[0]:  # keep the best ordering seen (a sweep can also make things worse)
            best = (n, {k: list(v) for k, v in cells.items()})
    cells = best[1]
    pos: dict[Feature, tuple[float, float]] = {}
    for key in cells:
        place_cell(key)
        for i in cells[key]:
            pos[feats[i]] = (x[i], pos_y[i])
    return Layout(pos, layers, [(k, top[k], rows[k]) for k in lanes], float(len(layers)),
                  height)
