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


def _print_table(rows: list[dict], cols: list[str]) -> None:
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r.get(c, "")).ljust(widths[c]) for c in cols))


def run(args) -> int:
    from saeflow.recipes.describe import describe
    what, info = describe(args.target, args.site)
    if args.json:
        print(json.dumps(info, indent=2))
    elif what == "sae":
        for k, v in info.items():
            print(f"{k:13s}{v}")
    elif what == "preset":
        for k, v in info.items():
            v = ", ".join(f"{a}: {b}" for a, b in v.items()) if isinstance(v, dict) else v
            print(f"{k:13s}{v}")
        print("(files are fetched on first use; see `saeflow.presets` for where they go)")
    else:
        print(f"suite {info['suite']}: model {info['model'] or '(none named)'}, "
              f"{info['n_sites']} sites over {len(info['layers'])} layers")
        _print_table(info["sites"], ["site", "width", "d_in", "architecture", "input",
                                     "decoder_norm", "source"])
    return 0
