"""``saeflow graph ATLAS FEATURE``: trace one feature's flow graph and export it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add(subparsers) -> None:
    from saeflow.export import FORMATS

    p = subparsers.add_parser(
        "graph", help="trace a feature's flow graph over all layers",
        description="Trace a feature's ancestors and descendants through an atlas (pruned: the "
                    "residual chain stops below --res-threshold, mlp/att nodes below "
                    "--block-threshold) and print or save it.")
    p.add_argument("atlas", help="an atlas folder, or a suite (its cached atlas is used or made)")
    p.add_argument("feature", help="LAYER/KIND/INDEX, e.g. 12/res/4111")
    p.add_argument("--format", default="json", choices=FORMATS, help="output format (json)")
    p.add_argument("--out", default=None, help="write to this file instead of stdout")
    p.add_argument("--res-threshold", type=float, default=0.5,
                   help="stop the residual chain below this cosine (default 0.5)")
    p.add_argument("--block-threshold", type=float, default=0.15,
                   help="drop mlp/att predecessors below this cosine (default 0.15)")
    p.add_argument("--no-children", action="store_true",
                   help="forward: follow only each feature's best successor, not every feature "
                        "of the next layer that chose it as predecessor")
    p.add_argument("--max-nodes", type=int, default=1000, help="stop growing past this size")
    p.set_defaults(func=run)


def open_atlas(spec: str):
    """An atlas folder, or a suite spec whose cached atlas is used (computed if missing)."""
    from saeflow.atlas import ATLAS_JSON, Atlas, ensure_atlas
    from saeflow.suite import load_suite

    path = Path(spec).expanduser()
    if (path / ATLAS_JSON).exists():
        return Atlas.load(path)
    return ensure_atlas(load_suite(spec))


def run(args: argparse.Namespace) -> int:
    from saeflow.export import render
    from saeflow.flow import trace

    atlas = open_atlas(args.atlas)
    graph = trace(atlas, args.feature, args.res_threshold, args.block_threshold,
                  children=not args.no_children, max_nodes=args.max_nodes)
    data = render(graph, args.format)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data)
        tmp.replace(out)
        print(f"{len(graph.nodes)} nodes, {len(graph.edges)} edges -> {out}", file=sys.stderr)
    elif isinstance(data, bytes):
        if sys.stdout.isatty():
            raise ValueError("png output is binary: pass --out FILE.png (or redirect stdout)")
        sys.stdout.buffer.write(data)
    else:
        sys.stdout.write(data)
    return 0
