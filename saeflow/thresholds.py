"""One threshold vocabulary for lineage classes and flow graphs ("Analyze Feature Flow" secs.
3.2-3.3 and 5; method.md sections 2-3).

A score s(R), s(M) or s(A) of a residual feature is *high* at layer L when it is above that
layer's threshold for that kind (``lineage.resolve_thresholds``: by default the 0.99 quantile of
the Gaussian null and never below the minimum effect size 0.2). Everything else reads the same
numbers:
  - lineage classes (``Atlas.lineage``, ``Atlas.class_fractions``);
  - flow graphs (``flow_cuts``): a residual link is kept when its cosine reaches the graph's
    ``res_threshold`` *or* is high, so a feature called translated or processed never has its
    own residual chain cut; an MLP or attention node is admitted only when its cosine is high
    and reaches ``block_threshold``, so nodes at chance level stay out unless the caller asks
    for them (``below_null=True``, which warns at the layers where that admits chance matches);
  - share curves (``share_curves``): the class shares as one threshold sweeps a grid, from the
    stored raw scores, to show how much the shares depend on the rule;
  - a causally calibrated rule (``calibrate``): per layer and kind, the cosine at which top-1
    deactivation success reaches a chosen level. Choices: success is fitted as a
    non-decreasing function of the cosine (isotonic regression, pool-adjacent-violators, no
    parametric form); the threshold is the lowest cosine whose fitted success reaches the
    level, provided at least ``min_support`` (20) pairs lie at or above it (otherwise a few
    lucky pairs at the top would set it); a (layer, kind) that does not reach the level so gets
    an infinite threshold (nothing there is high), one with fewer than ``min_pairs`` (30)
    pairs is left to the null rule.
``LineageMixin`` gives ``Atlas`` these methods (reclassification never recomputes matches).
"""

from __future__ import annotations

import csv
import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from saeflow.lineage import (CLASSES, DEFAULT_MIN_COS, DEFAULT_NULL, DEFAULT_QUANTILE,
                             SCORE_KINDS, class_names, classify, fractions, null_quantiles,
                             resolve_thresholds)

__all__ = ["DEFAULT_GRID", "Calibration", "LineageMixin", "calibrate", "flow_cuts",
           "isotonic_fit", "share_curves"]

DEFAULT_GRID = tuple(round(0.05 * i, 2) for i in range(21))  # 0.00, 0.05, ..., 1.00


# ---- the causally calibrated rule ----------------------------------------------------------
def isotonic_fit(y: np.ndarray) -> np.ndarray:
    """The non-decreasing sequence closest to ``y`` in squared error (pool adjacent
    violators, equal weights)."""
    vals, counts = [], []
    for v in np.asarray(y, np.float64):
        vals.append(v)
        counts.append(1)
        while len(vals) > 1 and vals[-2] > vals[-1]:
            n = counts[-2] + counts[-1]
            vals[-2] = (vals[-2] * counts[-2] + vals[-1] * counts[-1]) / n
            counts[-2] = n
            vals.pop()
            counts.pop()
    return np.repeat(vals, counts)


@dataclass(frozen=True)
class Calibration:
    """Per-layer, per-kind cosines at which top-1 deactivation success reaches ``level``."""
    level: float
    thresholds: dict[int, dict[str, float]]
    pairs: dict[int, dict[str, int]]
    strategy: str = "top1"
    r: float = 0.0
    source: str = ""

    def to_json(self) -> dict:
        return {"level": self.level, "strategy": self.strategy, "r": self.r,
                "source": self.source,
                "thresholds": {str(L): v for L, v in self.thresholds.items()},
                "pairs": {str(L): v for L, v in self.pairs.items()}}

    @classmethod
    def from_json(cls, data: dict) -> Calibration:
        return cls(float(data["level"]),
                   {int(L): {k: float(c) for k, c in v.items()}
                    for L, v in data["thresholds"].items()},
                   {int(L): dict(v) for L, v in data.get("pairs", {}).items()},
                   data.get("strategy", "top1"), float(data.get("r", 0.0)),
                   data.get("source", ""))


def _pair_rows(deactivation) -> tuple[list[dict], str]:
    """(rows with layer, kind, strategy, r, cos, success; a description of the source)."""
    if isinstance(deactivation, (str, Path)):
        path = Path(deactivation).expanduser()
        if path.is_dir():
            path = path / "pairs.csv"
        if not path.exists():
            raise FileNotFoundError(f"deactivation result {path} does not exist (give the "
                                    "folder `saeflow deactivate --out` wrote, or its pairs.csv)")
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        need = {"layer", "kind", "strategy", "r", "cos", "success"}
        if rows and not need <= set(rows[0]):
            raise ValueError(f"{path}: not a deactivation pairs table (needs columns "
                             f"{', '.join(sorted(need))})")
        for row in rows:
            row["success"] = row["success"] in ("True", "true", "1")
        return rows, str(path)
    pairs = getattr(deactivation, "pairs", deactivation)
    return [p._asdict() if hasattr(p, "_asdict") else dict(p) for p in pairs], "<result>"


def calibrate(deactivation, level: float = 0.5, *, strategy: str = "top1", r: float = 0.0,
              min_pairs: int = 30, min_support: int = 20) -> Calibration:
    """The calibrated rule (module docstring) from a deactivation result: a
    ``DeactivationResult``, its pairs, or the folder / ``pairs.csv`` the command wrote."""
    if not 0.0 < level <= 1.0:
        raise ValueError(f"the calibration level is a success rate in (0, 1], got {level}")
    rows, source = _pair_rows(deactivation)
    groups: dict[tuple[int, str], list[tuple[float, float]]] = {}
    for p in rows:
        cos = float(p["cos"])
        if p["strategy"] != strategy or not math.isclose(float(p["r"]), r) or math.isnan(cos):
            continue
        groups.setdefault((int(p["layer"]), str(p["kind"])), []).append(
            (cos, float(bool(p["success"]))))
    if not groups:
        raise ValueError(f"the deactivation result {source} has no {strategy} pairs at r = {r:g}")
    th: dict[int, dict[str, float]] = {}
    counts: dict[int, dict[str, int]] = {}
    for (layer, kind), pts in sorted(groups.items()):
        counts.setdefault(layer, {})[kind] = len(pts)
        if len(pts) < min_pairs:
            continue
        pts.sort()
        fit = isotonic_fit(np.array([s for _, s in pts]))
        hit = np.flatnonzero(fit >= level - 1e-12)  # an upper run: the fit is monotone
        ok = len(hit) and len(pts) - hit[0] >= min_support
        th.setdefault(layer, {})[kind] = float(pts[hit[0]][0]) if ok else math.inf
    return Calibration(level, th, counts, strategy, r, source)


# ---- share curves ---------------------------------------------------------------------------
def share_curves(scores: dict[int, dict[str, np.ndarray]], thresholds: dict[int, dict[str, float]],
                 grid: Iterable[float] = DEFAULT_GRID, vary: str = "all") -> dict:
    """Class shares per layer as a threshold sweeps ``grid``: ``vary="all"`` applies the grid
    value to every score, ``"res"``/``"mlp"``/``"att"`` to that score only (the others keep
    ``thresholds``). JSON-ready: ``{"grid", "vary", "classes", "layers": {"12": {class:
    [share per grid value]}}}`` with classes by code name."""
    if vary not in ("all", *SCORE_KINDS):
        raise ValueError(f"vary must be 'all' or one of {SCORE_KINDS}, got {vary!r}")
    xs = [float(x) for x in grid]
    out = {"grid": xs, "vary": vary, "classes": list(CLASSES), "layers": {}}
    for layer, s in sorted(scores.items()):
        per = {c: [] for c in CLASSES}
        for x in xs:
            t = {k: (x if vary in ("all", k) else thresholds[layer][k]) for k in SCORE_KINDS}
            fr = fractions(classify(s["res"], s["mlp"], s["att"], t["res"], t["mlp"], t["att"]))
            for c in CLASSES:
                per[c].append(fr[c])
        out["layers"][str(layer)] = per
    return out


# ---- flow graphs ----------------------------------------------------------------------------
def flow_cuts(thresholds: dict[int, dict[str, float]], nulls: dict[int, dict[str, float]],
              res_threshold: float, block_threshold: float, below_null: bool = False,
              layers: Iterable[int] | None = None
              ) -> tuple[dict[int, dict[str, float]], list[str]]:
    """Per-layer cosines a flow graph link must reach (module docstring), and warnings about
    the layers (all, or ``layers``) where a cut lies below the null.

    res: ``min(max(res_threshold, null), t_res)`` (``min(res_threshold, t_res)`` with
    ``below_null``), so every high s(R) link is kept; mlp/att: ``max(block_threshold, t)``
    (``block_threshold`` with ``below_null``). NaN thresholds (no source) leave the user's
    number."""
    cuts, low = {}, {"res": [], "mlp": [], "att": []}
    report = set(thresholds) if layers is None else set(layers)
    for layer in sorted(thresholds):
        t, n = thresholds[layer], nulls.get(layer, {})
        c = {}
        tr, nr = t.get("res", math.nan), n.get("res", math.nan)
        r = res_threshold if below_null or not math.isfinite(nr) else max(res_threshold, nr)
        c["res"] = min(r, tr) if math.isfinite(tr) else r
        if math.isfinite(nr) and c["res"] < nr and layer in report:
            low["res"].append(layer)
        for kind in ("mlp", "att"):
            tk, nk = t.get(kind, math.nan), n.get(kind, math.nan)
            c[kind] = block_threshold if below_null or not math.isfinite(tk) else max(
                block_threshold, tk)
            if math.isfinite(nk) and c[kind] < nk and layer in report:
                low[kind].append(layer)
        cuts[layer] = c
    notes = []
    for kind, layers in low.items():
        if layers:
            what = "residual links" if kind == "res" else f"{kind} nodes"
            notes.append(f"{what} are admitted below their layer's null at layers "
                         f"{_span(layers)}: such matches are at chance level")
    return cuts, notes


def _span(layers: list[int]) -> str:
    return ", ".join(map(str, layers)) if len(layers) <= 6 else (
        f"{layers[0]}..{layers[-1]} ({len(layers)} layers)")


# ---- the atlas's classification ---------------------------------------------------------------
class LineageMixin:
    """Threshold and lineage methods of ``Atlas`` (they need ``layers``, ``sources``,
    ``column``, ``scores``, ``feature``, ``info``, ``root`` and the caches)."""

    def nulls(self, layer: int, null: str = DEFAULT_NULL) -> dict[str, np.ndarray]:
        """The stored null samples of ``layer`` per kind (rotation also from older atlases)."""
        out = {}
        for kind in self.sources(layer):
            col = self.column(layer, f"null_{null}_{kind}")
            if col is None and null == "rotation":
                col = self.column(layer, f"null_{kind}")  # atlases made before other nulls
            if col is not None:
                out[kind] = np.asarray(col)
        return out

    @property
    def available_nulls(self) -> list[str]:
        from saeflow.nulls import NULLS
        return [n for n in NULLS if any(self.nulls(L, n) for L in self.layers)]

    @property
    def threshold_settings(self) -> dict:
        s = dict(self.info.get("threshold_settings") or {})
        s.setdefault("null", DEFAULT_NULL)
        s.setdefault("quantile", self.info.get("settings", {}).get("quantile", DEFAULT_QUANTILE))
        s.setdefault("min_cos", DEFAULT_MIN_COS)
        return s

    @property
    def thresholds(self) -> dict[int, dict[str, float]]:
        """The per-layer thresholds that make lineage classes and flow graph cuts."""
        return {int(L): v for L, v in self.info["thresholds"].items()}

    @property
    def null_thresholds(self) -> dict[int, dict[str, float]]:
        """Each layer's null quantile per kind, before the minimum effect size and overrides."""
        if "null_thresholds" in self.info:
            return {int(L): v for L, v in self.info["null_thresholds"].items()}
        return self.thresholds  # older atlases: the threshold was the null quantile

    def with_thresholds(self, override=None, quantile: float | None = None, *,
                        null: str | None = None, min_cos: float | None = None,
                        calibration: Calibration | None = None):
        """A copy classified by another rule (nothing is recomputed or written). ``quantile``,
        ``null`` and ``min_cos`` default to this atlas's; ``override`` and ``calibration``
        apply only when given."""
        cur = self.threshold_settings
        q = cur["quantile"] if quantile is None else quantile
        mc = cur["min_cos"] if min_cos is None else float(min_cos)
        want = cur["null"] if null is None else null
        note = ""
        if not any(self.nulls(L, want) for L in self.layers):
            if null is not None:
                raise ValueError(f"this atlas has no {want} null samples (it has: "
                                 f"{', '.join(self.available_nulls) or 'none'}); recompute it "
                                 "with that null")
            want = "rotation"
            note = " (this atlas stores only the rotation null: recompute it for the Gaussian one)"
        nulls = {L: self.nulls(L, want) for L in self.layers}
        th, rule = resolve_thresholds(nulls, q, override, min_cos=mc, null=want,
                                      calibration=calibration)
        nq = null_quantiles(nulls, q)
        settings = {"null": want, "quantile": q, "min_cos": mc,
                    "calibration": None if calibration is None else calibration.to_json()}
        info = {**self.info, "settings": {**self.info["settings"], "quantile": q},
                "thresholds": {str(L): v for L, v in th.items()},
                "null_thresholds": {str(L): v for L, v in nq.items()},
                "threshold_rule": rule + note, "thresholds_override": override,
                "threshold_settings": settings}
        return type(self)(self.root, info, _cols=self._cols, _labels=self._labels,
                          reclassified=True)

    def lineage_codes(self, layer: int) -> np.ndarray:
        if layer not in self._codes:
            stored = None if self.reclassified else self.column(layer, "lineage")
            if stored is not None:
                self._codes[layer] = np.asarray(stored)
            else:
                t, s = self.thresholds[layer], self.scores(layer)
                self._codes[layer] = classify(s["res"], s["mlp"], s["att"],
                                              t["res"], t["mlp"], t["att"])
        return self._codes[layer]

    def has_previous(self, layer: int) -> bool:
        """Whether layer ``layer`` has a previous residual SAE to test s(R) against."""
        return "res" in self.sources(layer)

    def class_names(self, layer: int) -> tuple[str, ...]:
        """Class name of each code at ``layer`` (no_prev_* where there is no R_{L-1})."""
        return class_names(self.has_previous(layer))

    def lineage(self, feature) -> str:
        f = self.feature(feature)
        if f.kind != "res":
            raise ValueError(f"lineage classes are defined for residual features; {f} is at "
                             f"a {f.kind} site")
        return self.class_names(f.layer)[int(self.lineage_codes(f.layer)[f.index])]

    def class_fractions(self) -> dict[int, dict[str, float]]:
        """Class shares per layer, keyed by code name (``CLASSES``) at every layer."""
        return {L: fractions(self.lineage_codes(L)) for L in self.layers}

    def named_fractions(self) -> dict[int, dict[str, float]]:
        """Class shares per layer under each layer's own class names (``class_names``)."""
        return {L: dict(zip(self.class_names(L), fr.values()))
                for L, fr in self.class_fractions().items()}

    def share_curves(self, grid: Iterable[float] = DEFAULT_GRID, vary: str = "all") -> dict:
        """``share_curves`` of this atlas's stored scores, with its thresholds and nulls."""
        out = share_curves({L: self.scores(L) for L in self.layers}, self.thresholds, grid, vary)
        out["no_previous"] = [L for L in self.layers if not self.has_previous(L)]
        out["thresholds"] = {str(L): v for L, v in self.thresholds.items()}
        out["null_thresholds"] = {str(L): v for L, v in self.null_thresholds.items()}
        out["threshold_rule"] = self.info.get("threshold_rule", "")
        return out

    def plot(self, path, title: str | None = None, grid: Iterable[float] = DEFAULT_GRID):
        """The atlas plot (``lineage.plot_lineage``): class shares over depth at this atlas's
        thresholds, its rule, and the shares over a threshold grid per third of the depth."""
        from saeflow.lineage import plot_lineage
        name = (self.info.get("suite") or {}).get("name") or self.root.name
        return plot_lineage(self.class_fractions(), path,
                            title or f"Lineage of residual features: {name}",
                            thresholds=self.thresholds, curves=self.share_curves(grid),
                            rule=self.info.get("threshold_rule"))

    def flow_cuts(self, res_threshold: float, block_threshold: float, below_null: bool = False,
                  layers: Iterable[int] | None = None, warn: bool = True
                  ) -> tuple[dict[int, dict[str, float]], list[str]]:
        """``flow_cuts`` with this atlas's thresholds and nulls; warns unless ``warn=False``."""
        cuts, notes = flow_cuts(self.thresholds, self.null_thresholds, res_threshold,
                                block_threshold, below_null, layers)
        if warn and notes:
            warnings.warn(f"flow graph: {'; '.join(notes)}", UserWarning, stacklevel=3)
        return cuts, notes
