"""Lineage classes of residual features and their per-layer thresholds.

Implements "Analyze Feature Flow" sec. 3.2: each residual feature f of layer L has three scores,
s(R) = max cos against R_{L-1}, s(M) = max cos against M_L, s(A) = max cos against A_L, and a
class from which scores are "high":

  translated      R high, M low,  A low      newborn_mlp   R low, M high, A low
  processed_mlp   R high, M high, A low      newborn_att   R low, M low,  A high
  processed_att   R high, M low,  A high     newborn_both  R low, M high, A high
  processed_both  R high, M high, A high     unexplained   all low

Choices where the paper is silent (it says only that thresholds are "specific for each layer"):
  - A score is high when it beats both the ``quantile`` (0.99) of its layer's null
    distribution (``saeflow.nulls``; default ``gaussian``: directions with the mean and
    covariance of the layer's decoder rows, so the decoders' shared anisotropy does not count
    as a match) and a stated minimum effect size ``min_cos`` (0.2): a match that is merely
    unlikely by chance but shares under 4% of its variance is not called high. The raw null
    samples and scores are stored, so the rule can change later without recomputing
    (``saeflow.thresholds``: other nulls, a causally calibrated rule, share curves over a
    threshold grid).
  - A missing score (layer 0 has no R_{L-1}; a suite without an mlp or att SAE at a layer) is
    NaN and counts as low. A layer without a previous residual SAE cannot tell "newborn" from
    "carried over", so its classes are named ``no_prev_mlp``, ``no_prev_att``,
    ``no_prev_both`` and ``no_prev_unexplained`` (``class_names(has_res=False)``); the stored
    codes are the same.
  - Overrides: a single number for every layer and score, per-kind numbers, or per-layer
    values (see ``resolve_thresholds``); layers not named keep the null rule.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from saeflow.configs import (DEFAULT_MIN_COS, DEFAULT_NULL,  # noqa: F401  (defined there)
                             DEFAULT_NULL_SAMPLES, DEFAULT_QUANTILE)
from saeflow.io import save_figure
from saeflow.nulls import null_scores, random_rotation  # noqa: F401  (re-exported)

CLASSES = ("translated", "processed_mlp", "processed_att", "processed_both",
           "newborn_mlp", "newborn_att", "newborn_both", "unexplained")
SCORE_KINDS = ("res", "mlp", "att")
# names of the codes at a layer with no previous residual SAE (codes 0-3 cannot occur there)
NO_PREVIOUS = {"newborn_mlp": "no_prev_mlp", "newborn_att": "no_prev_att",
               "newborn_both": "no_prev_both", "unexplained": "no_prev_unexplained"}
# class code from the bits (R high, M high, A high)
_CODE = {(True, False, False): 0, (True, True, False): 1, (True, False, True): 2,
         (True, True, True): 3, (False, True, False): 4, (False, False, True): 5,
         (False, True, True): 6, (False, False, False): 7}
_TABLE = np.zeros(8, dtype=np.uint8)
for (r, m, a), code in _CODE.items():
    _TABLE[4 * r + 2 * m + a] = code

COLORS = {"translated": "#4c78a8", "processed_mlp": "#72b7b2", "processed_att": "#9ecae9",
          "processed_both": "#54a24b", "newborn_mlp": "#f58518", "newborn_att": "#e45756",
          "newborn_both": "#b279a2", "unexplained": "#bab0ac",
          "no_prev_mlp": "#fdbf6f", "no_prev_att": "#fb9a99", "no_prev_both": "#cab2d6",
          "no_prev_unexplained": "#d9d9d9"}


def class_names(has_res: bool = True) -> tuple[str, ...]:
    """The name of each class code at a layer with (or without) a previous residual SAE."""
    return CLASSES if has_res else tuple(NO_PREVIOUS.get(c, c) for c in CLASSES)


def classify(s_res: np.ndarray, s_mlp: np.ndarray, s_att: np.ndarray,
             t_res: float, t_mlp: float, t_att: float) -> np.ndarray:
    """Class codes (indices into ``CLASSES``, uint8) for score arrays [F]; NaN is low."""
    with np.errstate(invalid="ignore"):
        hr = np.nan_to_num(np.asarray(s_res, np.float32), nan=-np.inf) > t_res
        hm = np.nan_to_num(np.asarray(s_mlp, np.float32), nan=-np.inf) > t_mlp
        ha = np.nan_to_num(np.asarray(s_att, np.float32), nan=-np.inf) > t_att
    return _TABLE[4 * hr.astype(np.int64) + 2 * hm + ha]


def _kind_values(value, where: str) -> dict[str, float]:
    if isinstance(value, (int, float)):
        return {k: float(value) for k in SCORE_KINDS}
    if isinstance(value, dict):
        bad = set(value) - set(SCORE_KINDS)
        if bad:
            raise ValueError(f"{where}: unknown score kinds {sorted(bad)}; use {SCORE_KINDS}")
        return {k: float(v) for k, v in value.items()}
    raise ValueError(f"{where}: expected a number or {{kind: number}}, got {value!r}")


def parse_threshold_spec(text: str | None):
    """CLI form of an override: ``0.3``; ``res=0.5,mlp=0.2,att=0.2``; or a JSON file holding
    a number, ``{kind: number}``, or ``{"12": number | {kind: number}, ...}``."""
    if text is None or text == "":
        return None
    try:
        return float(text)
    except ValueError:
        pass
    path = Path(text).expanduser()
    if path.suffix == ".json":
        if not path.exists():
            raise FileNotFoundError(f"--thresholds file {path} does not exist")
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"--thresholds file {path}: not valid JSON ({e})") from None
    out = {}
    for part in text.split(","):
        if "=" not in part:
            raise ValueError(f"--thresholds {text!r}: expected a number, kind=value pairs such "
                             "as res=0.5,mlp=0.2,att=0.2, or a .json file")
        k, v = part.split("=", 1)
        try:
            out[k.strip()] = float(v)
        except ValueError:
            raise ValueError(f"--thresholds {text!r}: {v!r} is not a number") from None
    return _kind_values(out, "--thresholds")


_NULL_WORDS = {"gaussian": "Gaussian directions with the mean and covariance of the layer's "
                            "decoder rows",
               "rotation": "the layer's decoder rows after a random rotation",
               "reference": "rows of the reference SAE of the layer's site"}


def null_quantiles(nulls: dict[int, dict[str, np.ndarray]], quantile: float = DEFAULT_QUANTILE
                   ) -> dict[int, dict[str, float]]:
    """The ``quantile`` of each layer's null samples per kind (NaN for missing kinds)."""
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile must be between 0 and 1, got {quantile}")
    return {layer: {k: (float(np.quantile(per_kind[k], quantile))
                        if k in per_kind and len(per_kind[k]) else float("nan"))
                    for k in SCORE_KINDS} for layer, per_kind in nulls.items()}


def resolve_thresholds(nulls: dict[int, dict[str, np.ndarray]], quantile: float = DEFAULT_QUANTILE,
                       override=None, *, min_cos: float = 0.0, null: str = DEFAULT_NULL,
                       calibration=None) -> tuple[dict[int, dict[str, float]], str]:
    """Per-layer thresholds ``{layer: {"res", "mlp", "att": float}}`` and a sentence saying
    which rule made them. ``nulls`` holds each layer's null samples per kind (missing kinds get
    NaN thresholds, which never matter since their scores are NaN too). In order: the null
    rule ``max(null quantile, min_cos)``; then ``calibration`` (a ``thresholds.Calibration``)
    for the layers and kinds it covers; then the user's ``override``."""
    if not -1.0 <= min_cos <= 1.0:
        raise ValueError(f"min_cos is a cosine, between -1 and 1; got {min_cos}")
    out = {layer: {k: (max(v, min_cos) if np.isfinite(v) else v) for k, v in per.items()}
           for layer, per in null_quantiles(nulls, quantile).items()}
    rule = (f"{null} null: a score is high above the {quantile:g} quantile of the max cosine "
            f"of {_NULL_WORDS.get(null, null)} against the source decoder"
            + (f", and never below the minimum effect size cos {min_cos:g}" if min_cos > -1 else ""))
    if calibration is not None:
        done = []
        for layer, per in calibration.thresholds.items():
            if int(layer) in out:
                out[int(layer)].update({k: float(v) for k, v in per.items()
                                        if np.isfinite(out[int(layer)].get(k, np.nan))})
                done.append(int(layer))
        rule = (f"calibrated: the cosine at which top-1 deactivation success reaches "
                f"{calibration.level:g} (isotonic fit), at layers {sorted(done)}; others by the "
                f"{rule}")
    if override is None:
        return out, rule
    if isinstance(override, (int, float)) or (isinstance(override, dict) and override
                                              and set(override) <= set(SCORE_KINDS)):
        vals = _kind_values(override, "thresholds")
        for layer in out:
            out[layer].update(vals)
        return out, f"user: {vals} for every layer" + (
            "" if len(vals) == 3 else f"; other kinds by the {rule}")
    if not isinstance(override, dict):
        raise ValueError(f"thresholds must be a number, {{kind: number}} or {{layer: ...}}, "
                         f"got {override!r}")
    for key, value in override.items():
        try:
            layer = int(key)
        except (TypeError, ValueError):
            raise ValueError(f"thresholds: {key!r} is neither a layer nor a score kind "
                             f"({', '.join(SCORE_KINDS)})") from None
        if layer not in out:
            raise ValueError(f"thresholds: layer {layer} is not in the atlas (layers "
                             f"{min(out)}..{max(out)})")
        out[layer].update(_kind_values(value, f"thresholds[{key}]"))
    return out, f"user values for layers {sorted(int(k) for k in override)}; others by the {rule}"


def fractions(codes: np.ndarray) -> dict[str, float]:
    """Share of each class (every class name present, zero when absent)."""
    counts = np.bincount(np.asarray(codes, dtype=np.int64), minlength=len(CLASSES))
    total = max(int(counts.sum()), 1)
    return {name: float(counts[i]) / total for i, name in enumerate(CLASSES)}


def _share(fr: dict[str, float], code_name: str) -> float:
    """A class share by its code name, also when ``fr`` uses the no-previous names."""
    return fr.get(code_name, fr.get(NO_PREVIOUS.get(code_name, code_name), 0.0))


def _no_previous(per_layer, thresholds) -> set[int]:
    """Layers without a previous residual SAE (their res threshold is NaN)."""
    if not thresholds:
        return set()
    return {L for L in per_layer if L in thresholds and not np.isfinite(thresholds[L]["res"])}


def fraction_table(per_layer: dict[int, dict[str, float]],
                   thresholds: dict[int, dict[str, float]] | None = None) -> str:
    """A plain-text table: one row per layer, class shares in percent (and thresholds). A
    layer without a previous residual SAE is starred: its new_* columns are no_prev_*."""
    short = ["transl", "proc_M", "proc_A", "proc_MA", "new_M", "new_A", "new_MA", "unexpl"]
    head = "layer " + " ".join(f"{s:>7}" for s in short)
    if thresholds:
        head += "   t_res  t_mlp  t_att"
    lines = [head]
    starred = _no_previous(per_layer, thresholds)
    for layer in sorted(per_layer):
        mark = "*" if layer in starred else " "
        row = f"{layer:>4}{mark} " + " ".join(f"{100 * _share(per_layer[layer], c):6.1f}%"
                                             for c in CLASSES)
        if thresholds:
            t = thresholds[layer]
            row += "   " + " ".join(f"{t[k]:.3f}" if np.isfinite(t[k]) else "    -"
                                    for k in SCORE_KINDS)
        lines.append(row)
    if starred:
        lines.append(f"* layer {', '.join(map(str, sorted(starred)))}: no previous residual SAE, "
                     "so R_(L-1) cannot be tested: new_M/new_A/new_MA/unexpl read no_prev_mlp/"
                     "att/both/unexplained")
    return "\n".join(lines)


def _stack(ax, xs, per_x, legend: bool):
    ys = [[100 * _share(per_x[x], c) for x in xs] for c in CLASSES]
    ax.stackplot(xs, ys, labels=[c.replace("_", " ") for c in CLASSES],
                 colors=[COLORS[c] for c in CLASSES], alpha=0.95)
    ax.set_ylim(0, 100)
    if legend:
        handles, names = ax.get_legend_handles_labels()  # list top to bottom as stacked
        ax.legend(handles[::-1], names[::-1], loc="center left", bbox_to_anchor=(1.01, 0.5),
                  frameon=False, fontsize=8)


def plot_lineage(per_layer: dict[int, dict[str, float]], path: str | Path,
                 title: str = "Lineage of residual features over depth",
                 thresholds: dict[int, dict[str, float]] | None = None,
                 curves: dict | None = None, rule: str | None = None) -> Path:
    """Stacked class shares over layers (top); with ``curves`` (``thresholds.share_curves``)
    also, per third of the depth, the shares as one common threshold sweeps the grid, with the
    layers' own mean thresholds marked (bottom). Written atomically as PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted(per_layer)
    starred = _no_previous(per_layer, thresholds)
    groups = []
    if curves:
        use = [L for L in layers if L not in starred and str(L) in curves["layers"]]
        n = min(3, len(use))
        groups = [g for g in np.array_split(np.array(use), n)] if n else []
    fig = plt.figure(figsize=(10, 4.8 + (3.2 if groups else 0)), dpi=120)
    grid = fig.add_gridspec(2 if groups else 1, max(len(groups), 1),
                            height_ratios=[1.5, 1] if groups else [1])
    ax = fig.add_subplot(grid[0, :])
    _stack(ax, layers, per_layer, legend=True)
    ax.set_xlim(min(layers), max(layers) if len(layers) > 1 else min(layers) + 1)
    for L in starred:
        ax.axvspan(L - 0.5, L + 0.5, color="white", alpha=0.35, lw=0)
        ax.text(L, 97, "no R(L-1)", fontsize=7, ha="left", va="top", rotation=90)
    ax.set_xlabel("layer")
    ax.set_ylabel("share of residual features (%)")
    if rule:
        import textwrap
        rule = "\n".join(textwrap.wrap(rule, 130))
    ax.set_title(title + (f"\n{rule}" if rule else ""), fontsize=8 if rule else None)
    for i, g in enumerate(groups):
        sub = fig.add_subplot(grid[1, i])
        xs = list(curves["grid"])
        mean = {j: {c: float(np.mean([curves["layers"][str(L)][c][j] for L in g]))
                    for c in CLASSES} for j in range(len(xs))}
        _stack(sub, xs, {x: mean[j] for j, x in enumerate(xs)}, legend=False)
        sub.set_xlim(min(xs), max(xs))
        if thresholds:
            for kind, style in (("res", "-"), ("mlp", "--"), ("att", ":")):
                t = [thresholds[int(L)][kind] for L in g if np.isfinite(thresholds[int(L)][kind])]
                if t:
                    sub.axvline(float(np.mean(t)), color="black", ls=style, lw=1,
                                label=f"t_{kind}")
        sub.set_title(f"layers {int(g[0])}-{int(g[-1])}: one threshold for all scores",
                      fontsize=8)
        sub.set_xlabel("threshold (cosine)", fontsize=8)
        if i == 0:
            sub.set_ylabel("share (%)", fontsize=8)
            lines = [ln for ln in sub.get_lines() if ln.get_label().startswith("t_")]
            if lines:
                sub.legend(handles=lines, fontsize=7, frameon=True, loc="lower left")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_fractions(per_layer: dict[int, dict[str, float]], path: str | Path,
                   title: str = "Lineage of residual features over depth") -> Path:
    """Stacked area plot of class shares over layers, written atomically as PNG (the top panel
    of ``plot_lineage``)."""
    return plot_lineage(per_layer, path, title)
