"""``saeflow themes "weddings"``: the SAE features most specific to a theme's text, with labels."""

from __future__ import annotations

from saeflow.commands import add_model_args


def add(subparsers) -> None:
    p = subparsers.add_parser(
        "themes", help="find the features of a theme (e.g. weddings)",
        description="Rank the features of one site by how much more they fire on theme text "
                    "(your --examples, or corpus paragraphs retrieved with an offline sentence "
                    "embedding model) than on background corpus text.")
    p.add_argument("theme", metavar="THEME", help="a theme description, e.g. weddings")
    p.add_argument("--suite", default="starter",
                   help="suite folder or spec file, 'starter' (default), or a preset")
    p.add_argument("--site", default=None, help="site to rank (default: middle residual site)")
    p.add_argument("--examples", default=None,
                   help="a .txt file of theme examples (paragraphs separated by blank lines)")
    p.add_argument("--source", default="default",
                   help="corpus to retrieve from and to draw background text from")
    p.add_argument("--top", type=int, default=15, help="how many features to print (15)")
    p.add_argument("--n-theme", type=int, default=24, help="theme paragraphs to retrieve (24)")
    p.add_argument("--n-background", type=int, default=96, help="background paragraphs (96)")
    p.add_argument("--atlas", default=None, help="atlas folder to take labels from")
    p.add_argument("--show-texts", action="store_true", help="print the theme paragraphs used")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_model_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import json

    from saeflow.catalog import open_suite
    from saeflow.memo import setup_memo
    from saeflow.recipes.steering import read_examples
    from saeflow.themes import build_theme, rank_features, theme_embedder
    examples = read_examples(args.examples)
    embed = theme_embedder(examples)  # one embedder for retrieval and the seeds' relevance
    suite, lm = open_suite(args.suite, args.model, args.device, args.dtype)
    atlas = None
    if args.atlas:
        from saeflow.atlas import Atlas
        atlas = Atlas.load(args.atlas)
    theme = build_theme(args.theme, examples, source=args.source, n_theme=args.n_theme,
                        n_background=args.n_background, embed=embed)
    ranked = rank_features(lm, suite, theme, site=args.site, top=args.top, atlas=atlas,
                           embed=embed, memo=setup_memo())
    if args.json:
        print(json.dumps([r.evidence() for r in ranked], indent=2))
        return 0
    if args.show_texts:
        print(f"theme paragraphs ({len(theme.texts)}):")
        for t, s in zip(theme.texts, theme.similarities):
            print(f"  [{s:.2f}] {t[:110]}")
        print()
    info = theme.retrieval
    found = (f"; {info['embedded']:,} of {info['corpus']:,} corpus paragraphs embedded"
             if info.get("method") in ("shortlist", "exact") else "")
    print(f"features of {args.theme!r} at {ranked[0].feature.site} ({len(theme.texts)} theme vs "
          f"{len(theme.background)} background paragraphs{found})")
    print("ordered by seed score = t x max(0, 2 specificity - 1) x relevance"
          + ("" if embed else " (relevance left out: no sentence embedder installed)"))
    print(f"{'feature':<14} {'seed':>6} {'t':>6} {'spec':>5} {'relev':>5} {'fires':>9}  "
          f"{'top token':<12} label")
    for r in ranked:
        rel = "-" if r.relevance != r.relevance else f"{r.relevance:.2f}"
        print(f"{str(r.feature):<14} {r.seed_score:6.2f} {r.score:6.2f} {r.specificity:5.2f} "
              f"{rel:>5} {r.theme_frac:4.0%}/{r.background_frac:<4.0%} "
              f"{r.top_token.strip()[:12]!r:<12} {r.label}")
    return 0
