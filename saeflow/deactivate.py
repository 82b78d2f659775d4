"""Causal validation of feature matches by deactivation (Feature Flow paper, section 5 of
method.md): do the matched predecessors of a residual feature actually feed it?

Steps, for each target layer L (L >= 1):
  1. One clean forward pass over the evaluation texts (stopping after the last target layer)
     keeps the input of block L (= R_{L-1}) for every text, and the hidden states of R_{L-1},
     M_L, A_L and R_L at sampled tokens (``tokens_per_text`` per text, never position 0).
  2. Each site's SAE encodes the sampled tokens. Every active feature z of R_L at a sampled
     token is a target occurrence.
  3. Each strategy names the predecessor(s) of z at each kind of source site
     (res = R_{L-1}, mlp = M_L, att = A_L or its att_z SAE):
       top1        top-1 decoder cosine (``saeflow.match.cosine_topk`` on residual-basis rows);
       top5        the top-5 by cosine, all removed at once;
       random5     one of the top-5 drawn uniformly (seeded): a *weak-match* baseline (the
                   2nd-5th best matches), not chance;
       random_active  one active feature of the source site drawn uniformly (seeded): the
                   chance level of a single-feature deactivation;
       permutation one-to-one LAP matching (``saeflow.match.permutation_match``);
       pearson     top-1 Pearson correlation of activations on separate texts (data baseline;
                   ``saeflow.correlate``, streamed over ``corr_tokens`` tokens, default 100k,
                   keeping only the targets' columns; fewer than 100k is flagged underpowered);
       exhaustive  an oracle: every active feature of the site is tried alone, the one that
                   lowers z most counts (the paper's "exhaustive search" ceiling).
     (target, kind, strategy) is a *pair* when at least one named predecessor is active there.
  4. Deactivate only at that token: at the predecessor's site ``h <- h + (r - 1) * sum a_j v_j``
     (a_j its activation, v_j its row of ``SAE.steering_vectors()``), recompute block L only
     and re-encode R_L. success: z_new == 0; activation change: 1 - z_new / z_old;
     pre-activation drop: 1 - p_new / p_old with p the target's encoder pre-activation (before
     ReLU / TopK / JumpReLU), which shows how far a TopK latent was pushed even when it stays
     in the top k, so TopK and JumpReLU suites compare.

Batching (exact; ``saeflow.block_edits``): only block L is recomputed, on edited rows (a clean
prefix for an R_{L-1} edit, one token for an M_L or A_L edit); one edited row serves every
target that reads it, and strategies naming the same active predecessors share rows.

Choices where the paper is silent: only active predecessors are deactivated (inactive ones
contribute nothing); random5 draws among all five, active or not, and counts only when the
drawn one is active; random_active draws anew for each pair (its single-feature rows
coincide with the oracle's, so it costs nothing extra when the oracle runs); permutation is
skipped for att_z sites (their decoders live in another basis) and for sites of another width;
pearson has no answer for targets that never fire on the correlation texts; each pair counts
once in "all kinds". ``max_pairs`` drops whole target
occurrences at random so every strategy is compared on the same targets. The summary also gives,
beside each strategy, what the exhaustive oracle reaches on the same (target, kind) pairs (its
ceiling). Matches come from ``saeflow.match`` directly rather than from a stored atlas, which
keeps only the top-1; only the targets that occur are matched, so this is cheap.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from saeflow.compute import pad_batch
from saeflow.configs import POWER_TOKENS, STRATEGIES, DeactivationConfig
from saeflow.block_edits import (Edit, block_inputs, edit_delta, edited_target_acts,
                                 iter_edited_acts, naive_target_acts)
from saeflow.correlate import StreamingPearson, pearson_top1
from saeflow.hooks import BlockRerun, run_sites
from saeflow.sites import Feature, Site
from saeflow.sources import source_sites as predecessor_sites

__all__ = ["STRATEGIES", "DeactivationConfig", "DeactivationResult", "Edit", "PairOutcome",
           "SummaryRow", "block_inputs", "edit_delta", "edited_target_acts", "iter_edited_acts",
           "naive_target_acts", "pearson_top1", "run_deactivation", "summarize", "tokenize_texts"]

RESULT_VERSION = 2  # bumped when pairs change meaning or fields (checkpoints of others are redone)
KIND_ORDER = ("res", "mlp", "att")


class PairOutcome(NamedTuple):
    layer: int
    kind: str  # res | mlp | att
    strategy: str
    r: float
    text: int
    position: int
    target: str  # e.g. 12/res/4111
    predecessors: str  # the deactivated features, ";"-separated
    cos: float  # decoder cosine of target and its best-matching deactivated predecessor
    z_old: float
    z_new: float
    change: float  # 1 - z_new / z_old
    success: bool  # z_new == 0
    pre_drop: float = math.nan  # 1 - p_new / p_old, p the target's encoder pre-activation


class SummaryRow(NamedTuple):
    strategy: str
    r: float
    layer: str  # a layer number or "all"
    kind: str  # res | mlp | att | all
    n: int
    success_rate: float
    mean_change: float
    median_change: float  # robust to targets that barely fired (z_old near 0)
    mean_pre_drop: float  # mean of 1 - p_new / p_old (pre-activations; NaN if not measured)
    oracle_success_rate: float  # the exhaustive oracle on the same pairs (nan if not run)
    oracle_mean_change: float


@dataclass
class DeactivationResult:
    pairs: list[PairOutcome]
    summary: list[SummaryRow]
    info: dict  # settings, per-layer counts, notes, recompute check, timings


# ---- pure functions ---------------------------------------------------------------------
def summarize(pairs: Sequence[PairOutcome]) -> list[SummaryRow]:
    """Success rate and activation change per strategy and r, per layer x kind, with "all"
    margins; beside each, what the exhaustive oracle reaches on the same (target, kind)."""
    def key(p):
        return p.layer, p.kind, p.text, p.position, p.target, p.r

    oracle = {key(p): p for p in pairs if p.strategy == "exhaustive"}
    groups: dict[tuple, list[PairOutcome]] = {}
    for p in pairs:
        for layer in (str(p.layer), "all"):
            for kind in (p.kind, "all"):
                groups.setdefault((p.strategy, p.r, layer, kind), []).append(p)

    def order(k):
        s, r, layer, kind = k
        return (STRATEGIES.index(s), r, layer == "all", int(layer) if layer != "all" else 0,
                (KIND_ORDER + ("all",)).index(kind))

    rows = []
    for k in sorted(groups, key=order):
        g = groups[k]
        change = [p.change for p in g]
        pre = [p.pre_drop for p in g if not math.isnan(p.pre_drop)]
        o = [oracle.get(key(p)) for p in g]
        o_ok = all(x is not None for x in o)
        rows.append(SummaryRow(
            *k, n=len(g), success_rate=sum(p.success for p in g) / len(g),
            mean_change=float(np.mean(change)), median_change=float(np.median(change)),
            mean_pre_drop=float(np.mean(pre)) if pre else math.nan,
            oracle_success_rate=sum(x.success for x in o) / len(g) if o_ok else math.nan,
            oracle_mean_change=float(np.mean([x.change for x in o])) if o_ok else math.nan))
    return rows


# ---- the experiment ---------------------------------------------------------------------
def tokenize_texts(lm, texts: Sequence[str], max_len: int) -> list[Tensor]:
    """Token ids of each text, cut to ``max_len``; texts shorter than 2 tokens are dropped."""
    out = []
    for t in texts:
        ids = lm.tokenizer(t, return_tensors="pt", truncation=True, max_length=max_len)
        ids = ids["input_ids"][0]
        if len(ids) >= 2:
            out.append(ids)
    return out


def _batched_sites(lm, ids, sites, batch=8):
    """Yield (first text index, {site: [B, T, d]}) over right-padded batches of texts."""
    for i in range(0, len(ids), batch):
        inp, mask = pad_batch([x.tolist() for x in ids[i:i + batch]])
        yield i, run_sites(lm, inp, sites, attention_mask=mask.to(lm.device))


def _fingerprint(cfg, layer, suite, ids, corr_ids, dtype) -> str:
    h = hashlib.sha1(json.dumps([RESULT_VERSION, asdict(cfg), layer, str(suite.name),
                                 str(suite.root), str(dtype)], default=str).encode())
    for x in list(ids) + [torch.tensor([-1])] + list(corr_ids or []):
        h.update(x.numpy().astype(np.int64).tobytes() + b"|")
    return h.hexdigest()


def _recompute_error(lm, prev: Sequence[Tensor], samples, rows_tgt: Tensor, layer: int) -> float:
    """Largest relative difference between R_layer recomputed from block ``layer``'s input
    and the model's own forward pass, over a few samples."""
    run, worst = BlockRerun(lm, layer), 0.0
    for s, (text, t) in enumerate(samples[:8]):
        with torch.no_grad():
            x = run(prev[text][None, :t + 1])[0, t].float().cpu()
        ref = rows_tgt[s].float().cpu()
        worst = max(worst, float((x - ref).norm() / ref.norm().clamp_min(1e-12)))
    tol = 1e-3 if lm.dtype == torch.float32 else 5e-2
    if worst > tol:
        raise RuntimeError(f"deactivate: calling block {layer} of {lm.name} directly does not "
                           f"reproduce the model's own forward pass (relative error {worst:.2e}); "
                           f"the batched path does not support this architecture")
    return worst


def _candidates(lm, suite, layer, present, pearson, cfg, notes):
    """Per kind and strategy, the named predecessors of each present target: [P, m] int64,
    -1 where a strategy has no answer ("all" for exhaustive: every active feature; "draw" for
    random_active: one of them at random). Also the residual-basis unit decoders of the
    targets [P, d] and of each source site. ``pearson``: per kind, top-1 indices [P]."""
    from saeflow.match import cosine_topk, permutation_match, residual_decoder

    tgt = Site(layer, "res")
    sae_t = suite[tgt]
    U_t = residual_decoder(suite, tgt, lm).float()[present]
    rng = np.random.default_rng([cfg.seed, layer])
    cands, U_p = {}, {}
    for kind, site in predecessor_sites(suite, layer).items():
        sae = suite[site]
        U_p[kind] = U = residual_decoder(suite, site, lm).float()
        k = min(cfg.top_k, U.shape[0])
        top = cosine_topk(U_t, U, k=k).indices.numpy()
        c = {"top1": top[:, :1], "top5": top, "exhaustive": "all", "random_active": "draw",
             "random5": top[np.arange(len(top)), rng.integers(0, k, len(top))][:, None]}
        if "permutation" in cfg.strategies:
            if site.kind == "att_z" or (sae.d_sae, sae.d_in) != (sae_t.d_sae, sae_t.d_in):
                notes.append(f"layer {layer}: no permutation match for {kind} ({site} has width "
                             f"{sae.d_sae}, basis {site.kind}; {tgt} has {sae_t.d_sae})")
            else:
                c["permutation"] = permutation_match(sae_t, sae).perm.numpy()[present][:, None]
        if kind in pearson:
            c["pearson"] = pearson[kind][:, None]
        cands[kind] = {s: c[s] for s in cfg.strategies if s in c}
    return cands, U_t, U_p


def _pair_specs(occ, pos_of, cands, A_p, cap, rng, notes, layer, draw_rng):
    """(sample, target, kind, strategy, deactivated features) for every pair, at most ``cap``
    of them, dropping whole target occurrences at random."""
    by_occ = []
    for s, j in occ:
        specs = []
        for kind, cs in cands.items():
            a = A_p[kind][s]
            on = np.flatnonzero(a > 0)
            for strat, c in cs.items():
                if isinstance(c, str):
                    named = on if c == "all" or not len(on) else on[[draw_rng.integers(len(on))]]
                else:
                    named = c[pos_of[j]]
                act = tuple(sorted({int(p) for p in named if p >= 0 and a[p] > 0}))
                if act:
                    specs.append((s, j, kind, strat, act))
        by_occ.append(specs)
    total = sum(map(len, by_occ))
    if cap is not None and total > cap:
        keep, n = [], 0
        for i in rng.permutation(len(by_occ)):
            if n + len(by_occ[i]) <= cap:
                keep.append(by_occ[i])
                n += len(by_occ[i])
        notes.append(f"layer {layer}: kept {len(keep)} of {len(by_occ)} target occurrences "
                     f"({n} of {total} pairs, --max-pairs)")
        by_occ = keep
    return [sp for group in by_occ for sp in group], len(by_occ)


def present_targets(suite, layer: int, rows: dict) -> np.ndarray:
    """The target features of ``layer``/res active at some sampled token, sorted."""
    A_t = suite[Site(layer, "res")].encode(rows[Site(layer, "res")]).float()
    return np.flatnonzero((A_t > 0).any(0).numpy())


def probe_values(lm, prev, edits, layer: int, sae, batch_tokens: int, row: np.ndarray,
                 tgt_idx: np.ndarray, progress: bool = False, part: tuple[int, int] | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Re-run block ``layer`` on the edited rows (``iter_edited_acts``; ``part``: some of its
    batches) and read each probe's target: (probe indices, activations, pre-activations) of the
    probes (``row[p]`` the edited row, ``tgt_idx[p]`` the target) whose rows were run."""
    order = np.argsort(row, kind="stable")
    got: list[tuple] = []
    for idx, acts, pa in iter_edited_acts(lm, prev, edits, layer, sae, batch_tokens, progress,
                                          with_pre=True, part=part):
        lo, hi = (np.searchsorted(row[order], idx.numpy(), side) for side in ("left", "right"))
        for b in range(len(idx)):
            pr = order[lo[b]:hi[b]]
            got.append((pr, acts[b].numpy()[tgt_idx[pr]], pa[b].numpy()[tgt_idx[pr]]))
    if not got:
        return np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.float32)
    return tuple(np.concatenate(x) for x in zip(*got))  # type: ignore[return-value]


def _run_layer(lm, suite, layer, samples, prev, rows, pearson, cfg, cap, progress, rerun=None):
    tgt, notes = Site(layer, "res"), list(pearson.get("notes", []))
    sae_t, sites = suite[tgt], predecessor_sites(suite, layer)
    check = _recompute_error(lm, prev, samples, rows[tgt], layer)  # fail before the real work
    P_t = sae_t.pre_acts(rows[tgt]).float()
    A_t = sae_t.activate(P_t).numpy()  # [S, Ft]
    P_t = P_t.numpy()
    occ = np.argwhere(A_t > 0)  # [n_occ, 2]: (sample, target) of every target occurrence
    present = np.unique(occ[:, 1])
    if not len(present):
        raise ValueError(f"deactivate: no feature of {tgt} is active at any sampled token; "
                         f"check that the suite's SAEs fit the model")
    pos_of = {int(j): i for i, j in enumerate(present)}
    A_p = {k: suite[s].encode(rows[s]).float().numpy() for k, s in sites.items()}
    V_p = {k: suite[s].steering_vectors().float() for k, s in sites.items()}  # [F, width]
    t0 = time.perf_counter()
    cands, U_t, U_p = _candidates(lm, suite, layer, torch.from_numpy(present),
                                  pearson.get("top1", {}), cfg, notes)
    t1 = time.perf_counter()
    specs, n_occ = _pair_specs(occ.tolist(), pos_of, cands, A_p, cap,
                               np.random.default_rng([cfg.seed, layer, 1]), notes, layer,
                               np.random.default_rng([cfg.seed, layer, 2]))
    # one edited row per (sample, kind, deactivated set, r); a probe reads one target of a row
    row_of: dict[tuple, int] = {}
    edits, members, probes, meta = [], [], [], []  # probes: (pair id, row, target)
    for spec in specs:
        s, j, kind, strat, act = spec
        for r in cfg.rs:
            meta.append((spec, r))
            for m in ([(p,) for p in act] if strat == "exhaustive" else [act]):
                if (s, kind, m, r) not in row_of:
                    row_of[(s, kind, m, r)] = len(edits)
                    idx = list(m)
                    delta = edit_delta(torch.from_numpy(A_p[kind][s, idx]), V_p[kind][idx], r)
                    edits.append(Edit(samples[s][0], samples[s][1], sites[kind], delta))
                    members.append(m)
                probes.append((len(meta) - 1, row_of[(s, kind, m, r)], j))
    pid, row, tgt_idx = np.asarray(probes, dtype=np.int64).reshape(-1, 3).T
    z, pre = np.full(len(row), np.nan), np.full(len(row), np.nan)
    for p, zs, ps in ([probe_values(lm, prev, edits, layer, sae_t, cfg.batch_tokens, row,
                                    tgt_idx, progress)] if rerun is None else
                      rerun(prev, edits, layer, row, tgt_idx)):
        z[p], pre[p] = zs, ps
    t2 = time.perf_counter()
    best = {}  # per pair the probe that lowered the target most (the only one but exhaustive)
    for p in np.lexsort((pre, z, pid)):
        best.setdefault(int(pid[p]), int(p))
    out = []
    for i, ((s, j, kind, strat, _), r) in enumerate(meta):
        m = members[row[best[i]]]
        z_old, z_new = float(A_t[s, j]), float(z[best[i]])
        p_old, p_new = float(P_t[s, j]), float(pre[best[i]])
        out.append(PairOutcome(
            layer, kind, strat, r, samples[s][0], samples[s][1], str(Feature(tgt, j)),
            ";".join(str(Feature(sites[kind], q)) for q in m),
            max(float(U_t[pos_of[j]] @ U_p[kind][q]) for q in m),
            z_old, z_new, 1.0 - z_new / z_old, z_new <= 0.0,
            1.0 - p_new / p_old if p_old > 0 else math.nan))
    info = {"sites": {k: str(s) for k, s in sites.items()}, "samples": len(samples),
            "target_occurrences": n_occ, "pairs": len(meta), "edited_rows": len(edits),
            "recompute_error": check, "match_seconds": round(t1 - t0, 2),
            "rerun_seconds": round(t2 - t1, 2), "notes": notes}
    if "stats" in pearson:
        info["pearson"] = pearson["stats"]
    return out, info


def _needed_sites(suite, layers) -> list[Site]:
    return sorted({s for L in layers
                   for s in (Site(L, "res"), *predecessor_sites(suite, L).values())})


def _collect(lm, suite, ids, samples, layers):
    """One clean pass: block inputs per text and layer, and every needed site's hidden states
    at the sampled tokens [S, d] (in sample order)."""
    need = _needed_sites(suite, layers)
    prev_sites = sorted({Site(L - 1, "res") for L in layers})
    rows: dict[Site, list] = {s: [] for s in need}
    prev: dict[int, list] = {L: [] for L in layers}
    by_text: dict[int, list[int]] = {}
    for text, t in samples:
        by_text.setdefault(text, []).append(t)
    for i, hs in _batched_sites(lm, ids, sorted(set(need + prev_sites))):
        for b in range(hs[need[0]].shape[0]):
            for s in need:
                rows[s].append(hs[s][b, by_text.get(i + b, [])].float().cpu())
            for L in layers:
                prev[L].append(hs[Site(L - 1, "res")][b, :len(ids[i + b])].clone())
    return prev, {s: torch.cat(v) for s, v in rows.items()}


def pearson_predecessors(lm, suite, corr_ids, present: dict[int, np.ndarray], n_tokens: int,
                         progress: bool = False) -> dict[int, dict]:
    """Per layer: the top-1 Pearson predecessor of each present target at each kind of source
    site (``{"top1": {kind: [P] int64}}``), streamed over up to ``n_tokens`` tokens of
    ``corr_ids`` (never position 0), keeping only the targets' columns; with ``stats`` (tokens,
    how often the targets fire, whether the sample is underpowered) and ``notes``."""
    from tqdm.auto import tqdm

    layers = sorted(present)
    need = _needed_sites(suite, layers)
    acc = {L: {k: StreamingPearson(len(present[L]), suite[s].d_sae)
               for k, s in predecessor_sites(suite, L).items()} for L in layers}
    cols = {L: torch.from_numpy(present[L]) for L in layers}
    n = 0
    bar = tqdm(total=n_tokens, desc="pearson tokens", unit="tok", disable=not progress,
               leave=False)
    for i, hs in _batched_sites(lm, corr_ids, need):
        keep = []  # (batch row, end) of the tokens taken from each text
        for b in range(hs[need[0]].shape[0]):
            end = min(len(corr_ids[i + b]), n_tokens - n + 1)
            if end > 1:
                keep.append((b, end))
                n += end - 1
        if keep:
            def take(site):
                return torch.cat([hs[site][b, 1:end] for b, end in keep]).float().cpu()
            for L in layers:
                x = suite[Site(L, "res")].encode(take(Site(L, "res")))[:, cols[L]]
                for kind, site in predecessor_sites(suite, L).items():
                    acc[L][kind].update(x, suite[site].encode(take(site)))
            bar.update(sum(end - 1 for _, end in keep))
        if n >= n_tokens:
            break
    bar.close()
    out = {}
    for L in layers:
        top1 = {k: a.top1()[1].numpy() for k, a in acc[L].items()}
        fires = next(iter(acc[L].values())).fires.numpy()
        silent = int((fires == 0).sum())
        stats = {"tokens": n, "underpowered": n < POWER_TOKENS, "power_tokens": POWER_TOKENS,
                 "target_fires_median": float(np.median(fires)) if len(fires) else 0.0,
                 "targets_silent": silent}
        notes = []
        if silent:
            notes.append(f"layer {L}: {silent} of {len(fires)} targets never fire on the "
                         f"correlation texts (no pearson predecessor)")
        if n < POWER_TOKENS:
            notes.append(f"layer {L}: pearson on {n:,} correlation tokens (< {POWER_TOKENS:,}): "
                         f"underpowered; the median target fires {stats['target_fires_median']:g}"
                         " times")
        out[L] = {"top1": top1, "stats": stats, "notes": notes}
    return out


def run_deactivation(lm, suite, ids: Sequence[Tensor], corr_ids: Sequence[Tensor] | None,
                     cfg: DeactivationConfig, checkpoint_dir: str | Path | None = None,
                     progress: bool = True, fan_out=None) -> DeactivationResult:
    """The experiment over token-id sequences ``ids`` (``corr_ids``: separate texts for the
    Pearson baseline). With ``checkpoint_dir`` each finished layer is saved there and a re-run
    with the same settings and texts resumes. ``fan_out(key, prev, edits, layer, row,
    tgt_idx)`` (the Ray back end; ``key`` the layer's checkpoint fingerprint) runs a layer's
    block re-runs elsewhere: it yields what ``probe_values`` returns, for parts of them."""
    import time
    from functools import partial

    from tqdm.auto import tqdm

    from saeflow.io import write_json_atomic

    for layer in cfg.layers:
        if layer >= lm.n_layers:
            raise ValueError(f"deactivate: layer {layer} is outside {lm.name} (layers "
                             f"0..{lm.n_layers - 1})")
        if Site(layer, "res") not in suite or not predecessor_sites(suite, layer):
            raise ValueError(f"deactivate: suite {suite.name!r} needs {layer}/res and at least one "
                             f"of {layer - 1}/res, {layer}/mlp, {layer}/att for layer {layer}")
    if not ids:
        raise ValueError("deactivate: no texts with at least 2 tokens")
    if "pearson" in cfg.strategies and not corr_ids:
        raise ValueError("deactivate: the pearson strategy needs separate correlation texts")
    g = torch.Generator().manual_seed(cfg.seed)
    samples = [(i, t) for i, x in enumerate(ids)
               for t in sorted((torch.randperm(len(x) - 1, generator=g)[:cfg.tokens_per_text]
                                + 1).tolist())]
    ckpt = Path(checkpoint_dir) if checkpoint_dir else None
    fps = {L: _fingerprint(cfg, L, suite, ids, corr_ids, lm.dtype) for L in cfg.layers}
    done = {}
    for L in cfg.layers:
        f = ckpt / f"layer-{L}.json" if ckpt else None
        if f and f.exists() and (data := json.loads(f.read_text())).get("fingerprint") == fps[L]:
            done[L] = ([PairOutcome(*p) for p in data["pairs"]], data["info"])
    todo = [L for L in cfg.layers if L not in done]
    if todo:
        prev, rows = _collect(lm, suite, ids, samples, todo)
        corr = {L: {} for L in todo}
        if "pearson" in cfg.strategies:
            present = {L: present_targets(suite, L, rows) for L in todo}
            corr = pearson_predecessors(lm, suite, corr_ids, present, cfg.corr_tokens, progress)
        cap = None if cfg.max_pairs is None else -(-cfg.max_pairs // len(cfg.layers))
        for L in tqdm(todo, desc="layers", disable=not progress):
            t0 = time.perf_counter()
            rerun = None if fan_out is None else partial(fan_out, fps[L])
            pairs, info = _run_layer(lm, suite, L, samples, prev[L], rows, corr[L], cfg, cap,
                                     progress, rerun)
            info["seconds"] = round(time.perf_counter() - t0, 2)
            done[L] = (pairs, info)
            if ckpt:
                write_json_atomic(ckpt / f"layer-{L}.json", {"fingerprint": fps[L], "info": info,
                                                             "pairs": [list(p) for p in pairs]})
    pairs = [p for L in cfg.layers for p in done[L][0]]
    info = {"settings": asdict(cfg), "suite": suite.name, "model": lm.name,
            "texts": len(ids), "corr_texts": len(corr_ids or []), "samples": len(samples),
            "layers": {str(L): done[L][1] for L in cfg.layers}}
    return DeactivationResult(pairs=pairs, summary=summarize(pairs), info=info)
