"""``saeflow view ATLAS``: explore an atlas and steer from a browser (a local web app)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add(subparsers) -> None:
    from saeflow.cli import add_model_args
    from saeflow.viewer.server import DEFAULT_HOST, DEFAULT_PORT

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


def resolve_atlas(spec: str):
    """``(Atlas, suite or None)`` for an atlas folder or a suite whose atlas is cached."""
    from saeflow.atlas import ATLAS_JSON, SETTINGS_JSON, Atlas
    from saeflow.models import cache_dir
    from saeflow.suite import load_suite

    path = Path(spec).expanduser()
    if (path / ATLAS_JSON).exists() or (path / SETTINGS_JSON).exists():
        return Atlas.load(path), None  # (an unfinished atlas: Atlas.load says how to resume)
    suite = load_suite(spec)
    cached = cache_dir() / "atlases" / suite.name
    if not (cached / ATLAS_JSON).exists():
        raise FileNotFoundError(f"suite {suite.name!r} has no atlas in the cache ({cached}); "
                                f"compute it first with `saeflow atlas {spec}`")
    return Atlas.load(cached), suite


def steering_loader(atlas, suite_spec: str | None, suite, args):
    """A function that opens the suite and loads its model, or None (with the reason)."""
    from saeflow.suite import load_suite

    if getattr(args, "no_steering", False):
        return None, "disabled by --no-steering"
    if suite is None:
        root = suite_spec or (atlas.info.get("suite") or {}).get("root")
        if not root or not Path(root).expanduser().exists():
            return None, ("the atlas names no suite folder on this machine; pass --suite to "
                          "steer")
        suite = load_suite(root, model=args.model)
    elif args.model:
        suite.model = args.model
    if not suite.model:
        return None, f"suite {suite.name!r} names no model; pass --model to steer"

    def load():
        print(f"saeflow view: loading {suite.model} for steering ...", file=sys.stderr)
        lm = suite.load_model(device=args.device, dtype=args.dtype)
        return lm, suite
    return load, None


def run(args: argparse.Namespace) -> int:
    from saeflow.viewer.server import ViewerServer, create_app

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be between 0 and 65535, got {args.port}")
    if args.threads < 1:
        raise ValueError(f"--threads must be at least 1, got {args.threads}")
    atlas, suite = resolve_atlas(args.atlas)
    load, why_not = steering_loader(atlas, args.suite, suite, args)
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
