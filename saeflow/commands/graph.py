"""``saeflow graph ATLAS FEATURE``: trace one feature's flow graph and export it."""

from __future__ import annotations

import argparse
import sys

from saeflow.configs import GRAPH_FORMATS as FORMATS
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
    from saeflow.recipes.graph import export_graph
    done = export_graph(args.atlas, args.feature, args.format, args.out, args.res_threshold,
                        args.block_threshold, not args.no_children, args.max_nodes,
                        args.explanations)
    if done.path is not None:
        serve = (f" (serve {args.out} as circuit-tracer's data folder)"
                 if args.format == "neuronpedia" else "")
        print(f"{len(done.graph.nodes)} nodes, {len(done.graph.edges)} edges -> {done.path}"
              + serve, file=sys.stderr)
    elif isinstance(done.data, bytes):
        if sys.stdout.isatty():
            raise ValueError("png output is binary: pass --out FILE.png (or redirect stdout)")
        sys.stdout.buffer.write(done.data)
    else:
        sys.stdout.write(done.data or "")
    return 0
