"""The ``saeflow`` subcommands, one module each: ``add(subparsers)`` registers the parser and
``run(args)`` parses the arguments into a config, calls the library or a recipe
(``saeflow.recipes``, ``saeflow.catalog``) and prints. Parsers take their defaults from the
config dataclasses, so the CLI and the library cannot drift apart."""

from __future__ import annotations

import argparse
import dataclasses


def add_model_args(p: argparse.ArgumentParser, dtype_help: str | None = None) -> None:
    """Options every command that runs a model takes; with ``dtype_help``, ``--dtype`` also
    takes ``auto`` and defaults to it (the command resolves it)."""
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    p.add_argument("--dtype", default="auto" if dtype_help else "float32",
                   choices=(["auto"] if dtype_help else []) + ["float32", "bfloat16", "float16"],
                   help=dtype_help or "model weights dtype (default float32)")
    p.add_argument("--model", default=None,
                   help="override the suite's model: a preset (smollm2, gemma3-270m), a folder, "
                        "a .gguf file or a hub id")


def add_fields(p: argparse.ArgumentParser, cls, helps: dict) -> None:
    """One typed option per field of dataclass ``cls`` named in ``helps`` (field -> help, or
    -> ``(flag, help)``; the flag is ``--n-seqs`` for ``n_seqs`` unless given), defaulting to the
    field's default, which the help shows."""
    from saeflow.recipes import config_default
    for name, text in helps.items():
        flag, text = text if isinstance(text, tuple) else ("--" + name.replace("_", "-"), text)
        default = config_default(cls, name)
        p.add_argument(flag, dest=name, type=type(default), default=default,
                       help=f"{text} (default %(default)s)")


def add_ray_arg(p: argparse.ArgumentParser, units: str) -> None:
    """``--ray [ADDRESS]``, the same on every command that fans its units out
    (``saeflow.recipes.distribute``)."""
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help=f"run the {units} as Ray tasks (pip install 'saeflow[ray]'): alone, on "
                        "a Ray started on this machine; 'auto' or HOST:PORT, on a running "
                        "cluster (ray start --head). Results equal the local run's; a killed "
                        "run resumes")


def from_args(cls, args: argparse.Namespace, **values):
    """An instance of dataclass ``cls`` from the namespace attributes named like its fields
    (``values`` first)."""
    names = {f.name for f in dataclasses.fields(cls)}
    picked = {k: v for k, v in vars(args).items() if k in names and k not in values}
    return cls(**picked, **values)


def numbers(text: str, what: str, kind=float) -> tuple:
    """Comma-separated numbers (``kind``: float or int), with an error naming the option."""
    try:
        return tuple(kind(x) for x in text.split(",") if x.strip())
    except ValueError:
        noun = "integers" if kind is int else "numbers"
        raise ValueError(f"{what}: expected comma-separated {noun}, got {text!r}") from None


def joined(values) -> str:
    """A tuple default as the comma-separated text an option takes."""
    return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)
