"""Flow graph exports: ``render(graph, fmt)`` for json, graphml, dot, svg, png and neuronpedia.

- json: saeflow's versioned schema (``FlowGraph.to_json``, "saeflow.flowgraph/1").
- graphml: networkx's writer; node ids are feature strings, a missing lineage is "".
- dot: Graphviz text, one rank per layer, left to right.
- svg / png: drawn with matplotlib (no Graphviz needed) at ``saeflow.layout``'s positions, the
  ones the viewer draws at: layers across, one lane per site kind (att, res, mlp from the top),
  edge width and opacity by cosine, residual nodes coloured by lineage, blocks by kind. The
  figure grows with the graph (about an inch per layer), so labels stay readable.
- neuronpedia: the attribution-graph JSON read by circuit-tracer's frontend and Neuronpedia's
  graph viewer (``saeflow.neuronpedia.graph_json``: site kinds as columns, layers as rows);
  ``saeflow.neuronpedia.write_graph_folder`` writes it with the index and feature files
  circuit-tracer's local server serves.
"""

from __future__ import annotations

import io
import json

from saeflow.configs import GRAPH_FORMATS as FORMATS
from saeflow.flow import FlowGraph
from saeflow.layout import KIND_COLORS, layout, node_color
from saeflow.lineage import COLORS

_LANES = ("att", "mlp", "res")


def graph_labels(atlas, graph: FlowGraph) -> dict:
    """Every reading of the graph's features (``Atlas.labels``: the label, what it fires on,
    a context, the promoted tokens, Neuronpedia's explanation), for ``render(..., labels=)``."""
    return {n.feature: atlas.labels(n.feature) for n in graph.nodes}


LABELLED_FORMATS = ("graphml", "dot", "neuronpedia")  # the formats that use ``labels``


def render(graph: FlowGraph, fmt: str, labels: dict | None = None) -> str | bytes:
    """The graph in ``fmt`` (``FORMATS``): bytes for png, text for the others. ``labels``
    (``graph_labels(atlas, graph)``) adds the second reading of each feature: the promoted
    tokens under the label in DOT, every reading as GraphML attributes, the promoted tokens as
    the feature files' logits in the neuronpedia export."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown graph format {fmt!r}; known: {', '.join(FORMATS)}")
    labels = labels or {}
    if fmt == "json":
        return json.dumps(graph.to_json(), indent=2)
    if fmt == "graphml":
        return _graphml(graph, labels)
    if fmt == "dot":
        return _dot(graph, labels)
    if fmt == "neuronpedia":
        return json.dumps(neuronpedia(graph, labels), indent=2)
    return _draw(graph, fmt)


def _node_color(n) -> str:
    return node_color(n.feature, n.lineage)


def _printable(text) -> str:
    """``text`` with every unprintable character (control characters, NUL, non-characters,
    lone surrogates) shown as U+FFFD, as the drawings show them: XML cannot hold most of them
    and Graphviz stops at a NUL."""
    return "".join(ch if ch.isprintable() else "\ufffd" for ch in str(text))


def _graphml(graph: FlowGraph, labels: dict) -> str:
    import networkx as nx
    g = graph.to_networkx()
    for n in graph.nodes:
        if n.feature in labels:
            lab = labels[n.feature]
            g.nodes[str(n.feature)].update(fires_on=lab.fires_on, context=lab.context,
                                           promotes=lab.promotes, explanation=lab.explanation)
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


def _dot_text(text: str, n: int = 40) -> str:
    return _printable(text[:n]).replace("\\", "\\\\").replace('"', '\\"')


def _dot(graph: FlowGraph, labels: dict) -> str:
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
                text += "\\n" + _dot_text(n.label)
            second = labels[n.feature].lines()[1] if n.feature in labels else ""
            if second:
                text += "\\n" + _dot_text(second)
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

    lay = layout(graph)
    pos = {f: (x, -y) for f, (x, y) in lay.positions.items()}  # matplotlib's y points up
    width = max(5.0, 1.1 * lay.width + 2.5)
    fig, ax = plt.subplots(figsize=(width, max(2.6, 0.62 * lay.height + 1.3)), dpi=110)
    for kind, top, rows in lay.lanes:
        ax.axhspan(-top, -(top + rows), color="#f3f6fa" if kind == "res" else "#fafafa",
                   zorder=0)
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
        ax.annotate(text, (x, y), xytext=(0, -11), textcoords="offset points", ha="center",
                    va="top", fontsize=7.5, zorder=3)
    shown = [c for c in COLORS if any(n.lineage == c for n in graph.nodes)]
    for c in shown:
        ax.scatter([], [], s=40, color=COLORS[c], label=c.replace("_", " "))
    for kind in ("att", "mlp"):
        if any(n.feature.kind.startswith(kind) for n in graph.nodes):
            ax.scatter([], [], s=40, color=KIND_COLORS[kind], marker="s",
                       label=f"{kind} feature")
    if shown:
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False, fontsize=7)
    ax.set_xticks([i + 0.5 for i in range(len(lay.layers))], [str(x) for x in lay.layers])
    ax.set_yticks([-(top + rows / 2) for _, top, rows in lay.lanes],
                  [kind for kind, _, _ in lay.lanes])
    ax.set_xlim(-0.1, lay.width + 0.1)
    ax.set_ylim(-lay.height - 0.3, 0.3)
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


def neuronpedia(graph: FlowGraph, labels: dict | None = None) -> dict:
    """The graph as an attribution-graph JSON (``saeflow.neuronpedia.graph_json``)."""
    from saeflow.neuronpedia import graph_json
    return graph_json(graph, labels)
