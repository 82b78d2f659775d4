"""Flow graph exports: ``render(graph, fmt)`` for json, graphml, dot, svg, png and neuronpedia.

- json: saeflow's versioned schema (``FlowGraph.to_json``, "saeflow.flowgraph/1").
- graphml: networkx's writer; node ids are feature strings, a missing lineage is "".
- dot: Graphviz text, one rank per layer, left to right.
- svg / png: drawn with matplotlib (no Graphviz needed): layers across, one lane per site kind
  (att, mlp, res), edge width and opacity by cosine, residual nodes coloured by lineage.
- neuronpedia: the attribution-graph JSON read by circuit-tracer's frontend and Neuronpedia's
  graph viewer (``saeflow.neuronpedia.graph_json``: site kinds as columns, layers as rows);
  ``saeflow.neuronpedia.write_graph_folder`` writes it with the index and feature files
  circuit-tracer's local server serves.
"""

from __future__ import annotations

import io
import json

from saeflow.flow import FlowGraph, lane
from saeflow.lineage import COLORS

FORMATS = ("json", "graphml", "dot", "svg", "png", "neuronpedia")
_KIND_COLOR = {"mlp": "#e7ba52", "att": "#ce6dbd", "att_z": "#ce6dbd"}
_LANES = ("att", "mlp", "res")


def render(graph: FlowGraph, fmt: str) -> str | bytes:
    """The graph in ``fmt`` (``FORMATS``): bytes for png, text for the others."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown graph format {fmt!r}; known: {', '.join(FORMATS)}")
    if fmt == "json":
        return json.dumps(graph.to_json(), indent=2)
    if fmt == "graphml":
        return _graphml(graph)
    if fmt == "dot":
        return _dot(graph)
    if fmt == "neuronpedia":
        return json.dumps(neuronpedia(graph), indent=2)
    return _draw(graph, fmt)


def _node_color(n) -> str:
    if n.feature.kind == "res":
        return COLORS.get(n.lineage or "", "#4c78a8")
    return _KIND_COLOR[n.feature.kind]


def _printable(text) -> str:
    """``text`` with every unprintable character (control characters, NUL, non-characters,
    lone surrogates) shown as U+FFFD, as the drawings show them: XML cannot hold most of them
    and Graphviz stops at a NUL."""
    return "".join(ch if ch.isprintable() else "\ufffd" for ch in str(text))


def _graphml(graph: FlowGraph) -> str:
    import networkx as nx
    g = graph.to_networkx()
    for _, data in g.nodes(data=True):
        for k, v in list(data.items()):
            if v is None:
                data[k] = ""
            elif isinstance(v, str):
                data[k] = _printable(v)
    g.graph = {"seed": str(graph.seed)}
    return "\n".join(nx.generate_graphml(g)) + "\n"


def _q(text: str) -> str:
    text = _printable(str(text).replace("\n", " "))
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _dot(graph: FlowGraph) -> str:
    lines = ["digraph flow {", "  rankdir=LR;", '  node [shape=box, style="rounded,filled", '
             'fontname="Helvetica", fontsize=10];', f"  label={_q('flow of ' + str(graph.seed))};"]
    for layer in graph.layers:
        lines.append(f"  subgraph cluster_{layer} {{ label={_q('layer ' + str(layer))}; "
                     "style=dotted;")
        for n in graph.nodes:
            if n.feature.layer != layer:
                continue
            text = f"{n.feature}\\n{n.lineage or n.feature.kind}"
            if n.label:
                text += "\\n" + _printable(n.label[:40]).replace("\\", "\\\\").replace('"', '\\"')
            pen = ", penwidth=3" if n.feature == graph.seed else ""
            lines.append(f'    {_q(n.feature)} [label="{text}", fillcolor="{_node_color(n)}"'
                         f"{pen}];")
        lines.append("  }")
    for e in graph.edges:
        lines.append(f"  {_q(e.source)} -> {_q(e.target)} [label={_q(f'{e.cos:.2f}')}, "
                     f"penwidth={0.5 + 3 * max(e.cos, 0):.2f}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _draw(graph: FlowGraph, fmt: str) -> str | bytes:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = graph.layers
    col = {layer: i for i, layer in enumerate(layers)}
    slots: dict[tuple[int, int], list] = {}
    for n in graph.nodes:
        slots.setdefault((n.feature.layer, lane(n.feature.site)), []).append(n)
    pos = {}
    for (layer, ln), group in slots.items():
        for j, n in enumerate(group):  # spread nodes that share a layer and lane
            # blocks sit left of their layer's residual column, so block -> res edges of one
            # layer do not run through each other
            pos[n.feature] = (col[layer] - (0.25, 0.45, 0.0)[ln],
                              2 - ln + (j - (len(group) - 1) / 2) * 0.7 / len(group))
    width = max(5.0, 1.25 * len(layers) + 3.0)
    fig, ax = plt.subplots(figsize=(width, 3.6), dpi=110)
    for e in graph.edges:
        (x0, y0), (x1, y1) = pos[e.source], pos[e.target]
        c = max(float(e.cos), 0.0)
        ax.plot([x0, x1], [y0, y1], color="#555555", lw=0.5 + 3 * c, alpha=0.25 + 0.65 * c,
                zorder=1)
    for n in graph.nodes:
        x, y = pos[n.feature]
        seed = n.feature == graph.seed
        ax.scatter([x], [y], s=260 if seed else 150, color=_node_color(n), zorder=2,
                   marker="o" if n.feature.kind == "res" else "s",
                   edgecolors="black" if seed else "white", linewidths=1.8 if seed else 0.8)
        label = "".join(ch if ch.isprintable() else "\ufffd" for ch in n.label[:18])
        text = str(n.feature.index) + (f"\n{label}" if label else "")
        ax.annotate(text, (x, y), xytext=(0, -13), textcoords="offset points", ha="center",
                    va="top", fontsize=6.5, zorder=3)
    shown = [c for c in COLORS if any(n.lineage == c for n in graph.nodes)]
    for c in shown:
        ax.scatter([], [], s=40, color=COLORS[c], label=c.replace("_", " "))
    for kind in ("mlp", "att"):
        if any(n.feature.kind.startswith(kind) for n in graph.nodes):
            ax.scatter([], [], s=40, color=_KIND_COLOR[kind], marker="s",
                       label=f"{kind} feature")
    if shown:
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False, fontsize=7)
    ax.set_xticks(range(len(layers)), [str(layer) for layer in layers])
    ax.set_yticks([2, 1, 0], list(_LANES))
    ax.set_xlim(-0.8, len(layers) - 0.4)
    ax.set_ylim(-0.75, 2.6)
    ax.set_xlabel("layer")
    ax.set_title(f"flow of {graph.seed}", fontsize=10)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    fig.tight_layout()
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format=fmt)
    finally:
        plt.close(fig)
    data = buf.getvalue()
    return data if fmt == "png" else data.decode("utf-8")


def neuronpedia(graph: FlowGraph) -> dict:
    """The graph as an attribution-graph JSON (``saeflow.neuronpedia.graph_json``)."""
    from saeflow.neuronpedia import graph_json
    return graph_json(graph)
