"""A flow graph traced and exported (``saeflow graph``; the tracing is ``saeflow.flow``, the
formats ``saeflow.export``): the atlas a name means, optional Neuronpedia labels, and the file,
the circuit-tracer folder or the text written."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from saeflow.flow import BLOCK_THRESHOLD, RES_THRESHOLD, FlowGraph


class GraphExport(NamedTuple):
    graph: FlowGraph
    data: str | bytes | None  # the rendering when nothing was written
    path: Path | None  # the file or folder written


def export_graph(atlas: str, feature: str, fmt: str = "json", out: str | None = None,
                 res_threshold: float = RES_THRESHOLD, block_threshold: float = BLOCK_THRESHOLD,
                 children: bool = True, max_nodes: int = 1000,
                 explanations: str | None = None) -> GraphExport:
    """Trace ``feature`` in the atlas ``atlas`` names and render it in ``fmt``, written to
    ``out`` when given (``neuronpedia``: circuit-tracer's data folder)."""
    from saeflow.catalog import open_atlas
    from saeflow.export import LABELLED_FORMATS, graph_labels, render
    from saeflow.flow import trace
    from saeflow.io import write_bytes, write_text
    from saeflow.neuronpedia import ids_of_atlas, relabel, write_graph_folder
    opened = open_atlas(atlas)
    graph = trace(opened, feature, res_threshold, block_threshold, children=children,
                  max_nodes=max_nodes)
    ids = ids_of_atlas(opened) if explanations or fmt == "neuronpedia" else None
    # what each feature fires on, promotes, ...: only for the formats that show it
    labels = graph_labels(opened, graph) if fmt in LABELLED_FORMATS else {}
    if explanations:
        if ids is None:
            raise ValueError("--explanations: the atlas's suite names no Neuronpedia ids "
                             "(suite.json \"neuronpedia\" or the SAEs' neuronpedia_id)")
        found = ids.labels(explanations, graph.features)
        graph = relabel(graph, found)
        labels = {f: lab._replace(label=found[f], explanation=found[f]) if f in found else lab
                  for f, lab in labels.items()}
    if fmt == "neuronpedia" and out:
        path = write_graph_folder(graph, out, labels=labels,
                                  urls=ids.urls(graph.features) if ids else None)
        return GraphExport(graph, None, Path(path))
    data = render(graph, fmt, labels=labels)
    if not out:
        return GraphExport(graph, data, None)
    if isinstance(data, bytes):
        write_bytes(Path(out), data)
    else:
        write_text(Path(out), data)
    return GraphExport(graph, None, Path(out))
