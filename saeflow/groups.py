"""Activation-based lineage groups ("Analyze Feature Flow", appendix A.1), beside the
weight-based classes of ``saeflow.lineage``.

Steps, for each layer L with a residual SAE:
  1. Every residual feature f of R_L has top-1 predecessors by decoder cosine in R_{L-1}, M_L
     and A_L (from an atlas, or matched here), and scores s(R), s(M), s(A) (those cosines).
  2. Tokens are sampled from texts: ``tokens_per_text`` (5, as the paper) per text, uniformly
     among the usable tokens (``saeflow.tokens.usable_tokens`` at every residual site used:
     never position 0, never an outlier norm).
  3. Each SAE encodes its site at those tokens. An *occurrence* is a feature f of R_L active
     at a sampled token; its group is the set of its top-1 predecessors active at the same
     token: R, M, A, R+M, R+A, M+A, R+M+A, or "from nowhere" (none of them active).
  4. For each score (s(R), s(M), s(A)) and each pair of groups with at least ``min_group``
     members, a two-sided Mann-Whitney U test (scipy) of the score's distributions in the two
     groups (scores rounded to 1e-6: finer differences are fp32 noise). The paper reports the share of tests with p < 0.001; so does ``share_significant``.
Choices where the paper is silent: the tests are run twice, on occurrences (a feature that
fires at several sampled tokens counts each time, as the paper's groups are per activation) and
on features (a feature counts once per group it falls in), since occurrences of one feature
are not independent samples; a layer without a source site never sets that bit and skips that
score's tests; groups are compared pairwise, with no correction for multiple tests (the share
itself is the summary).
"""

from __future__ import annotations

import itertools
import json
import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from saeflow.configs import GroupsConfig  # noqa: F401  (defined there without torch)
from saeflow.sites import Site
from saeflow.tokens import usable_tokens

__all__ = ["GROUPS", "GroupsConfig", "GroupResult", "LayerGroups", "activation_groups",
           "group_codes", "group_texts", "mann_whitney_tests"]

KINDS = ("res", "mlp", "att")
# group name of each code 4 * R + 2 * M + A (bits: predecessor active in R_{L-1}, M_L, A_L)
GROUPS = ("from nowhere", "A", "M", "M+A", "R", "R+A", "R+M", "R+M+A")


# ---- pure functions ---------------------------------------------------------------------------
def group_codes(target_NF: Tensor, sources: dict[str, Tensor], predecessors: dict[str, Tensor]
                ) -> tuple[Tensor, Tensor, Tensor]:
    """Occurrences and their groups. ``target_NF``: activations of R_L at N tokens;
    ``sources[kind]``: activations [N, F_kind] of that source site at the same tokens;
    ``predecessors[kind]``: the top-1 predecessor [F] of each R_L feature there. Returns
    ``(token [M], feature [M], code [M])`` for the M active (token, feature) pairs, code
    indexing ``GROUPS``; a kind missing from ``sources`` never counts as active."""
    tok, feat = (target_NF > 0).nonzero(as_tuple=True)
    code = torch.zeros(len(tok), dtype=torch.long)
    for bit, kind in zip((4, 2, 1), KINDS):
        if kind in sources:
            active = sources[kind][tok, predecessors[kind].to(torch.long)[feat]] > 0
            code += bit * active.long()
    return tok, feat, code


def mann_whitney_tests(codes: np.ndarray, scores: dict[str, np.ndarray], min_group: int = 20,
                       alpha: float = 0.001) -> list[dict]:
    """Two-sided Mann-Whitney U tests of each score between every pair of groups with at least
    ``min_group`` members (NaN scores dropped). One dict per test: score, a, b, n_a, n_b, U,
    p, median_a, median_b, significant (p < alpha)."""
    from scipy.stats import mannwhitneyu

    codes = np.asarray(codes)
    out = []
    for kind, s in scores.items():
        s = np.round(np.asarray(s, np.float64), 6)  # below 1e-6, fp32 cosines are noise
        members = {g: s[(codes == g) & np.isfinite(s)] for g in range(len(GROUPS))}
        big = [g for g in range(len(GROUPS)) if len(members[g]) >= min_group]
        for a, b in itertools.combinations(big, 2):
            x, y = members[a], members[b]
            if np.ptp(np.concatenate([x, y])) == 0:
                u, p = len(x) * len(y) / 2.0, 1.0  # all tied: no difference to find
            else:
                u, p = mannwhitneyu(x, y, alternative="two-sided")
            out.append({"score": kind, "a": GROUPS[a], "b": GROUPS[b], "n_a": len(x),
                        "n_b": len(y), "U": float(u), "p": float(p),
                        "median_a": float(np.median(x)), "median_b": float(np.median(y)),
                        "significant": bool(p < alpha)})
    return out


def _share(tests: list[dict]) -> float:
    return sum(t["significant"] for t in tests) / len(tests) if tests else math.nan


# ---- results ------------------------------------------------------------------------------------
@dataclass
class LayerGroups:
    layer: int
    sources: dict[str, str]  # kind -> site
    occurrences: dict[str, int]  # group -> active (token, feature) pairs
    features: dict[str, int]  # group -> distinct features that fall in it at least once
    medians: dict[str, dict[str, float]]  # group -> score kind -> median over occurrences
    tests: list[dict] = field(default_factory=list)  # on occurrences
    feature_tests: list[dict] = field(default_factory=list)  # on features

    @property
    def share_significant(self) -> float:
        return _share(self.tests)

    @property
    def feature_share_significant(self) -> float:
        return _share(self.feature_tests)


@dataclass
class GroupResult:
    layers: dict[int, LayerGroups]
    info: dict

    @property
    def share_significant(self) -> float:
        """Share of the occurrence tests, over all layers, with p < alpha."""
        return _share([t for g in self.layers.values() for t in g.tests])

    @property
    def feature_share_significant(self) -> float:
        return _share([t for g in self.layers.values() for t in g.feature_tests])

    def to_json(self) -> dict:
        return {"schema": "saeflow.groups/1", "info": self.info,
                "share_significant": self.share_significant,
                "feature_share_significant": self.feature_share_significant,
                "layers": {str(L): {**asdict(g), "share_significant": g.share_significant,
                                    "feature_share_significant": g.feature_share_significant}
                           for L, g in self.layers.items()}}

    def save(self, path: str | Path) -> Path:
        from saeflow.io import write_json_atomic
        path = Path(path)
        write_json_atomic(path, json.loads(json.dumps(self.to_json(), default=float)))
        return path

    def table(self) -> str:
        """Group shares (% of occurrences) per layer and the shares of significant tests."""
        head = "layer " + " ".join(f"{g:>12}" for g in GROUPS) + "  sig(occ)  sig(feat)"
        lines = [head]
        for L, g in sorted(self.layers.items()):
            n = max(sum(g.occurrences.values()), 1)
            shares = " ".join(f"{100 * g.occurrences[x] / n:11.1f}%" for x in GROUPS)
            lines.append(f"{L:>5} {shares}  {_pct(g.share_significant):>8}  "
                         f"{_pct(g.feature_share_significant):>9}")
        n_occ = sum(len(g.tests) for g in self.layers.values())
        n_feat = sum(len(g.feature_tests) for g in self.layers.values())
        lines.append(f"all: {_pct(self.share_significant)} of {n_occ} occurrence tests and "
                     f"{_pct(self.feature_share_significant)} of {n_feat} feature tests have "
                     f"p < {self.info['settings']['alpha']:g}")
        return "\n".join(lines)


def _pct(x: float) -> str:
    return "-" if not math.isfinite(x) else f"{100 * x:.1f}%"


# ---- the experiment -----------------------------------------------------------------------------
def group_texts(source: str | None = None, n: int = 250, seed: int = 0) -> list[str]:
    """``n`` texts for the experiment: the bundled corpus' held-out split (or both splits of a
    user's file or folder), shuffled with ``seed``."""
    from saeflow.corpus import load_texts
    texts = (load_texts(split="heldout") if source is None else
             load_texts(source, split="train") + load_texts(source, split="heldout"))
    random.Random(seed).shuffle(texts)
    return texts[:n]


def _sources(suite, layer: int) -> dict[str, Site]:
    cands = [("res", Site(layer - 1, "res"))] if layer > 0 else []
    cands += [("mlp", Site(layer, "mlp")), ("att", Site(layer, "att")),
              ("att", Site(layer, "att_z"))]
    out = {}
    for kind, site in cands:
        if kind not in out and site in suite:
            out[kind] = site
    return out


def _predecessors(suite, lm, layer: int, sources: dict[str, Site], atlas):
    """Top-1 predecessor index [F] and cosine [F] of each R_L feature, per kind."""
    if atlas is not None and layer in atlas.layers:
        return {k: (torch.tensor(np.array(atlas.column(layer, f"pred_{k}_idx")[:, 0]),
                                 dtype=torch.long),
                    np.asarray(atlas.column(layer, f"pred_{k}_cos")[:, 0], np.float64))
                for k in sources if atlas.column(layer, f"pred_{k}_idx") is not None}
    from saeflow.match import cosine_topk, residual_decoder
    target = residual_decoder(suite, Site(layer, "res"))
    out = {}
    for kind, site in sources.items():
        top = cosine_topk(target, residual_decoder(suite, site, lm), k=1)
        out[kind] = (top.indices[:, 0].long(), top.values[:, 0].numpy().astype(np.float64))
    return out


@torch.no_grad()
def _collect(lm, suite, texts, sites: list[Site], res_sites: list[Site], cfg: GroupsConfig,
             progress: bool) -> dict[Site, Tensor]:
    """Hidden states [N, d] of every site at the sampled tokens (same tokens for all)."""
    from tqdm.auto import tqdm

    from saeflow.hooks import run_sites
    ids = []
    for t in texts:
        if isinstance(t, Tensor):
            x = t.reshape(-1)[:cfg.max_len].long()
        else:
            x = lm.tokenizer(t, return_tensors="pt", truncation=True,
                             max_length=cfg.max_len)["input_ids"][0]
        if len(x) >= 2:
            ids.append(x)
    if not ids:
        raise ValueError("groups: no text has at least 2 tokens")
    g = torch.Generator().manual_seed(cfg.seed)
    rows: dict[Site, list[Tensor]] = {s: [] for s in sites}
    for i in tqdm(range(0, len(ids), cfg.batch), desc="groups: texts", unit="batch",
                  disable=not progress):
        chunk = ids[i:i + cfg.batch]
        T = max(len(x) for x in chunk)
        inp = torch.zeros(len(chunk), T, dtype=torch.long)
        mask = torch.zeros(len(chunk), T, dtype=torch.long)
        for b, x in enumerate(chunk):
            inp[b, :len(x)], mask[b, :len(x)] = x, 1
        hs = run_sites(lm, inp, sites, attention_mask=mask.to(lm.device))
        for b, x in enumerate(chunk):
            ok = torch.ones(len(x), dtype=torch.bool)
            for s in res_sites:
                ok &= usable_tokens(hs[s][b, :len(x)].float().cpu())
            cand = ok.nonzero()[:, 0]
            pick = cand[torch.randperm(len(cand), generator=g)[:cfg.tokens_per_text]].sort().values
            for s in sites:
                rows[s].append(hs[s][b, pick].float().cpu())
    return {s: torch.cat(v) for s, v in rows.items()}


def activation_groups(lm, suite, texts: Sequence[str | Tensor],
                      cfg: GroupsConfig = GroupsConfig(), *, atlas=None,
                      progress: bool = True) -> GroupResult:
    """The experiment (module docstring) on ``texts`` (strings, or token id tensors).
    Predecessors come from ``atlas`` when given (its stored top-1 matches), else they are
    matched here."""
    for L in cfg.layers:
        if Site(L, "res") not in suite:
            raise ValueError(f"groups: suite {suite.name!r} has no SAE at {L}/res")
        if not _sources(suite, L):
            raise ValueError(f"groups: suite {suite.name!r} has none of {L - 1}/res, {L}/mlp, "
                             f"{L}/att for layer {L}")
    srcs = {L: _sources(suite, L) for L in cfg.layers}
    res_sites = sorted({Site(L, "res") for L in cfg.layers})
    sites = sorted(set(res_sites) | {s for v in srcs.values() for s in v.values()})
    states = _collect(lm, suite, texts, sites, res_sites, cfg, progress)
    acts = {s: suite[s].encode(states[s]) for s in sites}
    layers = {}
    for L in cfg.layers:
        preds = _predecessors(suite, lm, L, srcs[L], atlas)
        tok, feat, code = group_codes(acts[Site(L, "res")], {k: acts[s] for k, s in
                                                             srcs[L].items()},
                                      {k: v[0] for k, v in preds.items()})
        f, c = feat.numpy(), code.numpy()
        scores = {k: v[1][f] for k, v in preds.items()}
        pairs = np.unique(np.stack([f, c], 1), axis=0) if len(f) else np.zeros((0, 2), int)
        fscores = {k: v[1][pairs[:, 0]] for k, v in preds.items()}
        layers[L] = LayerGroups(
            layer=L, sources={k: str(s) for k, s in srcs[L].items()},
            occurrences={g: int((c == i).sum()) for i, g in enumerate(GROUPS)},
            features={g: int((pairs[:, 1] == i).sum()) for i, g in enumerate(GROUPS)},
            medians={g: {k: (float(np.median(s[c == i])) if (c == i).any() else math.nan)
                         for k, s in scores.items()} for i, g in enumerate(GROUPS)},
            tests=mann_whitney_tests(c, scores, cfg.min_group, cfg.alpha),
            feature_tests=mann_whitney_tests(pairs[:, 1], fscores, cfg.min_group, cfg.alpha))
    info = {"settings": asdict(cfg), "suite": suite.name, "model": getattr(lm, "name", None),
            "texts": len(texts), "tokens": int(len(next(iter(states.values())))),
            "predecessors": "atlas" if atlas is not None else "matched (top-1 decoder cosine)"}
    return GroupResult(layers, info)
