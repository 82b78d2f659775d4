"""Steering magnitudes: the per-feature multiplier of a raw steering vector (Laptev et al.,
ICML 2025, sec. 6; method.md section 6; the steering itself is ``saeflow.steer``).

Magnitudes (the paper only says folding can set them; saeflow makes the unit explicit):
  - ``res_norm`` (default of the CLI): ``v`` is rescaled to the typical residual-stream norm of
    the feature's layer (median token norm on corpus text, first token excluded: SmolLM2 puts
    ~27,000 there against 50-700 elsewhere). A coefficient is then a fraction of the residual
    stream, comparable across layers whose norms grow with depth, and across SAE families whose
    decoder rows are not unit norm. att_z rows are measured in the residual basis (through W_O).
  - ``activation``: the feature's mean activation on tokens where it fires (raw ``v``), so
    ``s = 1`` adds the feature at its typical strength; features that never fire on the sample
    take the median of their site's firing features.
  - ``theta``: the JumpReLU threshold, i.e. the folded decoder row (Mechanistic Permutability).
  - ``none``: raw ``v``, as Neuronpedia's steering does.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from saeflow.configs import MAGNITUDES
from saeflow.sites import Feature, Site


def feature_magnitudes(lm, suite, features: Iterable[Feature], how: str = "res_norm",
                       texts: Sequence[str] | None = None,
                       max_tokens: int = 64) -> dict[Feature, float]:
    """Per-feature multipliers of the raw steering vector (see the module docstring)."""
    if how not in MAGNITUDES:
        raise ValueError(f"unknown magnitude {how!r}; known: {', '.join(MAGNITUDES)}")
    feats = sorted({Feature.parse(f) for f in features})
    if how == "none":
        return {f: 1.0 for f in feats}
    if how == "theta":
        out = {}
        for f in feats:
            sae = suite[f.site]
            if sae.activation != "jumprelu":
                raise ValueError(f"theta magnitudes need JumpReLU SAEs; the SAE at {f.site} is "
                                 f"{sae.activation}")
            out[f] = float(sae.threshold[f.index])
        return out
    if not texts:
        raise ValueError(f"{how} magnitudes are measured on text; pass some texts")
    from saeflow.themes import text_states
    if how == "res_norm":
        layers = sorted({f.layer for f in feats})
        norms: dict[int, list[Tensor]] = {layer: [] for layer in layers}
        for _, states, _ in text_states(lm, texts, [Site(layer, "res") for layer in layers],
                                        max_tokens):
            for site, h_TD in states.items():
                norms[site.layer].append(h_TD.float().norm(dim=-1))
        med = {layer: float(torch.cat(v).median()) for layer, v in norms.items()}
        return {f: med[f.layer] / _residual_norm(lm, suite, f) for f in feats}
    sites = sorted({f.site for f in feats})
    sums = {s: torch.zeros(suite[s].d_sae) for s in sites}
    counts = {s: torch.zeros(suite[s].d_sae) for s in sites}
    for _, states, _ in text_states(lm, texts, sites, max_tokens):
        for site, h_TD in states.items():
            acts_TF = suite[site].encode(h_TD.float())
            sums[site] += acts_TF.sum(0)
            counts[site] += (acts_TF > 0).sum(0)
    out = {}
    for f in feats:
        s, c = sums[f.site], counts[f.site]
        typical = s / c.clamp_min(1)
        fallback = float(typical[c > 0].median()) if (c > 0).any() else 1.0
        out[f] = float(typical[f.index]) if c[f.index] > 0 else fallback
    return out


def _residual_norm(lm, suite, feature: Feature) -> float:
    v = suite[feature.site].steering_vectors()[feature.index].float()
    if feature.kind == "att_z":
        v = lm.att_z_to_residual(feature.layer, v[None])[0].float()
    n = float(v.norm())
    if n == 0:
        raise ValueError(f"feature {feature} has a zero decoder row; it cannot be steered")
    return n
