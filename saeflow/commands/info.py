"""``saeflow info SUITE_OR_SAE``: the sites, widths, architectures and model of a suite or of one
SAE file or folder (any format saeflow reads). A hub preset is described from the registry,
without downloading anything."""

from __future__ import annotations

import json


def add(subparsers) -> None:
    p = subparsers.add_parser(
        "info", help="describe a suite, a hub preset or one SAE file",
        description="Print the sites, widths, architectures and model of a suite (folder, spec "
                    "file, 'starter' or a preset name) or of one SAE file or folder.")
    p.add_argument("target", metavar="SUITE_OR_SAE",
                   help="an SAE file/folder, a suite folder or spec file, 'starter', or a preset")
    p.add_argument("--site", default=None,
                   help="for one SAE whose file names no site: the site it reads, e.g. 12/res")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def run(args) -> int:
    from saeflow.recipes.describe import describe, format_description
    what, info = describe(args.target, args.site)
    print(json.dumps(info, indent=2) if args.json else format_description(what, info))
    return 0
