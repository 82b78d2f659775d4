"""Flow graphs: one feature's ancestors and descendants over all layers.

Implements "Analyze Feature Flow" sec. 3.3 (and the pruning of sec. 5): starting from a seed
feature, walk the atlas layer by layer, composing one-layer matches.
  1. Backward: from a residual feature of layer L, its top-1 predecessor in R_{L-1}; the chain
     stops where that cosine falls below ``res_threshold`` (0.5).
  2. Forward: from a residual feature of layer L, its top-1 successor in R_{L+1} and, where the
     paper is silent about many-to-one matches, also every feature of R_{L+1} whose own top-1
     predecessor is this feature (``children``: where a concept splits); the same cut applies.
  3. Every residual node gets its MLP and attention predecessors of its own layer when their
     cosine reaches ``block_threshold`` (0.15): the blocks that wrote or changed it.
  An mlp/att seed first goes to its best match in the residual stream of its layer (if that
  reaches ``block_threshold``) and is traced forward from there.
One threshold vocabulary with lineage (``saeflow.thresholds.flow_cuts``): at each layer a
residual link is also kept when its cosine is high by the atlas's lineage threshold, so a
feature called translated or processed never has its own residual chain cut; an mlp/att node
must also be high (above its layer's null and the minimum effect size), so chance matches stay
out. ``below_null=True`` uses the two numbers alone, and warns at the graph's layers where that
admits links below the null.
Edges point from the earlier site to the later one and carry the cosine; each node carries its
lineage class (None for mlp/att nodes: classes are defined for residual features), its label,
and as score the cosine of the edge that brought it into the graph (1.0 for the seed).
The walk reads the atlas through a ``FlowIndex``: the top-1 links copied into RAM per layer and
the children indexed once (``Atlas.children`` scans a whole layer per call); its answers are
those of ``Atlas.predecessors``/``successors``/``children``, so the graphs are the same.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from saeflow.sites import Feature, Site

SCHEMA = "saeflow.flowgraph/1"
# The paper's pruning thresholds (sec. 5), the defaults everywhere (CLI, viewer, API).
RES_THRESHOLD = 0.5
BLOCK_THRESHOLD = 0.15


@dataclass(frozen=True)
class FlowNode:
    feature: Feature
    lineage: str | None
    label: str
    score: float


@dataclass(frozen=True)
class FlowEdge:
    source: Feature
    target: Feature
    cos: float


@dataclass
class FlowGraph:
    seed: Feature
    nodes: list[FlowNode]
    edges: list[FlowEdge]
    settings: dict = field(default_factory=dict)

    def node(self, feature) -> FlowNode:
        f = Feature.parse(feature)
        for n in self.nodes:
            if n.feature == f:
                return n
        raise KeyError(f"feature {f} is not in the flow graph of {self.seed}")

    @property
    def features(self) -> list[Feature]:
        return [n.feature for n in self.nodes]

    @property
    def layers(self) -> list[int]:
        return sorted({n.feature.layer for n in self.nodes})

    def residual_chain(self) -> list[Feature]:
        """The residual nodes, ordered by layer (then index)."""
        return sorted((n.feature for n in self.nodes if n.feature.kind == "res"),
                      key=lambda f: (f.layer, f.index))

    def to_json(self) -> dict:
        return {"schema": SCHEMA, "seed": str(self.seed),
                "nodes": [{"id": str(n.feature), "layer": n.feature.layer,
                           "site": str(n.feature.site), "index": n.feature.index,
                           "lineage": n.lineage, "label": n.label, "score": n.score}
                          for n in self.nodes],
                "edges": [{"source": str(e.source), "target": str(e.target), "cos": e.cos}
                          for e in self.edges],
                "settings": dict(self.settings)}

    @classmethod
    def from_json(cls, data: dict) -> FlowGraph:
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            got = data.get("schema") if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"not a flow graph: schema {got!r}, expected {SCHEMA!r}")
        try:
            nodes = [FlowNode(Feature.parse(n["id"]), n.get("lineage"), n.get("label", ""),
                              float(n.get("score", 0.0))) for n in data["nodes"]]
            edges = [FlowEdge(Feature.parse(e["source"]), Feature.parse(e["target"]),
                              float(e["cos"])) for e in data["edges"]]
            seed = Feature.parse(data["seed"])
        except KeyError as e:
            raise ValueError(f"flow graph JSON is missing the field {e.args[0]!r}") from None
        known = {n.feature for n in nodes}
        for e in edges:
            if e.source not in known or e.target not in known:
                raise ValueError(f"flow graph JSON: edge {e.source} -> {e.target} names a "
                                 "feature that is not a node")
        if seed not in known:
            raise ValueError(f"flow graph JSON: the seed {seed} is not a node")
        return cls(seed, nodes, edges, dict(data.get("settings", {})))

    def to_networkx(self):
        """A networkx DiGraph: node ids are feature strings; attributes as in ``to_json``."""
        import networkx as nx
        g = nx.DiGraph(seed=str(self.seed))
        for n in self.to_json()["nodes"]:
            g.add_node(n["id"], **{k: v for k, v in n.items() if k != "id"})
        for e in self.edges:
            g.add_edge(str(e.source), str(e.target), cos=e.cos)
        return g


class FlowIndex:
    """The links ``trace`` follows, in RAM: per layer, column 0 (the top-1 match) of the
    atlas's ``pred_*`` and ``succ_*`` columns, and the children of each residual feature as a
    CSR index (the features of R_{L+1} grouped by their top-1 R_L predecessor, in index
    order). A node is a (site number, index) pair; Feature objects are made once per graph
    node. Layers are read on first use (threads that race read the same arrays). A one-off
    ``trace`` builds its own; a viewer keeps one for all its traces (the atlas does not
    change). ``label`` gives a Feature's label (default ``atlas.label``)."""

    def __init__(self, atlas, label: Callable[[Feature], str] | None = None):
        self.atlas = atlas
        self.label = atlas.label if label is None else label
        self.sites: list[Site] = list(atlas.sites)
        self.number = {s: i for i, s in enumerate(self.sites)}
        self.ids = [str(s) for s in self.sites]
        self._order = [(s.layer, _LANE[s.kind]) for s in self.sites]  # drawing order of sites
        self._layers: dict[int, dict] = {}

    def _layer(self, layer: int) -> dict:
        got = self._layers.get(layer)
        if got is None:
            got = self._layers[layer] = self._read(layer)
        return got

    def _read(self, layer: int) -> dict:
        import numpy as np

        atlas = self.atlas
        out: dict = {"pred": {}, "succ": {}, "children": None,
                     "res": self.number.get(Site(layer, "res"))}
        for kind, site in atlas.sources(layer).items():
            for way in ("pred", "succ"):
                idx, cos = (atlas.column(layer, f"{way}_{kind}_{c}") for c in ("idx", "cos"))
                out[way][kind] = (self.number[site], np.array(idx[:, 0]), np.array(cos[:, 0]))
        if "res" in out["pred"]:  # children: R_L's features by their top-1 predecessor
            src, parent, cos = out["pred"]["res"]
            width = atlas.widths[self.sites[src]]
            ok = np.flatnonzero((parent >= 0) & (parent < width))
            order = ok[np.argsort(parent[ok], kind="stable")]
            off = np.zeros(width + 1, np.int64)
            np.cumsum(np.bincount(parent[ok], minlength=width), out=off[1:])
            out["children"] = (order, off, cos)
        codes = atlas.lineage_codes(layer) if out["res"] is not None else None
        out["lineage"] = (None if codes is None else
                          (np.asarray(codes), tuple(atlas.class_names(layer))))
        return out

    def predecessor(self, node: tuple[int, int], kind: str):
        """(node, cos) of a residual node's top-1 match in its ``kind`` source, or None."""
        sid, i = node
        got = self._layer(self.sites[sid].layer)["pred"].get(kind)
        return None if got is None else ((got[0], got[1].item(i)), got[2].item(i))

    def successor(self, node: tuple[int, int]):
        """(node, cos) of the top-1 match in the next residual SAE (``Atlas.successors``)."""
        sid, i = node
        site = self.sites[sid]
        lay = self._layer(site.layer + 1 if site.kind == "res" else site.layer)
        got = lay["succ"].get("att" if site.kind == "att_z" else site.kind)
        if got is None or got[0] != sid:
            return None
        return (lay["res"], got[1].item(i)), got[2].item(i)

    def children(self, node: tuple[int, int]) -> list:
        """(node, cos) of the features of R_{L+1} whose top-1 predecessor is this one."""
        sid, i = node
        site = self.sites[sid]
        if site.kind != "res":
            return []
        lay = self._layer(site.layer + 1)
        if lay["children"] is None or lay["pred"]["res"][0] != sid:
            return []
        order, off, cos = lay["children"]
        js = order[off[i]:off[i + 1]]
        return [((lay["res"], j), c) for j, c in zip(js.tolist(), cos[js].tolist())]

    def lineage(self, node: tuple[int, int]) -> str | None:
        sid, i = node
        got = self._layer(self.sites[sid].layer)["lineage"]
        return None if self.sites[sid].kind != "res" or got is None else got[1][got[0].item(i)]

    def graph(self, seed: Feature, nodes: dict, edges: dict, settings: dict) -> FlowGraph:
        """The FlowGraph of ``nodes`` ({node: score}) and ``edges`` ({(src, dst): cos})."""
        feats = {n: self.sites[n[0]].feature(n[1]) for n in nodes}
        site_order = self._order
        order = sorted(nodes, key=lambda n: (*site_order[n[0]], n[1]))
        ids = {n: f"{self.ids[n[0]]}/{n[1]}" for n in nodes}
        links = sorted(edges, key=lambda e: (site_order[e[1][0]][0], ids[e[0]], ids[e[1]]))
        return FlowGraph(seed, [FlowNode(feats[n], self.lineage(n), self.label(feats[n]),
                                         float(nodes[n])) for n in order],
                         [FlowEdge(feats[s], feats[d], float(edges[s, d])) for s, d in links],
                         settings)


def trace(atlas, feature, res_threshold: float = RES_THRESHOLD,
          block_threshold: float = BLOCK_THRESHOLD, *,
          backward: bool = True, forward: bool = True, children: bool = True,
          max_nodes: int = 1000, below_null: bool = False,
          index: FlowIndex | None = None) -> FlowGraph:
    """The pruned flow graph of ``feature`` (module docstring); ``index`` is a ``FlowIndex``
    of ``atlas`` kept between traces (default: a new one)."""
    import warnings

    seed = atlas.feature(feature)
    for name, v in (("res_threshold", res_threshold), ("block_threshold", block_threshold)):
        if not -1.0 <= float(v) <= 1.0:
            raise ValueError(f"{name} is a cosine, between -1 and 1; got {v}")
    ix = FlowIndex(atlas) if index is None else index
    if ix.atlas is not atlas:
        raise ValueError("trace: index is a FlowIndex of another atlas")
    cuts = (atlas.flow_cuts(res_threshold, block_threshold, below_null, warn=False)[0]
            if hasattr(atlas, "flow_cuts") else {})

    def cut(layer: int, kind: str) -> float:
        default = res_threshold if kind == "res" else block_threshold
        return cuts.get(layer, {}).get("att" if kind == "att_z" else kind, default)
    nodes: dict[tuple[int, int], float] = {}  # (site number, index) -> score, in order added
    edges: dict[tuple[tuple[int, int], tuple[int, int]], float] = {}
    truncated = False

    def add_node(n: tuple[int, int], score: float) -> bool:
        nonlocal truncated
        if n in nodes:
            return False
        if len(nodes) >= max_nodes:
            truncated = True
            return False
        nodes[n] = score
        return True

    def add_edge(src: tuple[int, int], dst: tuple[int, int], cos: float) -> None:
        if src in nodes and dst in nodes:
            edges.setdefault((src, dst), cos)

    def add_blocks(r: tuple[int, int]) -> None:
        layer = ix.sites[r[0]].layer
        for kind in ("mlp", "att"):
            p = ix.predecessor(r, kind)
            if p is not None and p[1] >= cut(layer, kind):
                add_node(*p)
                add_edge(p[0], r, p[1])

    def done() -> FlowGraph:
        layers = sorted({ix.sites[n[0]].layer for n in nodes})
        settings = {"res_threshold": res_threshold, "block_threshold": block_threshold,
                    "below_null": below_null, "children": children, "truncated": truncated,
                    "atlas": str(atlas.root), "model": atlas.model,
                    "cuts": {str(L): cuts[L] for L in layers if L in cuts},
                    "threshold_rule": getattr(atlas, "info", {}).get("threshold_rule")}
        if cuts:
            notes = atlas.flow_cuts(res_threshold, block_threshold, below_null, layers,
                                    warn=False)[1]
            if notes:
                warnings.warn(f"flow graph of {seed}: {'; '.join(notes)}", UserWarning,
                              stacklevel=3)
            settings["warnings"] = notes
        return ix.graph(seed, nodes, edges, settings)

    start = (ix.number[seed.site], seed.index)
    add_node(start, 1.0)
    if seed.kind != "res":
        succ = ix.successor(start)
        if succ is None or succ[1] < cut(seed.layer, seed.kind):
            return done()
        add_node(*succ)
        add_edge(start, succ[0], succ[1])
        start, backward = succ[0], False
    add_blocks(start)
    if backward:
        cur = start
        while True:
            p = ix.predecessor(cur, "res")
            if p is None or p[1] < cut(ix.sites[cur[0]].layer, "res") or not add_node(*p):
                break
            add_edge(p[0], cur, p[1])
            add_blocks(p[0])
            cur = p[0]
    if forward:
        frontier = [start]
        while frontier:
            f = frontier.pop()
            t = cut(ix.sites[f[0]].layer + 1, "res")
            succ = ix.successor(f)
            nxt = [succ] if succ is not None and succ[1] >= t else []
            if children:
                nxt += [c for c in ix.children(f) if c[1] >= t]
            for g, cos in nxt:
                if add_node(g, cos):
                    add_blocks(g)
                    frontier.append(g)
                add_edge(f, g, cos)
    return done()


_LANE = {"att": 0, "att_z": 0, "mlp": 1, "res": 2}


def lane(site: Site) -> int:
    """Row of a site kind in layered drawings: att 0, mlp 1, res 2."""
    return _LANE[site.kind]
