"""``saeflow graph ATLAS FEATURE``: trace one feature's flow graph and export it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


from saeflow.export import FORMATS
from saeflow.flow import BLOCK_THRESHOLD, RES_THRESHOLD


def add(subparsers) -> None:
    p = subparsers.add_parser(
        "graph", help="trace a feature's flow graph over all layers",
        description="Trace a feature's ancestors and descendants through an atlas (pruned: the "
                    "residual chain stops below --res-threshold, mlp/att nodes below "
                    "--block-threshold) and print or save it.")
    p.add_argument("atlas", help="an atlas folder, or a suite (its cached atlas is used or made)")
    p.add_argument("feature", help="LAYER/KIND/INDEX, e.g. 12/res/4111")
    p.add_argument("--format", default="json", choices=FORMATS, help="output format (json)")
    p.add_argument("--out", default=None, help="write to this file instead of stdout")
    p.add_argument("--res-threshold", type=float, default=RES_THRESHOLD,
                   help="stop the residual chain below this cosine (default %(default)s)")
    p.add_argument("--block-threshold", type=float, default=BLOCK_THRESHOLD,
                   help="drop mlp/att predecessors below this cosine (default %(default)s)")
    p.add_argument("--no-children", action="store_true",
                   help="forward: follow only each feature's best successor, not every feature "
                        "of the next layer that chose it as predecessor")
    p.add_argument("--max-nodes", type=int, default=1000, help="stop growing past this size")
    p.add_argument("--explanations", default=None, metavar="DIR",
                   help="label features with Neuronpedia's explanation exports under DIR (the "
                        "folder holding v1/{modelId}/{source}/explanations/); the suite must "
                        "name its Neuronpedia ids")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from saeflow.catalog import open_atlas
    from saeflow.export import render
    from saeflow.flow import trace
    from saeflow.io import write_bytes, write_text

    atlas = open_atlas(args.atlas)
    graph = trace(atlas, args.feature, args.res_threshold, args.block_threshold,
                  children=not args.no_children, max_nodes=args.max_nodes)
    from saeflow.neuronpedia import ids_of_atlas, relabel, write_graph_folder
    ids = ids_of_atlas(atlas) if args.explanations or args.format == "neuronpedia" else None
    if args.explanations:
        if ids is None:
            raise ValueError("--explanations: the atlas's suite names no Neuronpedia ids "
                             "(suite.json \"neuronpedia\" or the SAEs' neuronpedia_id)")
        graph = relabel(graph, ids.labels(args.explanations, graph.features))
    if args.format == "neuronpedia" and args.out:
        path = write_graph_folder(graph, args.out, urls=ids.urls(graph.features) if ids else None)
        print(f"{len(graph.nodes)} nodes, {len(graph.edges)} edges -> {path} (serve {args.out} "
              "as circuit-tracer's data folder)", file=sys.stderr)
        return 0
    data = render(graph, args.format)
    if args.out:
        out = Path(args.out)
        if isinstance(data, bytes):
            write_bytes(out, data)
        else:
            write_text(out, data)
        print(f"{len(graph.nodes)} nodes, {len(graph.edges)} edges -> {out}", file=sys.stderr)
    elif isinstance(data, bytes):
        if sys.stdout.isatty():
            raise ValueError("png output is binary: pass --out FILE.png (or redirect stdout)")
        sys.stdout.buffer.write(data)
    else:
        sys.stdout.write(data)
    return 0
