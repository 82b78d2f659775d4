"""Lineage classes of residual features and their per-layer thresholds.

Implements "Analyze Feature Flow" sec. 3.2: each residual feature f of layer L has three scores,
s(R) = max cos against R_{L-1}, s(M) = max cos against M_L, s(A) = max cos against A_L, and a
class from which scores are "high":

  translated      R high, M low,  A low      newborn_mlp   R low, M high, A low
  processed_mlp   R high, M high, A low      newborn_att   R low, M low,  A high
  processed_att   R high, M low,  A high     newborn_both  R low, M high, A high
  processed_both  R high, M high, A high     unexplained   all low

Choices where the paper is silent (it says only that thresholds are "specific for each layer"):
  - Default threshold rule ("null"): for each layer and score type, a score is high when it
    beats the ``quantile`` (0.99) of a null distribution: the max cosine of ``n`` sampled
    targets (2,048 features of R_L) against the source decoder after a Haar-random rotation of
    the targets (equivalently, of the source). The rotation keeps the source's size, spectrum
    and internal geometry and the targets' norms, and breaks only their alignment, so the null
    is "the best match a feature of this layer gets from this many directions by chance". The
    raw null samples are stored, so the quantile can change later without recomputing.
  - A missing score (layer 0 has no R_{L-1}; a suite without an mlp or att SAE at a layer) is
    NaN and counts as low.
  - Overrides: a single number for every layer and score, per-kind numbers, or per-layer
    values (see ``resolve_thresholds``); layers not named keep the null rule.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from saeflow.io import atomic_path

CLASSES = ("translated", "processed_mlp", "processed_att", "processed_both",
           "newborn_mlp", "newborn_att", "newborn_both", "unexplained")
SCORE_KINDS = ("res", "mlp", "att")
DEFAULT_QUANTILE = 0.99
DEFAULT_NULL_SAMPLES = 2048
# class code from the bits (R high, M high, A high)
_CODE = {(True, False, False): 0, (True, True, False): 1, (True, False, True): 2,
         (True, True, True): 3, (False, True, False): 4, (False, False, True): 5,
         (False, True, True): 6, (False, False, False): 7}
_TABLE = np.zeros(8, dtype=np.uint8)
for (r, m, a), code in _CODE.items():
    _TABLE[4 * r + 2 * m + a] = code

COLORS = {"translated": "#4c78a8", "processed_mlp": "#72b7b2", "processed_att": "#9ecae9",
          "processed_both": "#54a24b", "newborn_mlp": "#f58518", "newborn_att": "#e45756",
          "newborn_both": "#b279a2", "unexplained": "#bab0ac"}


def classify(s_res: np.ndarray, s_mlp: np.ndarray, s_att: np.ndarray,
             t_res: float, t_mlp: float, t_att: float) -> np.ndarray:
    """Class codes (indices into ``CLASSES``, uint8) for score arrays [F]; NaN is low."""
    with np.errstate(invalid="ignore"):
        hr = np.nan_to_num(np.asarray(s_res, np.float32), nan=-np.inf) > t_res
        hm = np.nan_to_num(np.asarray(s_mlp, np.float32), nan=-np.inf) > t_mlp
        ha = np.nan_to_num(np.asarray(s_att, np.float32), nan=-np.inf) > t_att
    return _TABLE[4 * hr.astype(np.int64) + 2 * hm + ha]


def random_rotation(d: int, seed: int = 0) -> Tensor:
    """A Haar-random orthogonal matrix [d, d] (QR of a Gaussian matrix, signs fixed)."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).to(torch.float32)


def null_scores(targets_FD: Tensor, source, n: int = DEFAULT_NULL_SAMPLES, seed: int = 0,
                block: int = 4096) -> np.ndarray:
    """Max cosine of ``n`` sampled (rotated) target rows against the source rows: samples of the
    score a feature gets by chance. ``source`` is a tensor [F_s, D] or a prepared
    ``match.Operand``. Returns float32 [min(n, F)]."""
    from saeflow.match import cosine_topk

    g = torch.Generator().manual_seed(seed)
    F = len(targets_FD)
    pick = torch.randperm(F, generator=g)[:min(n, F)]
    rot = random_rotation(targets_FD.shape[1], seed + 1)
    t = targets_FD[pick].to(torch.float32) @ rot
    precision = getattr(source, "precision", "auto")
    return cosine_topk(t, source, k=1, block=block, precision=precision).values[:, 0].numpy()


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


def resolve_thresholds(nulls: dict[int, dict[str, np.ndarray]], quantile: float = DEFAULT_QUANTILE,
                       override=None) -> tuple[dict[int, dict[str, float]], str]:
    """Per-layer thresholds ``{layer: {"res", "mlp", "att": float}}`` and a sentence saying
    which rule made them. ``nulls`` holds each layer's null samples per kind (missing kinds get
    NaN thresholds, which never matter since their scores are NaN too)."""
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile must be between 0 and 1, got {quantile}")
    out = {}
    for layer, per_kind in nulls.items():
        out[layer] = {k: (float(np.quantile(per_kind[k], quantile))
                          if k in per_kind and len(per_kind[k]) else float("nan"))
                      for k in SCORE_KINDS}
    rule = (f"null: a score is high above the {quantile:g} quantile of the max cosine of "
            f"sampled features of the layer, randomly rotated, against the source decoder")
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


def fraction_table(per_layer: dict[int, dict[str, float]],
                   thresholds: dict[int, dict[str, float]] | None = None) -> str:
    """A plain-text table: one row per layer, class shares in percent (and thresholds)."""
    short = ["transl", "proc_M", "proc_A", "proc_MA", "new_M", "new_A", "new_MA", "unexpl"]
    head = "layer " + " ".join(f"{s:>7}" for s in short)
    if thresholds:
        head += "   t_res  t_mlp  t_att"
    lines = [head]
    for layer in sorted(per_layer):
        row = f"{layer:>5} " + " ".join(f"{100 * per_layer[layer][c]:6.1f}%" for c in CLASSES)
        if thresholds:
            t = thresholds[layer]
            row += "   " + " ".join(f"{t[k]:.3f}" if np.isfinite(t[k]) else "    -"
                                    for k in SCORE_KINDS)
        lines.append(row)
    return "\n".join(lines)


def plot_fractions(per_layer: dict[int, dict[str, float]], path: str | Path,
                   title: str = "Lineage of residual features over depth") -> Path:
    """Stacked area plot of class shares over layers, written atomically as PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted(per_layer)
    ys = [[100 * per_layer[layer][c] for layer in layers] for c in CLASSES]
    fig, ax = plt.subplots(figsize=(9, 4.8), dpi=120)
    ax.stackplot(layers, ys, labels=[c.replace("_", " ") for c in CLASSES],
                 colors=[COLORS[c] for c in CLASSES], alpha=0.95)
    ax.set_xlim(min(layers), max(layers) if len(layers) > 1 else min(layers) + 1)
    ax.set_ylim(0, 100)
    ax.set_xlabel("layer")
    ax.set_ylabel("share of residual features (%)")
    ax.set_title(title)
    handles, names = ax.get_legend_handles_labels()  # list top to bottom as stacked
    ax.legend(handles[::-1], names[::-1], loc="center left", bbox_to_anchor=(1.01, 0.5),
              frameon=False, fontsize=8)
    fig.tight_layout()
    path = Path(path)
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return path
