"""The ``saeflow`` command: a thin argparse mirror of the library.

Each command lives in ``saeflow/commands/<name>.py`` and defines ``add(subparsers)``, which
registers its parser and sets ``func(args) -> int``. The work happens inside ``func``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from saeflow.commands import add_model_args  # noqa: F401  (where commands used to find it)

COMMANDS = ["train", "quality", "atlas", "graph", "match", "permute", "prune", "deactivate",
            "groups", "steer", "steer_eval", "themes", "contexts", "view", "demo", "info"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="saeflow",
        description="Feature flow across the layers of a language model, from SAE weights.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f"saeflow.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"saeflow.commands.{name}":
                continue
            raise
        mod.add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, KeyError, OSError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"saeflow {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"saeflow {args.command}: interrupted (re-run to resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
