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
"""

from __future__ import annotations

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


def trace(atlas, feature, res_threshold: float = RES_THRESHOLD,
          block_threshold: float = BLOCK_THRESHOLD, *,
          backward: bool = True, forward: bool = True, children: bool = True,
          max_nodes: int = 1000, below_null: bool = False) -> FlowGraph:
    """The pruned flow graph of ``feature`` (module docstring)."""
    import warnings

    seed = atlas.feature(feature)
    for name, v in (("res_threshold", res_threshold), ("block_threshold", block_threshold)):
        if not -1.0 <= float(v) <= 1.0:
            raise ValueError(f"{name} is a cosine, between -1 and 1; got {v}")
    cuts = (atlas.flow_cuts(res_threshold, block_threshold, below_null, warn=False)[0]
            if hasattr(atlas, "flow_cuts") else {})

    def cut(layer: int, kind: str) -> float:
        default = res_threshold if kind == "res" else block_threshold
        return cuts.get(layer, {}).get("att" if kind == "att_z" else kind, default)
    nodes: dict[Feature, FlowNode] = {}
    edges: dict[tuple[Feature, Feature], FlowEdge] = {}
    truncated = False

    def add_node(f: Feature, score: float) -> bool:
        nonlocal truncated
        if f in nodes:
            return False
        if len(nodes) >= max_nodes:
            truncated = True
            return False
        lin = atlas.lineage(f) if f.kind == "res" else None
        nodes[f] = FlowNode(f, lin, atlas.label(f), float(score))
        return True

    def add_edge(src: Feature, dst: Feature, cos: float) -> None:
        if src in nodes and dst in nodes:
            edges.setdefault((src, dst), FlowEdge(src, dst, float(cos)))

    def add_blocks(r: Feature) -> None:
        preds = atlas.predecessors(r)
        for kind in ("mlp", "att"):
            if kind in preds and preds[kind][1] >= cut(r.layer, kind):
                add_node(preds[kind][0], preds[kind][1])
                add_edge(preds[kind][0], r, preds[kind][1])

    def done() -> FlowGraph:
        layers = sorted({f.layer for f in nodes})
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
        order = sorted(nodes.values(), key=lambda n: (n.feature.layer, _LANE[n.feature.kind],
                                                      n.feature.index))
        links = sorted(edges.values(), key=lambda e: (e.target.layer, str(e.source),
                                                      str(e.target)))
        return FlowGraph(seed, order, links, settings)

    add_node(seed, 1.0)
    start = seed
    if seed.kind != "res":
        succ = atlas.successors(seed, 1)
        if not succ or succ[0][1] < cut(seed.layer, seed.kind):
            return done()
        start, cos = succ[0]
        add_node(start, cos)
        add_edge(seed, start, cos)
        backward = False
    add_blocks(start)
    if backward:
        cur = start
        while True:
            p = atlas.predecessors(cur).get("res")
            if p is None or p[1] < cut(cur.layer, "res") or not add_node(*p):
                break
            add_edge(p[0], cur, p[1])
            add_blocks(p[0])
            cur = p[0]
    if forward:
        frontier = [start]
        while frontier:
            f = frontier.pop()
            t = cut(f.layer + 1, "res")
            nxt = [s for s in atlas.successors(f, 1) if s[1] >= t]
            if children:
                nxt += [c for c in atlas.children(f) if c[1] >= t]
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
