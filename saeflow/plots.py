"""The experiments' plots (matplotlib, Agg backend, written atomically):
  - ``deactivation_plots``: success rate by strategy and layer, activation change over r;
  - ``steering_scores``: one theme's score / topic / coherence over coefficients per layer;
  - ``steering_overview``: held-out score of every theme under each mode's best cell.
(The lineage plot lives beside its data, ``saeflow.lineage.plot_fractions``; SAE quality plots
beside theirs, ``saeflow.quality.write_reports``.)"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from saeflow.io import atomic_path

DEACTIVATION_LABELS = {"top1": "top-1 cosine", "top5": "top-5 cosine (all)",
                       "random5": "random of top-5 (weak match)",
                       "random_active": "random active (chance)", "permutation": "permutation",
                       "pearson": "top-1 Pearson", "exhaustive": "exhaustive"}


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: Path, dpi: int) -> Path:
    """Write ``fig`` to ``path`` atomically and close it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi)
    _pyplot().close(fig)
    return path


def deactivation_plots(summary: Sequence, layers: Sequence[int], out: Path) -> list[Path]:
    """``success_by_layer.png`` (at r = 0, or the smallest r) and ``change_vs_r.png`` in
    ``out``, from ``SummaryRow``s."""
    import numpy as np
    plt = _pyplot()
    strategies = [s for s in DEACTIVATION_LABELS if any(x.strategy == s for x in summary)]
    rs = sorted({s.r for s in summary})
    r0 = 0.0 if 0.0 in rs else rs[0]
    cell = {(s.strategy, s.r, s.layer, s.kind): s for s in summary}
    kinds = ["all"] + [k for k in ("res", "mlp", "att") if any(x.kind == k for x in summary)]

    def panels():
        return plt.subplots(1, len(kinds), figsize=(3.2 * len(kinds) + 1.6, 3.6), sharey=True,
                            squeeze=False)

    def title(ax, kind):
        ax.set_title("all kinds (pooled)" if kind == "all" else f"predecessor at {kind}",
                     fontsize=9)

    fig, axes = panels()
    w = 0.8 / max(len(strategies), 1)
    for ax, kind in zip(axes[0], kinds):
        for i, strat in enumerate(strategies):
            ys = [getattr(cell.get((strat, r0, str(L), kind)), "success_rate", np.nan)
                  for L in layers]
            ax.bar(np.arange(len(layers)) + i * w, ys, w, label=DEACTIVATION_LABELS[strat])
        ax.set_xticks(np.arange(len(layers)) + w * (len(strategies) - 1) / 2)
        ax.set_xticklabels([f"L{L}" for L in layers])
        title(ax, kind)
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel(f"success rate (r = {r0:g})")
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    written = [save_figure(fig, out / "success_by_layer.png", 110)]
    fig, axes = panels()
    for ax, kind in zip(axes[0], kinds):
        for strat in strategies:
            ax.plot(rs, [getattr(cell.get((strat, r, "all", kind)), "mean_change", np.nan)
                         for r in rs], marker="o", label=DEACTIVATION_LABELS[strat])
        title(ax, kind)
        ax.set_xlabel("r (predecessor -> r x activation)")
    axes[0][0].set_ylabel("mean activation change 1 - z_new/z_old")
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    written.append(save_figure(fig, out / "change_vs_r.png", 110))
    plt.close("all")
    return written


def steering_scores(path: Path, theme: str, results: Sequence, xlabel: str = "coefficient"
                    ) -> Path:
    """Score, topic and coherence (rows) over coefficients, one line per layer, for each mode
    (columns), with the unsteered and prompting baselines as horizontal lines."""
    plt = _pyplot()
    modes = [m for m in ("single", "cumulative") if any(r.mode == m for r in results)]
    base = {r.mode: r for r in results if r.layer < 0}
    metrics = ("score", "topic", "coherence")
    fig, axes = plt.subplots(len(metrics), len(modes), figsize=(5 * len(modes), 8), squeeze=False,
                             sharey="row", sharex=True)
    coefs = sorted({r.coefficient for r in results if r.layer >= 0})
    for j, mode in enumerate(modes):
        rs = [r for r in results if r.mode == mode]
        for layer in sorted({r.layer for r in rs}):
            pts = sorted(((r.coefficient, r) for r in rs if r.layer == layer),
                         key=lambda p: p[0])
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
    return save_figure(fig, path, 90)


def steering_overview(path: Path, comparison: dict) -> Path:
    """Held-out score per theme: unsteered, prompting and each mode's best cell."""
    plt = _pyplot()
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
    return save_figure(fig, path, 90)
