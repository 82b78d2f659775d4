"""``saeflow view ATLAS``: explore an atlas and steer from a browser (a local web app)."""

from __future__ import annotations

import argparse

from saeflow.commands import add_model_args
from saeflow.viewer.server import DEFAULT_HOST, DEFAULT_PORT


def add(subparsers) -> None:
    p = subparsers.add_parser(
        "view", help="browse an atlas, its flow graphs and steering in a local web viewer",
        description="Start a local web viewer: the suite's lineage over depth, feature search "
                    "and pages, interactive flow graphs with exports, and steering (the model "
                    "loads on the first steering request). Stop it with Ctrl-C.")
    p.add_argument("atlas", metavar="ATLAS",
                   help="an atlas folder, or a suite ('starter', a folder, a spec file or a "
                        "preset) whose atlas is in the cache")
    p.add_argument("--suite", default=None,
                   help="the suite to steer with (default: the one the atlas was computed from)")
    p.add_argument("--host", default=DEFAULT_HOST,
                   help=f"address to listen on (default {DEFAULT_HOST}: this machine only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument("--threads", type=int, default=8, help="request threads (default 8)")
    p.add_argument("--server", default="auto", choices=["auto", "waitress", "werkzeug"],
                   help="WSGI server (default auto: waitress when installed, else werkzeug)")
    p.add_argument("--no-steering", action="store_true", help="never load a model")
    add_model_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from saeflow.catalog import find_atlas, model_loader
    from saeflow.viewer.server import ViewerServer, create_app

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be between 0 and 65535, got {args.port}")
    if args.threads < 1:
        raise ValueError(f"--threads must be at least 1, got {args.threads}")
    atlas, suite = find_atlas(args.atlas)
    load, why_not = (None, "disabled by --no-steering") if args.no_steering else \
        model_loader(atlas, args.suite, suite, args.model, args.device, args.dtype)
    app = create_app(atlas, load_model=load, host=args.host, steering_off_reason=why_not)
    try:
        server = ViewerServer(app, host=args.host, port=args.port, threads=args.threads,
                              backend=args.server)
    except OSError as e:
        raise OSError(f"cannot listen on {args.host}:{args.port} ({e.strerror or e}); is another "
                      "viewer running? pick another --port") from None
    contexts = app.extensions["saeflow.view"].contexts
    print(f"saeflow view: atlas {atlas.root} ({len(atlas.sites)} sites, "
          f"{sum(atlas.widths.values()):,} features)")
    if contexts is None:
        print(f"  no top activating contexts yet: `saeflow contexts {atlas.root}` adds them")
    if why_not:
        print(f"  steering is off: {why_not}")
    print(f"  serving on {server.url}  ({server.kind}, Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
    return 0
