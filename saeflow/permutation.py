"""Permutations over depth: one-to-one feature matching for many pairs of sites, stored, and
composed over spans ("Mechanistic Permutability", Balagansky, Maksimov, Gavrilov, ICLR 2025,
secs. 3-4; eqs. 3 and 4).

Steps:
  1. each SAE is optionally *folded* (eq. 4, ``SAE.fold``: encoder column and b_enc / theta,
     decoder row * theta, threshold 1); TopK and ReLU SAEs have no threshold, so folding leaves
     them unchanged;
  2. the objective picks the vectors matched per feature: ``decoder`` rows, ``encoder`` columns,
     or ``both`` concatenated (the paper's experiments; b_dec is excluded); the linear
     assignment (dense LAP or the sparse kNN solver) is ``saeflow.match.permutation_match``,
     which this module drives and never re-implements;
  3. every pair gets its *folded* MSE whatever the objective (the paper always measures on
     folded weights): mean over features and coordinates of the squared difference of matched
     folded decoder rows (``mse``) and encoder columns (``mse_enc``), plus the mean cosine of
     matched decoder rows;
  4. composition (sec. 4.3): P(A->C) ~ P(B->C) o P(A->B), i.e. ``perm_ac[i] = perm_bc[perm_ab[i]]``;
     ``composition_agreement`` compares, from start layers, the direct match to every later
     layer with the composition of the consecutive ones: the share of features sent to the same
     place.

Storage (resumable, an atlas-like folder; default ``cache_dir()/permutations/<suite name>``):
  <objective>-<folded|raw>/settings.json              the config and the suite's name
  <objective>-<folded|raw>/pairs/12-res__13-res.npy   int32 [F], perm[i] = feature of B for i of A
  <objective>-<folded|raw>/pairs/12-res__13-res.json  mse, mse_enc, mean_cos, solver, seconds and
                                                      both SAEs' fingerprints (files or weights)
Each pair is written atomically (the .json last, marking it done), so an interrupted run
resumes at the first missing pair; a folder computed from other settings or other SAE files
is cleared first. Choices the paper leaves open: the store is keyed by objective and folding
only (solver and kNN are settings; changing them recomputes), MSE is per coordinate.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from saeflow.configs import OBJECTIVES, PermutationConfig  # noqa: F401  (defined without torch)
from saeflow.io import atomic_path, write_json_atomic
from saeflow.sae import SAE
from saeflow.sites import Site

SETTINGS_JSON = "settings.json"
SCHEMA = "saeflow.permutations/1"


class PairResult(NamedTuple):
    a: Site
    b: Site
    perm: Tensor  # [F] int64: perm[i] = the feature of b matched to feature i of a
    mse: float  # folded decoder rows, mean squared difference per coordinate
    mse_enc: float  # folded encoder columns, the same
    mean_cos: float  # mean cosine of matched decoder rows
    solver: str
    seconds: float


class AgreementRow(NamedTuple):
    start: int  # layer A
    end: int  # layer C
    distance: int
    agreement: float  # share of features the direct match and the composition send alike
    mse_direct: float  # folded decoder MSE of the direct match
    mse_composed: float  # the same for the composed permutation


# ---- pure functions ---------------------------------------------------------------------------
def prepared(sae: SAE, fold: bool) -> SAE:
    """The SAE as matched and used: folded (eq. 4) or as stored."""
    return sae.fold() if fold else sae


def _matching_view(sae: SAE, objective: str, fold: bool) -> tuple[SAE, bool]:
    """An SAE whose vectors under ``permutation_match(..., use_encoder)`` are the objective's:
    thresholds are already folded in (or deliberately not), so it is handed over as ReLU."""
    s = prepared(sae, fold).replace(activation="relu", threshold=None)
    if objective == "encoder":
        return s.replace(W_dec=s.W_enc.T.contiguous()), False
    return s, objective == "both"


def compose(perms: Sequence[Tensor]) -> Tensor:
    """P(A->Z) from a chain [P(A->B), P(B->C), ...]: follow each feature along the chain."""
    if not perms:
        raise ValueError("compose needs at least one permutation")
    out = perms[0].long()
    for p in perms[1:]:
        if len(p) != len(out):
            raise ValueError(f"cannot compose permutations of {len(out)} and {len(p)} features")
        out = p.long()[out]
    return out


def inverse(perm: Tensor) -> Tensor:
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(len(perm), dtype=perm.dtype)
    return inv


def folded_mse(sae_a: SAE, sae_b: SAE, perm: Tensor) -> tuple[float, float, float]:
    """(decoder MSE, encoder MSE, mean decoder cosine) of ``perm`` on folded weights."""
    fa, fb = sae_a.fold(), sae_b.fold()
    perm = perm.long()
    dec = enc = cos = 0.0
    for s in range(0, len(perm), 8192):
        p = perm[s:s + 8192]
        da, db = fa.W_dec[s:s + 8192].float(), fb.W_dec[p].float()
        ea, eb = fa.W_enc[:, s:s + 8192].float(), fb.W_enc[:, p].float()
        dec += float(((da - db).double() ** 2).sum())
        enc += float(((ea - eb).double() ** 2).sum())
        cos += float(torch.nn.functional.cosine_similarity(da, db, dim=1, eps=1e-12).sum())
    F, d = sae_a.d_sae, sae_a.d_in
    return dec / (F * d), enc / (F * d), cos / F


def match_pair(sae_a: SAE, sae_b: SAE, config: PermutationConfig = PermutationConfig(),
               a: Site | None = None, b: Site | None = None) -> PairResult:
    """The permutation of one pair under ``config`` (module docstring, steps 1-3)."""
    from saeflow.match import permutation_match

    va, use_enc = _matching_view(sae_a, config.objective, config.fold)
    vb, _ = _matching_view(sae_b, config.objective, config.fold)
    res = permutation_match(va, vb, use_encoder=use_enc, solver=config.solver, knn=config.knn,
                            dense_limit=config.dense_limit, block=config.block,
                            precision=config.precision)
    mse, mse_enc, cos = folded_mse(sae_a, sae_b, res.perm)
    return PairResult(a or sae_a.site, b or sae_b.site, res.perm, mse, mse_enc, cos, res.solver,
                      res.seconds)


# ---- pairs ------------------------------------------------------------------------------------
def consecutive_pairs(sites: Iterable[Site], kind: str = "res") -> list[tuple[Site, Site]]:
    """(L/kind, L+1/kind) for every L where both sites exist."""
    have = {s for s in sites if s.kind == kind}
    return [(s, Site(s.layer + 1, kind)) for s in sorted(have) if Site(s.layer + 1, kind) in have]


def parse_pairs(spec: str | None) -> list[tuple[Site, Site]]:
    """``"3/res:7/res,12/res:13/res"`` -> [(3/res, 7/res), (12/res, 13/res)]."""
    out = []
    for part in (spec or "").split(","):
        part = part.strip()
        if not part:
            continue
        if part.count(":") != 1:
            raise ValueError(f"--pairs: {part!r} is not A:B (e.g. 3/res:7/res)")
        a, b = part.split(":")
        out.append((Site.parse(a.strip()), Site.parse(b.strip())))
    return out


def span_pairs(starts: Iterable[int], max_distance: int, layers: Iterable[int],
               kind: str = "res") -> list[tuple[Site, Site]]:
    """(s, s+d) for d = 2..max_distance (d = 1 is a consecutive pair) within ``layers``."""
    have = set(layers)
    return [(Site(s, kind), Site(s + d, kind)) for s in starts
            for d in range(2, max_distance + 1) if s in have and s + d in have]


# ---- the store --------------------------------------------------------------------------------
def default_out(suite) -> Path:
    from saeflow.models import cache_dir
    return cache_dir() / "permutations" / suite.name


def _fingerprint(suite, site: Site) -> str:
    """What a stored pair depends on: the SAE's files (size, mtime) or, in memory, its bytes."""
    path = suite.paths.get(site)
    h = hashlib.sha1(str(site).encode())
    if path is None:
        sae = suite[site]
        for t in (sae.W_enc, sae.W_dec, sae.b_enc, sae.threshold):
            if t is not None:
                h.update(t.detach().float().contiguous().numpy().tobytes())
    else:
        p = Path(path)
        for f in sorted(p.iterdir()) if p.is_dir() else [p]:
            if f.is_file():
                st = f.stat()
                h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


class PermutationStore:
    """Stored permutations of one suite under one config (module docstring, "Storage").
    ``read_only`` (the viewer): nothing is written, cleared or computed; a pair that is not
    stored under these settings is missing (``get`` raises ``KeyError``)."""

    def __init__(self, suite, config: PermutationConfig = PermutationConfig(),
                 out_dir: str | Path | None = None, read_only: bool = False):
        self.suite, self.config, self.read_only = suite, config, read_only
        self.root = Path(out_dir) if out_dir is not None else default_out(suite)
        self.folder = self.root / config.tag
        self._prints: dict[Site, str] = {}
        self._cache: dict[tuple[Site, Site], PairResult] = {}
        self._stale = False
        self._open()

    def _settings(self) -> dict:
        return {"schema": SCHEMA, "suite": self.suite.name, "config": asdict(self.config)}

    def _open(self) -> None:
        path = self.folder / SETTINGS_JSON
        if self.read_only:
            self._stale = not path.exists() or json.loads(path.read_text()) != self._settings()
            return
        if path.exists():
            old = json.loads(path.read_text())
            if old != self._settings():
                print(f"saeflow: {self.folder} was computed with other settings; "
                      "recomputing it")
                shutil.rmtree(self.folder)
        if not path.exists():
            write_json_atomic(path, self._settings())

    def fingerprint(self, site: Site) -> str:
        """A hash of what the SAE at ``site`` is (its files, or its weights in memory)."""
        if site not in self._prints:
            self._prints[site] = _fingerprint(self.suite, site)
        return self._prints[site]

    def _paths(self, a: Site, b: Site) -> tuple[Path, Path]:
        stem = self.folder / "pairs" / f"{a.slug}__{b.slug}"
        return stem.with_suffix(".npy"), stem.with_suffix(".json")

    def stored(self, a: Site, b: Site) -> PairResult | None:
        npy, meta = self._paths(a, b)
        if self._stale or not meta.exists() or not npy.exists():
            return None
        info = json.loads(meta.read_text())
        if info.get("fingerprints") != [self.fingerprint(a), self.fingerprint(b)]:
            return None  # the SAE files changed since
        perm = torch.from_numpy(np.load(npy).astype(np.int64))
        return PairResult(a, b, perm, info["mse"], info["mse_enc"], info["mean_cos"],
                          info["solver"], info["seconds"])

    def get(self, a: Site | str, b: Site | str) -> PairResult:
        """The pair's permutation, computed and stored now if it is missing."""
        a, b = Site.parse(a), Site.parse(b)
        if (a, b) in self._cache:
            return self._cache[(a, b)]
        res = self.stored(a, b)
        if res is None and self.read_only:
            raise KeyError(f"the permutation {a} -> {b} is not stored in {self.folder}")
        if res is None:
            if a not in self.suite or b not in self.suite:
                missing = [str(s) for s in (a, b) if s not in self.suite]
                raise KeyError(f"suite {self.suite.name!r} has no SAE at {', '.join(missing)}")
            res = match_pair(self.suite[a], self.suite[b], self.config, a, b)
            npy, meta = self._paths(a, b)
            npy.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(npy) as tmp:
                np.save(tmp, res.perm.numpy().astype(np.int32))
            write_json_atomic(meta, {"a": str(a), "b": str(b), "mse": res.mse,
                                     "mse_enc": res.mse_enc, "mean_cos": res.mean_cos,
                                     "solver": res.solver, "seconds": res.seconds,
                                     "fingerprints": [self.fingerprint(a), self.fingerprint(b)]})
        self._cache[(a, b)] = res
        return res

    def compute(self, pairs: Sequence[tuple[Site, Site]], progress: bool = True
                ) -> list[PairResult]:
        from tqdm.auto import tqdm
        return [self.get(a, b) for a, b in tqdm(pairs, desc=f"permutations {self.config.tag}",
                                                unit="pair", disable=not progress)]

    def chain(self, layers: Sequence[int], kind: str = "res") -> Tensor:
        """P(layers[0] -> layers[-1]) composed from consecutive stored pairs along ``layers``."""
        sites = [Site(L, kind) for L in layers]
        return compose([self.get(x, y).perm for x, y in zip(sites, sites[1:])])

    def composed(self, start: int, end: int, kind: str = "res") -> Tensor:
        """P(start -> end) composed over every layer in between."""
        if end <= start:
            raise ValueError(f"composition needs end > start, got {start} -> {end}")
        return self.chain(list(range(start, end + 1)), kind)


def composition_agreement(store: PermutationStore, starts: Iterable[int], max_distance: int,
                          kind: str = "res", progress: bool = True) -> list[AgreementRow]:
    """For each start layer s and d = 1..max_distance: direct P(s -> s+d) vs the composition of
    the consecutive ones (d = 1 agrees by definition and is listed as the reference)."""
    from tqdm.auto import tqdm
    layers = {s.layer for s in store.suite.sites(kind)}
    jobs = [(s, s + d) for s in starts for d in range(1, max_distance + 1)
            if s in layers and all(L in layers for L in range(s, s + d + 1))]
    if not jobs:
        raise ValueError(f"no spans: start layers {sorted(starts)} with distances up to "
                         f"{max_distance} need {kind} SAEs at every layer in between")
    rows = []
    for s, e in tqdm(jobs, desc="composition", unit="span", disable=not progress):
        direct = store.get(Site(s, kind), Site(e, kind))
        comp = store.composed(s, e, kind)
        mse_c = folded_mse(store.suite[Site(s, kind)], store.suite[Site(e, kind)], comp)[0]
        rows.append(AgreementRow(s, e, e - s, float((direct.perm == comp).float().mean()),
                                 direct.mse, mse_c))
    return rows


# ---- tables -----------------------------------------------------------------------------------
def pair_table(results: Sequence[PairResult]) -> str:
    lines = [f"{'A':>8} {'B':>8} {'folded MSE':>11} {'MSE enc':>10} {'mean cos':>9} "
             f"{'solver':>18} {'s':>6}"]
    for r in results:
        lines.append(f"{str(r.a):>8} {str(r.b):>8} {r.mse:11.4g} {r.mse_enc:10.4g} "
                     f"{r.mean_cos:9.3f} {r.solver:>18} {r.seconds:6.1f}")
    return "\n".join(lines)


def agreement_table(rows: Sequence[AgreementRow]) -> str:
    lines = [f"{'start':>5} {'end':>4} {'dist':>4} {'agreement':>9} {'MSE direct':>11} "
             f"{'MSE composed':>12}"]
    for r in rows:
        lines.append(f"{r.start:5d} {r.end:4d} {r.distance:4d} {r.agreement:9.3f} "
                     f"{r.mse_direct:11.4g} {r.mse_composed:12.4g}")
    return "\n".join(lines)
