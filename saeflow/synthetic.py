"""Synthetic suites with planted lineage, and planted permutations, with known answers.

A planted suite has SAEs at ``L/res``, ``L/mlp`` and ``L/att`` whose decoder rows are built so
that the lineage of every residual feature is known ("Analyze Feature Flow" sec. 3.2):
  - translated: a noised copy of one feature of R_{L-1};
  - processed_mlp / _att / _both: a feature of R_{L-1} mixed with one of M_L and/or A_L;
  - newborn_mlp / _att / _both: a noised copy of a feature of M_L and/or A_L (no R parent);
  - unexplained: a fresh random direction.
Parents are drawn without replacement, the residual SAE's rows are shuffled, and decoder rows
get random norms (matching must normalise). Layer 0 has no R_{-1}, so its R-parented shares go
to the corresponding newborn classes (translated to unexplained).

``planted_suite(..., lazy=True)`` builds SAEs on first access and keeps only the last few in
memory, so a Gemma Scope 2B 16k-shaped suite (26 layers x 3 sites, 16384 x 2304) stays within
about 1-2 GB while an atlas walks it layer by layer.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from saeflow.lineage import CLASSES
from saeflow.sae import SAE
from saeflow.sites import Site
from saeflow.suite import Suite

DEFAULT_FRACTIONS = {"translated": 0.35, "processed_mlp": 0.10, "processed_att": 0.08,
                     "processed_both": 0.05, "newborn_mlp": 0.14, "newborn_att": 0.08,
                     "newborn_both": 0.05, "unexplained": 0.15}
# (has R parent, has M parent, has A parent) per class
_PARENTS = {"translated": (1, 0, 0), "processed_mlp": (1, 1, 0), "processed_att": (1, 0, 1),
            "processed_both": (1, 1, 1), "newborn_mlp": (0, 1, 0), "newborn_att": (0, 0, 1),
            "newborn_both": (0, 1, 1), "unexplained": (0, 0, 0)}
_LAYER0 = {"translated": "unexplained", "processed_mlp": "newborn_mlp",
           "processed_att": "newborn_att", "processed_both": "newborn_both"}
_KIND_SALT = {"res": 11, "mlp": 23, "att": 37}


@dataclass
class PlantedTruth:
    """Ground truth per layer: class codes (indices into ``lineage.CLASSES``) of the residual
    features and their planted parents (index, or -1 when the class has no such parent)."""
    classes: dict[int, np.ndarray] = field(default_factory=dict)  # [F_res] uint8
    parent_res: dict[int, np.ndarray] = field(default_factory=dict)  # [F_res] into R_{L-1}
    parent_mlp: dict[int, np.ndarray] = field(default_factory=dict)  # [F_res] into M_L
    parent_att: dict[int, np.ndarray] = field(default_factory=dict)  # [F_res] into A_L


def _unit(x: Tensor) -> Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


class _Planter:
    """Deterministic generator of a planted suite's decoders, layer by layer."""

    def __init__(self, n_layers, widths, d_model, fractions, noise, seed, keep):
        self.n_layers, self.widths, self.d, self.seed = n_layers, widths, d_model, seed
        self.noise, self.keep = noise, keep
        self.fractions = {**DEFAULT_FRACTIONS, **(fractions or {})}
        bad = set(self.fractions) - set(CLASSES)
        if bad:
            raise ValueError(f"unknown lineage classes in fractions: {sorted(bad)}")
        total = sum(self.fractions.values())
        if total <= 0 or any(v < 0 for v in self.fractions.values()):
            raise ValueError(f"fractions must be non-negative and not all zero: {self.fractions}")
        self.truth = PlantedTruth()
        for layer in range(n_layers):
            self._structure(layer)
        self._units: OrderedDict[tuple[int, str], Tensor] = OrderedDict()

    def _structure(self, layer: int) -> None:
        rng = np.random.default_rng([self.seed, layer, 7])
        F = self.widths["res"]
        fr = dict(self.fractions)
        if layer == 0:
            for cls, to in _LAYER0.items():
                fr[to] += fr.pop(cls)
        names = [c for c in CLASSES if fr.get(c, 0) > 0]
        p = np.array([fr[c] for c in names], dtype=np.float64)
        counts = np.floor(p / p.sum() * F).astype(int)
        counts[np.argmax(p)] += F - counts.sum()
        codes = np.concatenate([np.full(n, CLASSES.index(c), np.uint8)
                                for c, n in zip(names, counts)])
        codes = codes[rng.permutation(F)]  # the residual SAE's rows come shuffled
        parents = []
        for slot, kind in enumerate(("res", "mlp", "att")):
            need = np.array([_PARENTS[CLASSES[c]][slot] for c in codes], dtype=bool)
            out = np.full(F, -1, dtype=np.int64)
            width = self.widths[kind]
            if need.sum() > width:
                raise ValueError(f"layer {layer}: {need.sum()} residual features need a {kind} "
                                 f"parent but the {kind} SAE has only {width} features")
            out[need] = rng.choice(width, size=int(need.sum()), replace=False)
            parents.append(out)
        self.truth.classes[layer] = codes
        self.truth.parent_res[layer], self.truth.parent_mlp[layer], self.truth.parent_att[
            layer] = parents

    def _gen(self, layer: int, kind: str, salt: int = 0) -> torch.Generator:
        return torch.Generator().manual_seed(
            (self.seed * 1_000_003 + layer * 101 + _KIND_SALT[kind] + salt) % 2 ** 63)

    def units(self, layer: int, kind: str) -> Tensor:
        """Unit decoder rows [F, d] of one site (cached, least recently used dropped)."""
        key = (layer, kind)
        if key in self._units:
            self._units.move_to_end(key)
            return self._units[key]
        if kind != "res":
            out = _unit(torch.randn(self.widths[kind], self.d, generator=self._gen(layer, kind)))
        else:
            out = self._residual(layer)
        self._units[key] = out
        while len(self._units) > self.keep:
            self._units.popitem(last=False)
        return out

    def _residual(self, layer: int) -> Tensor:
        codes = self.truth.classes[layer]
        F, d = self.widths["res"], self.d
        g = self._gen(layer, "res")
        out = _unit(torch.randn(F, d, generator=g))  # unexplained rows stay random
        noise = _unit(torch.randn(F, d, generator=g)) * self.noise
        mix = torch.zeros(F, d)
        for slot, kind in enumerate(("res", "mlp", "att")):
            par = [self.truth.parent_res, self.truth.parent_mlp, self.truth.parent_att][slot][layer]
            has = torch.as_tensor(par >= 0)
            if not has.any():
                continue
            src = self.units(layer - 1, "res") if kind == "res" else self.units(layer, kind)
            weight = 1.0 if kind == "res" else 0.8
            mix[has] += weight * src[torch.as_tensor(par[par >= 0])]
        planted = torch.as_tensor(codes != CLASSES.index("unexplained"))
        out[planted] = _unit(mix[planted] + noise[planted])
        return out

    def sae(self, site: Site) -> SAE:
        u = self.units(site.layer, site.kind)
        g = self._gen(site.layer, site.kind, salt=5)
        norms = 0.5 + 1.5 * torch.rand(len(u), generator=g)
        W_dec = u * norms[:, None]
        W_enc = (u / norms[:, None]).T  # a transposed view: no second copy
        return SAE(W_enc=W_enc, b_enc=torch.zeros(len(u)), W_dec=W_dec,
                   b_dec=torch.zeros(self.d), activation="relu", site=site,
                   source=f"<planted {site}>")


@dataclass
class PlantedSuite(Suite):
    """A suite whose SAEs are generated on first access (see ``planted_suite``)."""
    planter: _Planter | None = field(default=None, repr=False)

    def __getitem__(self, site):
        site = Site.parse(site)
        if site not in self.paths:
            raise KeyError(f"suite {self.name!r} has no SAE at {site}; it has: "
                           f"{', '.join(map(str, self.sites()))}")
        return self.planter.sae(site)


def planted_suite(n_layers: int = 4, width: int = 512, d_model: int = 128, *,
                  widths: dict[str, int] | None = None, fractions: dict[str, float] | None = None,
                  noise: float = 0.45, seed: int = 0, lazy: bool = False,
                  name: str = "planted") -> tuple[Suite, PlantedTruth]:
    """A suite with planted lineage (module docstring) and its ground truth. ``widths``
    overrides the width per kind (``res``, ``mlp``, ``att``); ``noise`` is the norm of the
    random direction added to each planted unit mix (0.45 gives translated cosines ~0.9)."""
    if n_layers < 1 or width < 1 or d_model < 1:
        raise ValueError("n_layers, width and d_model must be positive")
    widths = {"res": width, "mlp": width, "att": width, **(widths or {})}
    planter = _Planter(n_layers, widths, d_model, fractions, noise, seed, keep=6 if lazy else 10**9)
    sites = [Site(layer, kind) for layer in range(n_layers) for kind in ("res", "mlp", "att")]
    if lazy:
        suite = PlantedSuite(paths={s: None for s in sites}, model=None, name=name,
                             planter=planter)
    else:
        suite = Suite.from_saes({s: planter.sae(s) for s in sites}, name=name)
    suite.info = {"planted": {"n_layers": n_layers, "widths": widths, "d_model": d_model,
                              "noise": noise, "seed": seed}}
    return suite, planter.truth


def gemma_shaped_suite(n_layers: int = 26, seed: int = 0) -> tuple[Suite, PlantedTruth]:
    """Planted suite with Gemma Scope 2B 16k's shape: 26 layers x (res, mlp, att), 16384 x 2304,
    generated lazily."""
    return planted_suite(n_layers, 16384, 2304, seed=seed, lazy=True, name="planted-gemma-16k")


# ---- planted permutations ---------------------------------------------------------------------
def jumprelu_sae(width: int, d_model: int, seed: int = 0) -> SAE:
    """A random JumpReLU SAE with unit-ish decoder rows of random norms and positive thresholds."""
    g = torch.Generator().manual_seed(seed)
    W_dec = _unit(torch.randn(width, d_model, generator=g)) * (0.5 + torch.rand(width, 1,
                                                                             generator=g))
    W_enc = W_dec.T * (0.5 + torch.rand(1, width, generator=g))
    return SAE(W_enc=W_enc.contiguous(), b_enc=-0.1 * torch.rand(width, generator=g),
               W_dec=W_dec, b_dec=0.01 * torch.randn(d_model, generator=g), activation="jumprelu",
               threshold=0.05 + 0.5 * torch.rand(width, generator=g), source="<jumprelu>")


def permuted_copy(sae: SAE, seed: int = 0, noise: float = 0.05,
                  rescale: bool = True) -> tuple[SAE, Tensor]:
    """A copy of a JumpReLU ``sae`` with shuffled features, small noise on its rows, and (with
    ``rescale``) each feature rescaled by c_i (encoder / c_i, decoder * c_i, threshold / c_i,
    the same function). Returns ``(copy, perm)`` with perm[i] = the copy's index of feature i."""
    g = torch.Generator().manual_seed(seed)
    F = sae.d_sae
    perm = torch.randperm(F, generator=g)
    c = torch.exp(torch.randn(F, generator=g) * 0.5) if rescale else torch.ones(F)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(F)  # inv[j] = the original feature placed at j

    def jitter(x: Tensor) -> Tensor:
        return x + noise * x.norm(dim=-1, keepdim=True) / x.shape[-1] ** 0.5 * torch.randn(
            x.shape, generator=g)

    W_dec = jitter(sae.W_dec[inv]) * c[inv][:, None]
    W_enc = jitter(sae.W_enc[:, inv].T).T / c[inv]
    thr = None if sae.threshold is None else sae.threshold[inv] / c[inv]
    return sae.replace(W_enc=W_enc.contiguous(), b_enc=sae.b_enc[inv] / c[inv], W_dec=W_dec,
                       threshold=thr, source="<permuted copy>"), perm
