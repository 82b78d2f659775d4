"""``saeflow steer-eval SUITE --theme weddings --theme sports ...``: sweep steering modes, layers
and coefficients for each theme against an unsteered and a prompting baseline; print and save a
table (CSV/JSON), plots (PNG), and a comparison of single-layer vs cumulative steering on
held-out samples. Re-running the same command resumes where it stopped."""

from __future__ import annotations

import csv
import io
import os
import re
from pathlib import Path

from saeflow.atomic import atomic_path, write_text

DEFAULT_PROMPTS = ("I think", "Let me tell you about", "Yesterday,", "The best thing")


def add(subparsers) -> None:
    from saeflow.cli import add_model_args
    from saeflow.commands.steer import add_plan_args
    p = subparsers.add_parser(
        "steer-eval", help="evaluate flow-graph steering for themes (sweep, table, plots)",
        description="For each theme: find its seed feature, trace its flow graph, and generate "
                    "from fixed prompts under single-layer and cumulative steering at several "
                    "layers and coefficients, plus unsteered and prompting baselines. Scores: "
                    "topic (calibrated embedding similarity), coherence (calibrated perplexity "
                    "under the unsteered model, times a repetition penalty), score = topic x "
                    "coherence. Results are saved after every cell; re-run to resume.")
    p.add_argument("suite", metavar="SUITE",
                   help="suite folder or spec file, 'starter', or a preset")
    p.add_argument("--theme", action="append", required=True, help="a theme (repeatable)")
    p.add_argument("--feature", default=None,
                   help="seed feature to use instead of the theme's top feature (one theme only)")
    p.add_argument("--out", default="steer-eval", help="output folder (default ./steer-eval)")
    p.add_argument("--modes", default="single,cumulative")
    p.add_argument("--layers", default="auto",
                   help="comma-separated layers, or auto: the seed's layer and the midpoints "
                        "towards the flow graph's first and last layers")
    p.add_argument("--coefficients", default="0.05,0.1,0.2,0.4")
    p.add_argument("--prompt", action="append", default=None,
                   help=f"prompt (repeatable; default: {', '.join(map(repr, DEFAULT_PROMPTS))})")
    p.add_argument("--seeds", default="0", help="sampling seeds (comma-separated; default 0)")
    p.add_argument("--samples", type=int, default=2,
                   help="continuations per prompt and seed (2); the first of each picks a mode's "
                        "best cell, the second scores it (held out)")
    p.add_argument("--max-new-tokens", type=int, default=36)
    p.add_argument("--temperature", type=float, default=1.27)
    p.add_argument("--top-p", type=float, default=0.7)
    p.add_argument("--baseline-prompt", default="Write about {theme}.\n\n{prompt}",
                   help="prompting baseline template with {theme} and {prompt}")
    p.add_argument("--rescore", action="store_true",
                   help="recompute the scores of saved generations (after a scorer change) "
                        "before resuming")
    p.add_argument("--judge-url", default=None,
                   help="OpenAI-compatible endpoint for an optional LLM judge (API key from "
                        "$SAEFLOW_JUDGE_API_KEY if set)")
    p.add_argument("--judge-model", default=None, help="model name for the judge")
    add_plan_args(p)
    add_model_args(p)
    p.set_defaults(func=run)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "theme"


def auto_layers(graph) -> list[int]:
    from saeflow.steer import graph_features
    layers = sorted({f.layer for f in graph_features(graph)})
    seed = graph.seed.layer
    picks = {seed, (layers[0] + seed) // 2, (seed + layers[-1] + 1) // 2}
    return sorted(x for x in picks if x in layers) or [seed]


def _floats(text: str, name: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"--{name} must be comma-separated numbers, got {text!r}") from None


def write_csv(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    write_text(path, buf.getvalue())


def plot_theme(path: Path, theme: str, results, xlabel: str = "coefficient") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    modes = [m for m in ("single", "cumulative") if any(r.mode == m for r in results)]
    base = {r.mode: r for r in results if r.layer < 0}
    metrics = ("score", "topic", "coherence")
    fig, axes = plt.subplots(len(metrics), len(modes), figsize=(5 * len(modes), 8), squeeze=False,
                             sharey="row", sharex=True)
    for j, mode in enumerate(modes):
        rs = [r for r in results if r.mode == mode]
        for layer in sorted({r.layer for r in rs}):
            pts = sorted((r.coefficient, r) for r in rs if r.layer == layer)
            for i, m in enumerate(metrics):
                axes[i][j].errorbar([c for c, _ in pts], [getattr(r, m) for _, r in pts],
                                    yerr=[getattr(r, m + "_se") for _, r in pts], marker="o",
                                    capsize=2, label=f"layer {layer}")
        for i, m in enumerate(metrics):
            ax = axes[i][j]
            for key, color, ls, name in (("none", "grey", "--", "unsteered"),
                                         ("prompt", "green", ":", "prompting")):
                if key in base:
                    ax.axhline(getattr(base[key], m), color=color, ls=ls, label=name)
            coefs = sorted({r.coefficient for r in results if r.layer >= 0})
            if len(coefs) > 1 and coefs[0] > 0:
                ax.set_xscale("log")
                ax.set_xticks(coefs, [f"{c:g}" for c in coefs])
                ax.minorticks_off()
            ax.set_ylim(0, 1)
            ax.grid(alpha=0.3)
            if j == 0:
                ax.set_ylabel(m)
            if i == 0:
                ax.set_title(f"{theme}: {mode}")
            if i == len(metrics) - 1:
                ax.set_xlabel(xlabel)
        axes[0][j].legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)


def plot_overview(path: Path, comparison: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    themes = list(comparison)
    bars = [("unsteered", "grey"), ("prompting", "green"), ("single", "tab:blue"),
            ("cumulative", "tab:orange")]
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(themes), 3.6))
    w = 0.8 / len(bars)
    for k, (name, color) in enumerate(bars):
        ys = [comparison[t][name]["heldout"] if name in comparison[t] else 0 for t in themes]
        ax.bar([i + (k - 1.5) * w for i in range(len(themes))], ys, w, color=color,
               label=name + (" (best cell)" if name in ("single", "cumulative") else ""))
    ax.set_xticks(range(len(themes)), themes)
    ax.set_ylabel("score on held-out samples")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)


def make_judge(args, theme: str):
    """``text -> (topic, coherence)`` through the configured endpoint, or None."""
    if not args.judge_url:
        return None
    from saeflow.evaluate import judge
    key = os.environ.get("SAEFLOW_JUDGE_API_KEY")
    return lambda text: judge(args.judge_url, args.judge_model, theme, text, key)


def setup_theme(args, suite, lm, atlas, description: str, embed):
    """Theme text, seed feature, flow graph, magnitudes and calibrated scorers for one theme."""
    from saeflow.evaluate import calibrate_coherence, calibrate_topic
    from saeflow.sites import Feature
    from saeflow.steer import feature_magnitudes, graph_features
    from saeflow.themes import build_theme, rank_features
    from saeflow.commands.steer import read_examples, trace_graph
    theme = build_theme(description, read_examples(args.examples), source=args.source, embed=embed)
    ranked = rank_features(lm, suite, theme, site=args.site, top=5, atlas=atlas)
    seed = Feature.parse(args.feature) if args.feature else ranked[0].feature
    graph = trace_graph(args, atlas, seed)
    feats = graph_features(graph)
    mags = (feature_magnitudes(lm, suite, feats, args.magnitude, theme.background[:32])
            if args.action == "activate" else None)
    topic = calibrate_topic(theme.texts, theme.background, embed)
    coherence = calibrate_coherence(lm, theme.background[:48], args.max_new_tokens)
    layers = (auto_layers(graph) if args.layers == "auto"
              else [int(x) for x in args.layers.split(",")])
    have = sorted({f.layer for f in feats})
    if any(layer not in have for layer in layers):
        raise ValueError(f"--layers {args.layers}: the flow graph of {seed} ({description}) has "
                         f"features only at layers {have}")
    setup = {"seed": str(seed), "seed_label": atlas.label(seed),
             "ranked": [{"feature": str(r.feature), "t": r.score, "top_token": r.top_token}
                        for r in ranked],
             "graph_features": [str(f) for f in feats],
             "graph_layers": sorted({f.layer for f in feats}),
             "magnitude": args.magnitude, "topic": topic.info(), "coherence": coherence.info(),
             "theme_texts": [t[:100] for t in theme.texts[:8]]}
    return graph, mags, topic, coherence, layers, setup


def run(args) -> int:
    from saeflow.commands.steer import open_atlas, open_suite
    from saeflow.evaluate import SweepConfig, compare_modes, run_sweep
    from saeflow.suite import write_json_atomic
    from saeflow.themes import sentence_embedder
    if args.feature and len(args.theme) > 1:
        raise ValueError("--feature names one seed, so it goes with one --theme")
    if bool(args.judge_url) != bool(args.judge_model):
        raise ValueError("the judge needs both --judge-url and --judge-model")
    out = Path(args.out)
    suite, lm = open_suite(args)
    atlas = open_atlas(args, suite, lm)
    embed = sentence_embedder()
    all_rows, comparison = [], {}
    for description in args.theme:
        print(f"\n== {description}")
        graph, mags, topic, coherence, layers, setup = setup_theme(args, suite, lm, atlas,
                                                                   description, embed)
        print(f"seed {setup['seed']} ({setup['seed_label']}); sweeping layers {layers}")
        cfg = SweepConfig(modes=tuple(args.modes.split(",")), layers=tuple(layers),
                          coefficients=_floats(args.coefficients, "coefficients"),
                          prompts=tuple(args.prompt or DEFAULT_PROMPTS),
                          seeds=tuple(int(s) for s in _floats(args.seeds, "seeds")),
                          samples=args.samples, max_new_tokens=args.max_new_tokens,
                          schedule=args.schedule, alpha=args.alpha,
                          end_coefficient=args.end_coefficient, action=args.action,
                          temperature=args.temperature, top_p=args.top_p,
                          baseline_prompt=args.baseline_prompt)
        folder = out / slug(description)
        results = run_sweep(lm, suite, description, graph, cfg, folder / "results.json", topic,
                            coherence, mags, setup, make_judge(args, description),
                            rescore=args.rescore)
        unit = {"res_norm": " (fraction of residual norm)", "activation": " (x typical activation)",
                "theta": " (x threshold)", "none": " (x decoder row)"}[args.magnitude]
        plot_theme(folder / "scores.png", description, results,
                   "r" if args.action == "suppress" else "coefficient" + unit)
        all_rows += [r.row() for r in results]
        comparison[description] = compare_modes(results)
    write_csv(out / "summary.csv", all_rows)
    write_json_atomic(out / "summary.json", {"rows": all_rows, "comparison": comparison})
    plot_overview(out / "overview.png", comparison)
    print_table(all_rows)
    print_comparison(comparison)
    print(f"\nsaved {out / 'summary.csv'}, {out / 'summary.json'}, {out / 'overview.png'} and "
          f"per-theme results.json + scores.png")
    return 0


def print_table(rows: list[dict]) -> None:
    print(f"\n{'theme':<12} {'cell':<22} {'n':>3} {'topic':>6} {'coher':>6} {'score':>6} "
          f"{'+-':>5} {'nll':>5} {'gain':>5} {'rep':>5}")
    for r in rows:
        print(f"{r['theme'][:12]:<12} {r['cell']:<22} {r['n']:>3} {r['topic']:6.3f} "
              f"{r['coherence']:6.3f} {r['score']:6.3f} {r['score_se']:5.3f} {r['nll']:5.2f} "
              f"{r['gain']:5.2f} {r['repetition']:5.2f}")


def print_comparison(comparison: dict) -> None:
    print("\nscore on held-out samples (best cell per mode chosen on the other samples)")
    print(f"{'theme':<12} {'unsteered':>9} {'prompting':>9} {'single':>22} {'cumulative':>22} "
          f"{'grid mean s/c':>14}")
    for theme, c in comparison.items():
        def best(m):
            return f"{c[m]['heldout']:.3f} ({c[m]['cell']})" if m in c else "-"
        grid = "/".join(f"{c[m]['grid_mean']:.3f}" for m in ("single", "cumulative") if m in c)
        print(f"{theme[:12]:<12} {c['unsteered']['heldout']:9.3f} {c['prompting']['heldout']:9.3f} "
              f"{best('single'):>22} {best('cumulative'):>22} {grid:>14}")
