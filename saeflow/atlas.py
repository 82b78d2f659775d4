"""The flow atlas: every residual feature's matches, scores, lineage and label, on disk.

Implements "Analyze Feature Flow" secs. 3.1-3.2 for a whole suite, from SAE weights only (the
model is needed only for labels and to map att_z decoders to the residual basis).

For each layer L with a residual SAE, one tiled pass per source (``match.cosine_topk_pair``)
gives both directions:
  - predecessors of R_L's features in R_{L-1}, M_L and A_L (top-k; top-1 cosine = s(R), s(M),
    s(A));
  - successors: for each feature of R_{L-1}, M_L and A_L, its best matches in R_L;
plus null samples for the per-layer thresholds (``saeflow.nulls``: Gaussian and rotation
always, reference when a reference suite is given). The attention source is ``L/att`` when the
suite has it, else ``L/att_z`` mapped through W_O. Thresholds, lineage classes and share curves
come from ``saeflow.thresholds`` (``LineageMixin``) and change without recomputing.

On disk (``out_dir``), columnar and memory-mapped on load:
  layers/012/pred_{res,mlp,att}_{idx,cos}.npy   [F_L, k] int32 / float32
  layers/012/succ_{res,mlp,att}_{idx,cos}.npy   [F_source, k]
  layers/012/null_{gaussian,rotation,reference}_{res,mlp,att}.npy   [n] float32
  layers/012/lineage.npy                        [F_L] uint8 (index into lineage.CLASSES)
  layers/012/part.json                          sources, widths, timing
  labels/12-res.bin + labels/12-res.off.npy     promoted tokens (utf-8, \\x1f-separated)
  labels/explanations/12-res.{bin,off.npy}      Neuronpedia explanations (when given)
  contexts.safetensors                          top activating contexts (``saeflow.contexts``)
  atlas.json                                    settings, sites, widths, thresholds and rule
Each layer directory is written to a temporary name and renamed, so an interrupted run resumes
from the first missing layer; the label files are atomic per site and the contexts file
resumes from its last checkpoint. Labels (``saeflow.labels``): promoted tokens through an
unembedding prepared once for all sites, what each feature fires on from the contexts, and
Neuronpedia's explanations; ``Atlas.label(f)`` is the one to show, ``Atlas.labels(f)`` all.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from saeflow.io import atomic_path, file_lock, temp_dir, write_json_atomic
from saeflow.configs import DEFAULT_BLOCK, DEFAULT_K, ContextSettings
from saeflow.labels import DEFAULT_CONTEXTS, LabelsMixin, store_readable, write_strings
from saeflow.lens import Unembedding
from saeflow.lineage import (DEFAULT_MIN_COS, DEFAULT_NULL, DEFAULT_NULL_SAMPLES,
                             DEFAULT_QUANTILE, SCORE_KINDS)
from saeflow.nulls import gaussian_directions, null_scores
from saeflow.sites import Feature, Site
from saeflow.sources import layer_sources
from saeflow.thresholds import LineageMixin

SCHEMA = "saeflow.atlas/1"
ATLAS_JSON = "atlas.json"
SETTINGS_JSON = "settings.json"


def _fingerprint(suite) -> dict:
    files = {}
    for site in suite.sites():
        p = suite.paths.get(site)
        if p is None:
            files[str(site)] = "memory"
            continue
        p = Path(p)
        entries = sorted(p.iterdir()) if p.is_dir() else [p]
        files[str(site)] = [[f.name, f.stat().st_size, f.stat().st_mtime_ns]
                            for f in entries if f.is_file()]
    return {"name": suite.name, "root": str(suite.root) if suite.root else None,
            "info": json.loads(json.dumps(suite.info, default=str)), "files": files}


def _settings(suite, k, null_samples, seed, label_tokens, null_suite=None) -> dict:
    """What the stored parts depend on (a folder computed with other values is not reused)."""
    nulls = ["gaussian", "rotation"] + (["reference"] if null_suite is not None else [])
    return json.loads(json.dumps({"k": k, "null_samples": null_samples, "seed": seed,
                                  "label_tokens": label_tokens, "nulls": nulls,
                                  "null_reference": None if null_suite is None else
                                  _fingerprint(null_suite),
                                  "fingerprint": _fingerprint(suite)}, default=str))


def _save_npy(folder: Path, name: str, arr: np.ndarray) -> None:
    np.save(folder / f"{name}.npy", np.ascontiguousarray(arr))


def compute_atlas(suite, out_dir: str | Path, lm=None, *, k: int = DEFAULT_K,
                  block: int = DEFAULT_BLOCK, precision: str = "auto",
                  null_samples: int = DEFAULT_NULL_SAMPLES, quantile: float = DEFAULT_QUANTILE,
                  thresholds=None, labels: bool = True, label_tokens: int = 6, seed: int = 0,
                  progress: bool = True, null: str = DEFAULT_NULL,
                  min_cos: float = DEFAULT_MIN_COS, null_suite=None, calibration=None,
                  contexts=None, context_texts=None, explanations=None) -> Atlas:
    """Compute (or resume) the atlas of ``suite`` into ``out_dir`` (module docstring). Labels
    need ``lm``; without it they are skipped. With labels, ``contexts`` (a
    ``contexts.ContextSettings``, e.g. ``DEFAULT_CONTEXTS``; None: none) also stores the
    features' top activating contexts, from the corpus or ``context_texts``, for the labels of
    what each feature fires on (an existing contexts file is kept or resumed as it is), and
    ``explanations`` (the folder holding Neuronpedia's ``v1/{modelId}/{source}/explanations``)
    stores Neuronpedia's explanations of the suite's features. The threshold rule: ``null``
    (gaussian, rotation, or reference, which needs ``null_suite``: SAEs of the same residual
    sites trained with another seed), ``quantile``, ``min_cos``, a ``thresholds.Calibration``
    and ``thresholds`` overrides (see ``lineage.resolve_thresholds``)."""
    out = Path(out_dir)
    sites = suite.sites()
    sources = layer_sources(sites)
    if not sources:
        raise ValueError(f"suite {suite.name!r} has no residual (res) SAEs; an atlas matches "
                         f"residual features against their sources. Sites: "
                         f"{', '.join(map(str, sites)) or 'none'}")
    att_z = [str(s) for src in sources.values() for s in src.values() if s.kind == "att_z"]
    if att_z and lm is None:
        raise ValueError(f"suite {suite.name!r} has att_z SAEs ({', '.join(att_z[:4])}"
                         f"{', ...' if len(att_z) > 4 else ''}) read before o_proj; matching "
                         "them needs the model's W_O: pass lm= (the CLI loads the suite's model)")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    _check_null(suite, sources, null, null_suite)
    settings = _settings(suite, k, null_samples, seed, label_tokens, null_suite)
    out.mkdir(parents=True, exist_ok=True)
    rule = dict(quantile=quantile, thresholds=thresholds, null=null, min_cos=min_cos,
                calibration=calibration)
    with _exclusive(out):
        return _compute(suite, out, lm, settings, rule, k=k, block=block, precision=precision,
                        null_samples=null_samples, labels=labels, label_tokens=label_tokens,
                        seed=seed, progress=progress, null_suite=null_suite,
                        readable=dict(contexts=contexts, texts=context_texts,
                                      explanations=explanations))


def _check_null(suite, sources, null: str, null_suite) -> None:
    from saeflow.nulls import NULLS
    if null not in NULLS:
        raise ValueError(f"unknown null {null!r}; known: {', '.join(NULLS)}")
    if null == "reference" and null_suite is None:
        raise ValueError("the reference null needs null_suite: SAEs of the same residual sites "
                         "trained with another seed")
    if null_suite is not None:
        missing = [f"{L}/res" for L in sources if Site(L, "res") not in null_suite]
        if missing:
            raise ValueError(f"the reference suite {null_suite.name!r} has no SAE at "
                             f"{', '.join(missing[:6])}{', ...' if len(missing) > 6 else ''}; "
                             "it needs every residual site of the atlas")


@contextmanager
def _exclusive(out: Path):
    """One writer per atlas folder (another process computing it makes this one wait)."""
    with file_lock(out / ".lock", f"waiting for another process computing the atlas in {out}"):
        yield


def _compute(suite, out: Path, lm, settings: dict, rule: dict, *, k, block, precision,
             null_samples, labels, label_tokens, seed, progress, null_suite,
             readable: dict) -> Atlas:
    from tqdm.auto import tqdm

    from saeflow.match import Operand, resolve_precision, residual_decoder

    sources = layer_sources(suite.sites())
    if (out / SETTINGS_JSON).exists():
        if json.loads((out / SETTINGS_JSON).read_text()) != settings:
            raise ValueError(f"{out} holds an atlas of another suite or other settings "
                             f"(k, null_samples, seed, label_tokens, nulls); delete it or pick "
                             "another output folder")
    else:
        write_json_atomic(out / SETTINGS_JSON, settings)
    for stale in out.glob(".[0-9][0-9][0-9].*"):  # layer folders of an interrupted run
        shutil.rmtree(stale, ignore_errors=True)
    do_labels = labels and lm is not None
    t_start = time.perf_counter()
    unembedding, label_seconds = None, 0.0
    prev: tuple[int, object] | None = None  # (layer, Operand of R_layer) for the next layer
    bar = tqdm(sorted(sources), desc=f"atlas {suite.name}", unit="layer", disable=not progress)
    for L in bar:
        part = out / "layers" / f"{L:03d}"
        need_labels = do_labels and any(
            not (out / "labels" / f"{s.slug}.off.npy").exists()
            for s in [Site(L, "res"), *sources[L].values()] if s.layer == L)
        done = (part / "part.json").exists()
        if done and not need_labels:
            prev = None
            continue
        res_dirs = residual_decoder(suite, Site(L, "res"))
        R = None
        if not done:
            prec = resolve_precision(precision, res_dirs.shape[1])
            R = Operand.cosine(res_dirs, prec)
            reuse = prev[1] if prev is not None and prev[0] == L - 1 else None
            _match_layer(suite, lm, L, sources[L], R, reuse, part, k=k, block=block,
                         null_samples=null_samples, seed=seed, null_suite=null_suite)
        if need_labels:
            t0 = time.perf_counter()
            unembedding = unembedding or Unembedding(lm)
            todo = [s for s in [Site(L, "res"), *(s for s in sources[L].values() if s.layer == L)]
                    if not (out / "labels" / f"{s.slug}.off.npy").exists()]
            dirs = [res_dirs if s.kind == "res" else residual_decoder(suite, s, lm) for s in todo]
            for site, tokens in zip(todo, unembedding.promoted_many(dirs, k=label_tokens)):
                write_strings(out / "labels", site, tokens)
            label_seconds += time.perf_counter() - t0
        prev = None if R is None else (L, R)
    bar.close()
    if labels:  # the contexts need the model, Neuronpedia's explanations do not
        label_seconds += store_readable(suite, out, lm, **{
            **readable, "contexts": readable["contexts"] if lm is not None else None},
            progress=progress)
    return _finalize(out, suite, sources, settings, rule, do_labels, lm,
                     time.perf_counter() - t_start, label_seconds)


def _match_layer(suite, lm, L: int, sources: dict[str, Site], R, prev_R, part: Path, *, k: int,
                 block: int, null_samples: int, seed: int, null_suite=None) -> None:
    """Match R_L (an Operand) against each source, write the layer's folder atomically."""
    from saeflow.match import Operand, cosine_topk, cosine_topk_pair, residual_decoder

    out = part.parent.parent
    tmp = temp_dir(out, prefix=f".{L:03d}.")
    info = {"layer": L, "sources": {}, "widths": {f"{L}/res": len(R)}, "stats": {}}
    t0, flops = time.perf_counter(), 0
    gauss = gaussian_directions(R.x, null_samples, seed + 1009 * L + 7)  # one set, every source
    ref = None if null_suite is None else residual_decoder(null_suite, Site(L, "res"))
    for kind, site in sources.items():
        S = prev_R if kind == "res" and prev_R is not None else Operand.cosine(
            residual_decoder(suite, site, lm), R.precision)
        stats: dict = {}
        pred, succ = cosine_topk_pair(R, S, k=k, block=block, stats=stats)
        nulls = {"gaussian": cosine_topk(gauss, S, k=1, block=block,
                                         precision=S.precision).values[:, 0],
                 "rotation": null_scores(R.x, S, n=null_samples, block=block, kind="rotation",
                                         seed=seed + 1009 * L + SCORE_KINDS.index(kind))}
        if ref is not None:
            nulls["reference"] = null_scores(R.x, S, n=null_samples, block=block,
                                             kind="reference", reference_FD=ref,
                                             seed=seed + 1009 * L + SCORE_KINDS.index(kind))
        flops += 2 * len(S) * R.x.shape[1] * (len(R) + sum(len(v) for v in nulls.values()))
        _save_npy(tmp, f"pred_{kind}_idx", pred.indices.numpy().astype(np.int32))
        _save_npy(tmp, f"pred_{kind}_cos", pred.values.numpy())
        _save_npy(tmp, f"succ_{kind}_idx", succ.indices.numpy().astype(np.int32))
        _save_npy(tmp, f"succ_{kind}_cos", succ.values.numpy())
        for name, v in nulls.items():
            _save_npy(tmp, f"null_{name}_{kind}", v.numpy())
        info["sources"][kind] = str(site)
        info["widths"][str(site)] = len(S)
        info["stats"][kind] = stats
    info["match_seconds"] = time.perf_counter() - t0
    info["match_flops"] = flops
    write_json_atomic(tmp / "part.json", info)
    if part.exists():
        shutil.rmtree(part)
    part.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, part)


def _finalize(out: Path, suite, sources, settings, rule: dict, do_labels, lm,
              seconds, label_seconds: float = 0.0) -> Atlas:
    parts = {L: json.loads((out / "layers" / f"{L:03d}" / "part.json").read_text())
             for L in sources}
    widths = {}
    for p in parts.values():
        widths.update(p["widths"])
    used = {st.get("precision") for p in parts.values() for st in p["stats"].values()}
    prec = "+".join(sorted(x for x in used if x)) or "none"
    info = {"schema": SCHEMA, "suite": {"name": suite.name,
                                        "root": str(suite.root) if suite.root else None},
            "model": suite.model or (lm.name if lm is not None else None),
            "sites": sorted(widths, key=lambda s: Site.parse(s)), "widths": widths,
            "layers": sorted(sources), "sources": {str(L): p["sources"] for L, p in parts.items()},
            "settings": {**{k: v for k, v in settings.items() if k != "fingerprint"},
                         "precision": prec, "quantile": rule["quantile"], "labels": do_labels},
            "match_seconds": sum(p["match_seconds"] for p in parts.values()),
            "match_flops": sum(p["match_flops"] for p in parts.values()),
            "label_seconds_this_run": label_seconds, "seconds_this_run": seconds}
    atlas = Atlas(out, info).with_thresholds(
        rule["thresholds"], rule["quantile"], null=rule["null"], min_cos=rule["min_cos"],
        calibration=rule["calibration"])
    for L in atlas.layers:
        with atomic_path(out / "layers" / f"{L:03d}" / "lineage.npy") as tmp:
            np.save(tmp, atlas.lineage_codes(L))
    write_json_atomic(out / ATLAS_JSON, atlas.info)
    return Atlas.load(out)


def ensure_atlas(suite, lm=None, *, k: int = DEFAULT_K, null_samples: int = DEFAULT_NULL_SAMPLES,
                 seed: int = 0, label_tokens: int = 6, quantile: float | None = None,
                 thresholds=None, null: str | None = None, min_cos: float | None = None,
                 calibration=None, null_suite=None,
                 contexts: ContextSettings | None = DEFAULT_CONTEXTS,
                 explanations=None, **kwargs) -> Atlas:
    """The atlas of ``suite`` from ``cache_dir()/atlases/<suite name>``, computed there first if
    it is missing, stale (the suite's files or the settings changed), or lacks labels that
    ``lm`` can add (promoted tokens, the ``contexts`` of the fires-on labels: by default
    ``labels.DEFAULT_CONTEXTS``, Neuronpedia ``explanations`` from that folder).
    ``quantile``/``thresholds``/``null``/``min_cos``/``calibration`` only reclassify;
    ``kwargs`` go to ``compute_atlas`` (block, precision, labels, progress)."""
    from saeflow.models import cache_dir

    out = cache_dir() / "atlases" / suite.name
    settings = _settings(suite, k, null_samples, seed, label_tokens, null_suite)
    old = json.loads((out / SETTINGS_JSON).read_text()) if (out / SETTINGS_JSON).exists() else None
    if old is not None and old != settings:  # our own cache of another suite or other settings
        from saeflow.contexts import CONTEXTS_FILE
        same_suite = old.get("fingerprint") == settings["fingerprint"]
        for p in out.iterdir():  # top-activating contexts depend on the suite alone: keep them
            if not (same_suite and p.name == CONTEXTS_FILE):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    rule = dict(quantile=quantile, null=null, min_cos=min_cos, calibration=calibration)
    if (out / ATLAS_JSON).exists():
        atlas = Atlas.load(out)
        complete = atlas.has_labels and (contexts is None or atlas.has_contexts) and (
            explanations is None or atlas.has_explanations)
        if lm is None or complete or not kwargs.get("labels", True):
            if thresholds is None and all(v is None for v in rule.values()):
                return atlas
            return atlas.with_thresholds(thresholds, **rule)
    return compute_atlas(suite, out, lm, k=k, null_samples=null_samples, seed=seed,
                         label_tokens=label_tokens, thresholds=thresholds,
                         quantile=DEFAULT_QUANTILE if quantile is None else quantile,
                         null=DEFAULT_NULL if null is None else null,
                         min_cos=DEFAULT_MIN_COS if min_cos is None else min_cos,
                         calibration=calibration, null_suite=null_suite, contexts=contexts,
                         explanations=explanations, **kwargs)


@dataclass
class Atlas(LineageMixin, LabelsMixin):
    """A computed atlas (``Atlas.load(dir)``); columns are memory-mapped on first use. Lineage
    and threshold methods (``with_thresholds``, ``lineage``, ``class_fractions``,
    ``share_curves``, ``flow_cuts``, ...) come from ``thresholds.LineageMixin``; labels
    (``label``, ``labels``, ``tokens``, ``fires_on``, ``explanation``) from
    ``labels.LabelsMixin``."""
    root: Path
    info: dict
    _cols: dict = field(default_factory=dict, repr=False)
    _codes: dict = field(default_factory=dict, repr=False)
    _labels: dict = field(default_factory=dict, repr=False)
    reclassified: bool = False  # thresholds differ from the stored lineage.npy
    _widths: dict | None = field(default=None, init=False, repr=False, compare=False)
    _sources: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def load(cls, root: str | Path) -> Atlas:
        root = Path(root).expanduser()
        path = root / ATLAS_JSON
        if not path.exists():
            hint = " (unfinished: re-run `saeflow atlas` to resume)" if (
                root / SETTINGS_JSON).exists() else ""
            raise FileNotFoundError(f"{root} is not an atlas folder: no {ATLAS_JSON}{hint}")
        info = json.loads(path.read_text())
        if info.get("schema") != SCHEMA:
            raise ValueError(f"{path}: schema {info.get('schema')!r}, expected {SCHEMA!r}")
        return cls(root, info)

    # ---- identity -----------------------------------------------------------------------
    @property
    def sites(self) -> list[Site]:
        return [Site.parse(s) for s in self.info["sites"]]

    @property
    def widths(self) -> dict[Site, int]:
        if self._widths is None:  # parsed once: a flow graph checks a feature at every node
            self._widths = {Site.parse(s): int(w) for s, w in self.info["widths"].items()}
        return dict(self._widths)

    @property
    def model(self) -> str | None:
        return self.info.get("model")

    @property
    def layers(self) -> list[int]:
        return list(self.info["layers"])

    @property
    def has_labels(self) -> bool:
        """Whether every site has stored labels."""
        return all((self.root / "labels" / f"{s.slug}.off.npy").exists() for s in self.sites)

    def sources(self, layer: int) -> dict[str, Site]:
        if layer not in self._sources:  # parsed once per layer, like widths
            self._sources[layer] = {k: Site.parse(s)
                                    for k, s in self.info["sources"].get(str(layer), {}).items()}
        return dict(self._sources[layer])

    def feature(self, feature: Feature | str) -> Feature:
        """Parse and check a feature id against this atlas (clear errors for bad ids)."""
        f = Feature.parse(feature)
        widths = self.widths
        if f.site not in widths:
            raise KeyError(f"feature {f}: the atlas has no site {f.site}; its sites are "
                           f"{', '.join(map(str, self.sites))}")
        if f.index >= widths[f.site]:
            raise KeyError(f"feature {f}: index {f.index} is out of range, site {f.site} has "
                           f"{widths[f.site]} features (0..{widths[f.site] - 1})")
        return f

    # ---- columns ------------------------------------------------------------------------
    def column(self, layer: int, name: str) -> np.ndarray | None:
        key = (layer, name)
        if key not in self._cols:
            path = self.root / "layers" / f"{layer:03d}" / f"{name}.npy"
            self._cols[key] = np.load(path, mmap_mode="r") if path.exists() else None
        return self._cols[key]

    def scores(self, layer: int) -> dict[str, np.ndarray]:
        """s(R), s(M), s(A) of every residual feature of ``layer`` ([F] float32, NaN where the
        source is missing)."""
        F = self.widths[Site(layer, "res")]
        out = {}
        for kind in SCORE_KINDS:
            col = self.column(layer, f"pred_{kind}_cos")
            out[kind] = np.full(F, np.nan, np.float32) if col is None else np.asarray(col[:, 0])
        return out

    def predecessors_topk(self, feature, k: int | None = None) -> dict[str, list]:
        f = self.feature(feature)
        if f.kind != "res":
            raise ValueError(f"predecessors are defined for residual features; {f} is at a "
                             f"{f.kind} site (use successors)")
        out = {}
        for kind, site in self.sources(f.layer).items():
            idx, cos = self.column(f.layer, f"pred_{kind}_idx"), self.column(
                f.layer, f"pred_{kind}_cos")
            n = idx.shape[1] if k is None else k
            if n > idx.shape[1]:
                raise ValueError(f"the atlas stores the top {idx.shape[1]} matches; asked for {n}")
            out[kind] = [(site.feature(int(i)), float(c)) for i, c in zip(idx[f.index, :n],
                                                                          cos[f.index, :n])]
        return out

    def predecessors(self, feature) -> dict[str, tuple[Feature, float]]:
        """Top-1 match of a residual feature in R_{L-1} ("res"), M_L ("mlp"), A_L ("att")."""
        return {kind: v[0] for kind, v in self.predecessors_topk(feature, 1).items()}

    def successors(self, feature, k: int = 1) -> list[tuple[Feature, float]]:
        """Best ``k`` matches in the next residual SAE: R_{L+1} for a res feature of layer L,
        R_L for an mlp/att feature of layer L (empty at the last layer)."""
        f = self.feature(feature)
        L = f.layer + 1 if f.kind == "res" else f.layer
        kind = {"res": "res", "mlp": "mlp", "att": "att", "att_z": "att"}[f.kind]
        if self.sources(L).get(kind) != f.site:
            return []
        idx, cos = self.column(L, f"succ_{kind}_idx"), self.column(L, f"succ_{kind}_cos")
        if k > idx.shape[1]:
            raise ValueError(f"the atlas stores the top {idx.shape[1]} matches; asked for {k}")
        return [(Feature(Site(L, "res"), int(i)), float(c))
                for i, c in zip(idx[f.index, :k], cos[f.index, :k])]

    def children(self, feature) -> list[tuple[Feature, float]]:
        """Features of R_{L+1} whose top-1 residual predecessor is this res feature."""
        f = self.feature(feature)
        if f.kind != "res" or self.sources(f.layer + 1).get("res") != f.site:
            return []
        idx, cos = self.column(f.layer + 1, "pred_res_idx"), self.column(f.layer + 1,
                                                                         "pred_res_cos")
        hit = np.flatnonzero(np.asarray(idx[:, 0]) == f.index)
        return [(Feature(Site(f.layer + 1, "res"), int(j)), float(cos[j, 0])) for j in hit]
