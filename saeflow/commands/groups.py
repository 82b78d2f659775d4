"""``saeflow groups SUITE``: activation-based lineage groups (Feature Flow appendix A.1): which
of each active feature's top-1 predecessors are active with it, and Mann-Whitney U tests of the
groups' s(R), s(M), s(A). Writes ``--out/groups.json`` and prints the group table."""

from __future__ import annotations

import argparse
from pathlib import Path

from saeflow.commands import add_fields, add_model_args, from_args, joined, numbers
from saeflow.configs import GroupsConfig


def add(subparsers) -> None:
    d = GroupsConfig()
    p = subparsers.add_parser(
        "groups", help="activation-based lineage groups and their Mann-Whitney tests",
        description="For features active at sampled tokens, which of their top-1 predecessors "
                    "(R_{L-1}, M_L, A_L) are active too (7 combinations or 'from nowhere'), "
                    "and whether the groups differ in s(R), s(M), s(A) (Mann-Whitney U).")
    p.add_argument("suite", help="a suite: 'starter', a folder or a spec file")
    p.add_argument("--atlas", default=None,
                   help="an atlas folder whose stored matches to use (default: match here)")
    p.add_argument("--layers", default=joined(d.layers), help="layers (default %(default)s)")
    p.add_argument("--texts", default=None,
                   help="a .txt file or folder of texts (default: the bundled corpus, held out)")
    p.add_argument("--n-texts", type=int, default=250, help="texts used (default %(default)s)")
    add_fields(p, GroupsConfig, {"tokens_per_text": "sampled tokens per text",
                                 "max_len": "tokens kept per text",
                                 "min_group": "members a group needs to be tested",
                                 "alpha": "significance level", "seed": "random seed"})
    p.add_argument("--out", default="groups", help="output folder (default ./groups)")
    add_model_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from saeflow.atlas import Atlas
    from saeflow.catalog import open_suite
    from saeflow.groups import activation_groups, group_texts

    if args.n_texts < 1:
        raise ValueError(f"--n-texts must be >= 1, got {args.n_texts}")
    cfg = from_args(GroupsConfig, args, layers=numbers(args.layers, "--layers", int))
    suite, lm = open_suite(args.suite, model=args.model, device=args.device, dtype=args.dtype)
    atlas = Atlas.load(args.atlas) if args.atlas else None
    result = activation_groups(lm, suite, group_texts(args.texts, args.n_texts, args.seed), cfg,
                               atlas=atlas)
    print(result.table())
    path = result.save(Path(args.out) / "groups.json")
    print(f"wrote {path}")
    return 0
