"""``saeflow permute SUITE``: permutations for every consecutive residual pair (and named
pairs), composition over spans, persistence over depth and the folding x objective ablation
(Mechanistic Permutability)."""

from __future__ import annotations

import argparse

from saeflow.commands import add_model_args


def add(subparsers) -> None:
    from saeflow.commands.prune import add_permutation_args, add_text_args
    from saeflow.persistence import PersistenceConfig as C

    p = subparsers.add_parser(
        "permute", help="one-to-one feature permutations over depth, composition, persistence",
        description="Permutation matching (LAP on folded weights) of every consecutive residual "
                    "pair and of --pairs, stored resumably with the folded MSE per pair. "
                    "--spans compares direct and composed permutations; --persistence follows "
                    "features along composed permutations on held-out text (co-activation and a "
                    "context-embedding proxy); --ablation compares folding x objective.")
    p.add_argument("suite", help="'starter', a suite folder, a .json/.toml spec or a preset")
    p.add_argument("--pairs", default=None,
                   help="extra pairs A:B of equal-width sites, e.g. 3/res:7/res,12/mlp:13/mlp")
    p.add_argument("--no-consecutive", action="store_true",
                   help="only the --pairs (and what --spans/--persistence need)")
    p.add_argument("--spans", default=None,
                   help="start layers for composition, e.g. 5,10,15: direct vs composed "
                        "permutation to each later layer up to --max-distance")
    p.add_argument("--max-distance", type=int, default=C.max_distance,
                   help=f"longest span in layers (default {C.max_distance})")
    p.add_argument("--persistence", action="store_true",
                   help="persistence over depth on held-out text (loads the model)")
    p.add_argument("--starts", default=None,
                   help="persistence start layers (default: four spread over depth)")
    p.add_argument("--n-features", type=int, default=C.n_features,
                   help=f"persistence: features sampled per start (default {C.n_features})")
    p.add_argument("--top-k", type=int, default=C.top_k,
                   help=f"persistence: top contexts per feature embedded (default {C.top_k})")
    p.add_argument("--level", type=float, default=C.level,
                   help="persistence: the half distance is where the excess over chance falls "
                        f"below this fraction of its value at distance 1 (default {C.level})")
    p.add_argument("--no-semantic", dest="semantic", action="store_false",
                   help="persistence: co-activation only (no sentence embeddings)")
    p.add_argument("--judge-url", default=None,
                   help="persistence: OpenAI-compatible endpoint of an optional LLM judge of "
                        "matched pairs (API key from $SAEFLOW_JUDGE_API_KEY if set)")
    p.add_argument("--judge-model", default=None, help="persistence: the judge's model name")
    p.add_argument("--judge-pairs", type=int, default=C.judge_pairs,
                   help=f"persistence: pairs judged per start and distance (default "
                        f"{C.judge_pairs})")
    p.add_argument("--ablation", default=None, metavar="LAYERS",
                   help="folding x objective ablation on the pairs (u-1, u) for these u, e.g. "
                        "5,10,15,20 (loads the model)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_permutation_args(p)
    add_text_args(p)
    add_model_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from saeflow import permutation as pm
    from saeflow.io import write_json_atomic
    from saeflow.commands import from_args
    from saeflow.commands.prune import heldout_config, permutation_config
    from saeflow.prune import parse_layers
    from saeflow.catalog import load_suite

    cfg = permutation_config(args)
    text = heldout_config(args)
    spans = parse_layers(args.spans, "--spans")
    starts = parse_layers(args.starts, "--starts")
    ablation_layers = parse_layers(args.ablation, "--ablation")
    if args.max_distance < 1:
        raise ValueError(f"--max-distance must be >= 1, got {args.max_distance}")
    suite = load_suite(args.suite, model=args.model)
    store = pm.PermutationStore(suite, cfg, args.out)
    pairs = [] if args.no_consecutive else pm.consecutive_pairs(suite.sites())
    pairs += [p for p in pm.parse_pairs(args.pairs) if p not in pairs]
    if not pairs and not (spans or args.persistence or ablation_layers):
        raise ValueError(f"suite {suite.name!r}: nothing to match (no consecutive residual "
                         "pairs and no --pairs)")
    results = store.compute(pairs, progress=not args.quiet)
    if results:
        print(f"permutations of {suite.name} ({cfg.tag}) in {store.folder}")
        print(pm.pair_table(results))
    if spans:
        rows = pm.composition_agreement(store, spans, args.max_distance,
                                        progress=not args.quiet)
        print("\ncomposition: direct P(s -> s+d) vs composed consecutive permutations")
        print(pm.agreement_table(rows))
        write_json_atomic(store.folder / "composition.json", [r._asdict() for r in rows])
    if not (args.persistence or ablation_layers):
        return 0
    from saeflow.pair_judge import make_pair_judge
    make_pair_judge(args.judge_url, args.judge_model)  # both or neither, before the model loads
    from saeflow import persistence as ps
    from saeflow import prune

    lm = suite.load_model(device=args.device, dtype=args.dtype)
    layers = sorted({s.layer for s in suite.sites("res")})
    data = prune.collect_states(lm, layers, prune.text_batches(lm.tokenizer, text),
                                text.outlier_factor, progress=not args.quiet)
    n_tok = len(next(iter(data.states.values())))
    if args.persistence:
        pcfg = from_args(ps.PersistenceConfig, args, starts=tuple(starts))
        judge = make_pair_judge(args.judge_url, args.judge_model)
        rows, dist = ps.run_persistence(lm, suite, store, data, pcfg, judge=judge,
                                        progress=not args.quiet)
        print(f"\npersistence over depth ({n_tok} evaluated tokens of {text.source}/{text.split})")
        print(ps.persistence_table(rows, dist))
        write_json_atomic(store.folder / "persistence.json",
                          {"settings": {**asdict(pcfg), "text": asdict(text)},
                           "rows": [r._asdict() for r in rows], "distances": dist})
        plot = ps.plot_persistence(rows, store.folder / "persistence.png",
                                   title=f"Feature persistence: {suite.name} ({cfg.tag})")
        print(f"saved: {store.folder / 'persistence.json'}; plot: {plot}")
    if ablation_layers:
        ablation_layers = prune.prunable_layers(suite, ablation_layers)
        rows = ps.run_ablation(suite, store.root, cfg, ablation_layers, data,
                               progress=not args.quiet)
        print(f"\nablation: folding x objective on pairs (u-1, u), u in {ablation_layers} "
              f"(means over the layers)")
        print(ps.ablation_table(rows))
        write_json_atomic(store.root / "ablation.json",
                          {"text": asdict(text), "rows": [r._asdict() for r in rows]})
        print(f"saved: {store.root / 'ablation.json'}")
    return 0
