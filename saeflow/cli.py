"""The ``saeflow`` command: a thin argparse mirror of the library.

Each command lives in ``saeflow/commands/<name>.py`` and defines ``add(subparsers)``, which
registers its parser and sets ``func(args) -> int``. Heavy imports happen inside ``func``, so
``saeflow --help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ["train", "quality", "atlas", "graph", "match", "deactivate", "steer", "steer_eval",
            "themes", "contexts", "view", "demo", "info"]


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Options every command that runs a model takes."""
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="model weights dtype (default float32)")
    p.add_argument("--model", default=None,
                   help="override the suite's model: a preset (smollm2, gemma3-270m), a folder, "
                        "a .gguf file or a hub id")


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
