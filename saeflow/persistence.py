"""How far features persist along composed permutations, and the folding x objective ablation
("Mechanistic Permutability", Balagansky et al., ICLR 2025, secs. 4.2-4.3 and the ablations).

Persistence, for start layers s and distances d = 1..D: sample features of s that fire on the
held-out text, follow each along P(s -> s+d) composed from consecutive permutations
(``PermutationStore.composed``), and measure how alike the feature and its image stay:
  coactivation  the *matching score*: the probability that the two fire together, taken as
                |fires at s AND image fires at s+d| / |either fires| over the evaluated tokens
                (the paper names the score, not its formula; this symmetric form is 1 for a
                feature carried unchanged and ~0 for unrelated sparse features);
  semantic      an automatic stand-in for the paper's LLM judge: each feature is the mean
                sentence embedding (all-MiniLM-L6-v2, offline; any ``embed`` can be passed) of
                its top-k activating contexts (``window`` tokens up to the peak and 2 after),
                and the score is the cosine of the two features' embeddings.
With several starts the features of all of them are also pooled (start ``"all"``).
Each is compared with chance: the same measure for the sampled features against randomly drawn
features of s+d (paired by sample, so the excess has a standard error). Two distances summarise
a curve: ``half`` is the last d before the excess over chance first falls below ``level`` times
its value at d = 1; ``significant`` is the last d before the excess first stops being above 0 by
1.96 standard errors (the paper: semantics "remain significant for about five layers").
  judge         optional: an LLM judge (``saeflow.pair_judge``) rates the first ``judge_pairs``
                sampled pairs per distance SAME / MAYBE / DIFFERENT (3 / 2 / 1) from their
                top contexts (the paper judged Neuronpedia explanations).

Ablation: for every objective (decoder, encoder, both) x folding (on, off), on the same
consecutive pairs: folded MSE, mean matching score (features that fire at t or t+1) and the
explained variance of the permutation estimate (``saeflow.prune``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from saeflow.configs import PersistenceConfig  # noqa: F401  (defined there without torch)
from saeflow.io import save_figure
from saeflow.permutation import OBJECTIVES, PermutationConfig, PermutationStore, prepared
from saeflow.prune import HeldoutStates, explained_variance, mapped_estimator
from saeflow.sites import Site

MEASURES = ("coactivation", "semantic", "judge")
Embedder = Callable[[Sequence[str]], Tensor]  # texts -> [n, D] rows


class PersistenceRow(NamedTuple):
    start: int | str  # a layer, or "all" (features of every start pooled)
    distance: int
    measure: str  # coactivation | semantic
    mean: float  # over the sampled features
    chance: float  # the same measure against random features of s+d
    excess_se: float  # standard error of the paired excess (mean - chance)
    n: int


class AblationRow(NamedTuple):
    objective: str
    fold: bool
    layer: int  # the pair (layer-1, layer)
    mse: float  # folded decoder MSE
    matching_score: float
    explained_variance: float


# ---- pure functions ---------------------------------------------------------------------------
def matching_score(fire_a: Tensor, fire_b: Tensor, target: Tensor) -> Tensor:
    """Per feature i of a: |a_i AND b_target[i]| / |a_i OR b_target[i]| over the rows of the
    boolean firing matrices [N, F]; nan where neither fires."""
    b = fire_b[:, target.long()]
    both = (fire_a & b).sum(0).double()
    either = (fire_a | b).sum(0).double()
    return torch.where(either > 0, both / either.clamp_min(1), torch.full_like(both, math.nan))


def _mean_se(x: Tensor) -> tuple[float, float, int]:
    x = x[~torch.isnan(x)].double()
    n = len(x)
    if n == 0:
        return math.nan, math.nan, 0
    return float(x.mean()), float(x.std() / math.sqrt(n)) if n > 1 else math.nan, n


def persistence_distance(rows: Sequence[PersistenceRow], level: float = 0.5
                         ) -> dict[str, int]:
    """``half`` and ``significant`` distances of one curve (module docstring); rows of one
    start and measure, any order."""
    rs = sorted(rows, key=lambda r: r.distance)
    ex = [r.mean - r.chance for r in rs]
    half = sig = 0
    if rs and rs[0].distance == 1 and ex[0] > 0:
        for r, e in zip(rs, ex):
            if e < level * ex[0]:
                break
            half = r.distance
    for r, e in zip(rs, ex):
        if not (e - 1.96 * (r.excess_se if not math.isnan(r.excess_se) else math.inf) > 0):
            break
        sig = r.distance
    return {"half": half, "significant": sig}


# ---- activations on the held-out states ---------------------------------------------------------
class LayerActivations:
    """Firing masks and top activating tokens of each layer's residual SAE, on demand."""

    def __init__(self, suite, data: HeldoutStates, top_k: int = 5):
        self.suite, self.data, self.top_k = suite, data, top_k
        self._fire: dict[int, Tensor] = {}
        self._top: dict[int, tuple[Tensor, Tensor]] = {}

    @torch.no_grad()
    def _encode(self, layer: int) -> None:
        sae = self.suite[Site(layer, "res")].to(dtype=torch.float32)
        h = self.data.states[layer]
        acts = torch.cat([sae.encode(c) for c in h.split(4096)])
        self._fire[layer] = acts > 0
        k = min(self.top_k, len(acts))
        top = acts.topk(k, dim=0)
        self._top[layer] = (top.values.T.contiguous(), top.indices.T.contiguous())  # [F, k]

    def fire(self, layer: int) -> Tensor:
        if layer not in self._fire:
            self._encode(layer)
        return self._fire[layer]

    def top(self, layer: int) -> tuple[Tensor, Tensor]:
        if layer not in self._top:
            self._encode(layer)
        return self._top[layer]


def _decode(lm, ids: list[int]) -> str:
    """Token ids as text (as words ``t12`` when the model has no tokenizer)."""
    tok = getattr(lm, "tokenizer", None)
    return tok.decode(ids) if tok is not None else "".join(f" t{i}" for i in ids)


class FeatureEmbeddings:
    """Each feature's top contexts as text, and their mean embedding (``embed`` may be None
    when only the texts are wanted), cached per (layer, feature)."""

    def __init__(self, lm, acts: LayerActivations, embed: Embedder | None, window: int = 12):
        self.lm, self.acts, self.embed, self.window = lm, acts, embed, window
        self._rows = torch.cat(acts.data.ids)  # [S, T]
        self._cache: dict[tuple[int, int], Tensor | None] = {}

    def contexts(self, layer: int, f: int, marked: bool = False) -> list[str]:
        """The feature's top contexts (``window`` tokens up to the peak and 2 after); with
        ``marked`` the peak token is wrapped in [[ ]]."""
        vals, idx = self.acts.top(layer)
        out = []
        for v, i in zip(vals[f].tolist(), idx[f].tolist()):
            if v <= 0:
                continue
            seq, pos = self.acts.data.context[i].tolist()
            row = self._rows[seq].tolist()
            parts = [_decode(self.lm, row[max(0, pos - self.window):pos]),
                     _decode(self.lm, row[pos:pos + 1]), _decode(self.lm, row[pos + 1:pos + 3])]
            if marked:
                parts[1] = f"[[{parts[1]}]]"
            out.append("".join(parts))
        return out

    def prepare(self, wanted: Sequence[tuple[int, int]]) -> None:
        texts, owners = [], []
        for key in dict.fromkeys(wanted):
            if key in self._cache:
                continue
            self._cache[key] = None  # stays None when the feature never fired
            for text in self.contexts(*key):
                texts.append(text)
                owners.append(key)
        if not texts:
            return
        emb = self.embed(texts).float()
        emb = emb / emb.norm(dim=1, keepdim=True).clamp_min(1e-12)
        groups: dict[tuple[int, int], list[Tensor]] = {}
        for key, e in zip(owners, emb):
            groups.setdefault(key, []).append(e)
        for key, es in groups.items():
            m = torch.stack(es).mean(0)
            self._cache[key] = m / m.norm().clamp_min(1e-12)

    def similarity(self, layer_a: int, fa: Tensor, layer_b: int, fb: Tensor) -> Tensor:
        """Cosine of the embeddings of features ``fa`` of layer a and ``fb`` of layer b [n]."""
        self.prepare([(layer_a, int(i)) for i in fa] + [(layer_b, int(j)) for j in fb])
        out = []
        for i, j in zip(fa.tolist(), fb.tolist()):
            ea, eb = self._cache[(layer_a, i)], self._cache[(layer_b, j)]
            out.append(math.nan if ea is None or eb is None else float(ea @ eb))
        return torch.tensor(out, dtype=torch.float64)


# ---- persistence ------------------------------------------------------------------------------
def default_starts(layers: Sequence[int], max_distance: int) -> tuple[int, ...]:
    """Four start layers spread over the depth, each with room for at least half the span."""
    ls = sorted(layers)
    room = [L for L in ls if L + max(1, max_distance // 2) <= ls[-1]] or ls[:1]
    picks = {room[round(i * (len(room) - 1) / 3)] for i in range(4)}
    return tuple(sorted(picks))


def run_persistence(lm, suite, store: PermutationStore, data: HeldoutStates,
                    cfg: PersistenceConfig = PersistenceConfig(), embed: Embedder | None = None,
                    judge=None, progress: bool = True) -> tuple[list[PersistenceRow], dict]:
    """Persistence curves per start layer and pooled (module docstring). Returns the rows and
    ``{start: {measure: {"half": d, "significant": d}}}``. ``embed`` defaults to the offline
    sentence embedder when ``cfg.semantic``; ``judge`` is a ``pair_judge.PairJudge`` or None."""
    from tqdm.auto import tqdm

    layers = sorted(data.states)
    starts = cfg.starts or default_starts(layers, cfg.max_distance)
    missing = [s for s in starts if s not in data.states or s + 1 not in data.states]
    if missing:
        raise ValueError(f"persistence: start layers {missing} need recorded residual states at "
                         f"the start and the next layer; recorded: {layers}")
    if cfg.semantic and embed is None:
        from saeflow.themes import sentence_embedder
        embed = sentence_embedder()
    acts = LayerActivations(suite, data, cfg.top_k)
    emb = FeatureEmbeddings(lm, acts, embed if cfg.semantic else None, cfg.window)
    gen = torch.Generator().manual_seed(cfg.seed)
    rows: list[PersistenceRow] = []
    pooled: dict[tuple[int, str], list[tuple[Tensor, Tensor]]] = {}
    for s in tqdm(starts, desc="persistence", unit="start", disable=not progress):
        fire_s = acts.fire(s)
        alive = (fire_s.sum(0) >= cfg.min_fires).nonzero().flatten()
        if len(alive) == 0:
            continue
        feats = alive[torch.randperm(len(alive), generator=gen)[: cfg.n_features]]
        for d in range(1, cfg.max_distance + 1):
            e = s + d
            if any(L not in data.states for L in range(s, e + 1)):
                break
            image = store.composed(s, e)[feats]
            rand = torch.randint(0, suite[Site(e, "res")].d_sae, (len(feats),), generator=gen)
            fire_e = acts.fire(e)
            sub_s = fire_s[:, feats]
            scores = {"coactivation": (matching_score(sub_s, fire_e, image),
                                       matching_score(sub_s, fire_e, rand))}
            if cfg.semantic:
                scores["semantic"] = (emb.similarity(s, feats, e, image),
                                      emb.similarity(s, feats, e, rand))
            if judge is not None:
                scores["judge"] = tuple(torch.tensor(
                    [judge(emb.contexts(s, int(i), True), emb.contexts(e, int(j), True))
                     for i, j in zip(feats[:cfg.judge_pairs], other[:cfg.judge_pairs])],
                    dtype=torch.float64) for other in (image, rand))
            for measure, (x, c) in scores.items():
                rows.append(_row(s, d, measure, x, c))
                pooled.setdefault((d, measure), []).append((x, c))
    for (d, measure), parts in sorted(pooled.items()) if len(starts) > 1 else ():
        x = torch.cat([p[0] for p in parts])
        c = torch.cat([p[1] for p in parts])
        rows.append(_row("all", d, measure, x, c))
    distances: dict = {}
    for start in list(starts) + (["all"] if len(starts) > 1 else []):
        for measure in MEASURES:
            rs = [r for r in rows if r.start == start and r.measure == measure]
            if rs:
                distances.setdefault(str(start), {})[measure] = persistence_distance(rs, cfg.level)
    return rows, distances


def _row(start, d: int, measure: str, x: Tensor, chance: Tensor) -> PersistenceRow:
    ok = ~torch.isnan(x) & ~torch.isnan(chance)
    mean, _, n = _mean_se(x[ok])
    ch, _, _ = _mean_se(chance[ok])
    _, se, _ = _mean_se(x[ok] - chance[ok])
    return PersistenceRow(start, d, measure, mean, ch, se, n)


def persistence_table(rows: Sequence[PersistenceRow], distances: dict) -> str:
    lines = [f"{'start':>5} {'dist':>4} {'measure':>12} {'mean':>7} {'chance':>7} "
             f"{'excess':>7} {'+-1.96se':>8} {'n':>5}"]
    for r in rows:
        lines.append(f"{str(r.start):>5} {r.distance:4d} {r.measure:>12} {r.mean:7.3f} "
                     f"{r.chance:7.3f} {r.mean - r.chance:7.3f} {1.96 * r.excess_se:8.3f} "
                     f"{r.n:5d}")
    for start, per in distances.items():
        for measure, d in per.items():
            lines.append(f"start {start}, {measure}: half-excess distance {d['half']}, "
                         f"significant distance {d['significant']}")
    return "\n".join(lines)


def plot_persistence(rows: Sequence[PersistenceRow], path: str | Path, title: str = "") -> Path:
    """Similarity against distance, one line per start (chance dashed), one panel per measure."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measures = [m for m in MEASURES if any(r.measure == m for r in rows)]
    fig, axes = plt.subplots(1, len(measures), figsize=(5.5 * len(measures), 4), dpi=120,
                             squeeze=False)
    labels = {"coactivation": "matching score (co-activation)",
              "semantic": "context-embedding cosine",
              "judge": "LLM judge (3 same, 2 maybe, 1 different)"}
    for ax, m in zip(axes[0], measures):
        starts = sorted({r.start for r in rows if r.measure == m}, key=lambda s: (s == "all", s))
        for i, s in enumerate(starts):
            rs = sorted((r for r in rows if r.measure == m and r.start == s),
                        key=lambda r: r.distance)
            color = "black" if s == "all" else plt.cm.viridis(i / max(1, len(starts) - 1))
            x = [r.distance for r in rs]
            ax.plot(x, [r.mean for r in rs], marker="o", color=color, lw=2 if s == "all" else 1,
                    label=f"from layer {s}" if s != "all" else "all starts")
            ax.plot(x, [r.chance for r in rs], ls="--", color=color, lw=0.8)
        from matplotlib.ticker import MaxNLocator
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("distance (layers) along composed permutations")
        ax.set_ylabel(labels[m])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title or "Feature persistence over depth (dashed: random features)")
    fig.tight_layout()
    return save_figure(fig, path)


# ---- ablation -----------------------------------------------------------------------------------
def run_ablation(suite, root: str | Path | None, base: PermutationConfig, layers: Sequence[int],
                 data: HeldoutStates, progress: bool = True) -> list[AblationRow]:
    """Folding on/off x objective on the pairs (u-1, u) for u in ``layers`` (module docstring)."""
    from tqdm.auto import tqdm

    acts = LayerActivations(suite, data, top_k=1)
    rows = []
    grid = [(o, f) for o in OBJECTIVES for f in (True, False)]
    for objective, fold in tqdm(grid, desc="ablation", unit="setting", disable=not progress):
        cfg = dataclasses.replace(base, objective=objective, fold=fold)
        store = PermutationStore(suite, cfg, root)
        for u in layers:
            t = u - 1
            res = store.get(Site(t, "res"), Site(u, "res"))
            ms = matching_score(acts.fire(t), acts.fire(u), res.perm)
            st = prepared(suite[Site(t, "res")].to(dtype=torch.float32), fold)
            su = prepared(suite[Site(u, "res")].to(dtype=torch.float32), fold)
            ev = explained_variance(data.states[t], data.states[u],
                                    mapped_estimator(st, su, res.perm))
            rows.append(AblationRow(objective, fold, u, res.mse, _mean_se(ms)[0], ev))
    return rows


def ablation_table(rows: Sequence[AblationRow]) -> str:
    """Means over the layers per (objective, folding)."""
    lines = [f"{'objective':>9} {'folding':>7} {'folded MSE':>11} {'matching':>9} "
             f"{'EV perm':>8} {'layers':>6}"]
    for objective in OBJECTIVES:
        for fold in (True, False):
            rs = [r for r in rows if r.objective == objective and r.fold == fold]
            if not rs:
                continue

            def mean(field):
                return sum(getattr(r, field) for r in rs) / len(rs)
            lines.append(f"{objective:>9} {'on' if fold else 'off':>7} {mean('mse'):11.4g} "
                         f"{mean('matching_score'):9.3f} {mean('explained_variance'):8.3f} "
                         f"{len(rs):6d}")
    return "\n".join(lines)
