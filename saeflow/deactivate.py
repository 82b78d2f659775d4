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
       random5     one of the top-5 drawn uniformly (seeded);
       permutation one-to-one LAP matching (``saeflow.match.permutation_match``);
       pearson     top-1 Pearson correlation of activations on separate texts (data baseline);
       exhaustive  an oracle: every active feature of the site is tried alone, the one that
                   lowers z most counts (the paper's "exhaustive search" ceiling).
     (target, kind, strategy) is a *pair* when at least one named predecessor is active there.
  4. Deactivate only at that token: at the predecessor's site ``h <- h + (r - 1) * sum a_j v_j``
     (a_j its activation, v_j its row of ``SAE.steering_vectors()``), recompute block L only
     and re-encode R_L. success: z_new == 0; activation change: 1 - z_new / z_old.

Batching (all exact): only block L is recomputed, called directly with the keyword arguments
(rotary embeddings, mask) the model itself passes it, captured once per length. Attention is
causal, so an R_{L-1} edit at token t needs one batch row holding the clean prefix [0..t]; an
M_L or A_L edit needs only token t, with the attention output set to its clean value (plus the
edit). One edited row serves every target that reads it (all active targets at that token),
and strategies naming the same active predecessors share rows. Each layer first checks that
an unedited row reproduces the model's own R_L.

Choices where the paper is silent: only active predecessors are deactivated (inactive ones
contribute nothing); random5 draws among all five, active or not, and counts only when the
drawn one is active; permutation is skipped for att_z sites (their decoders live in another
basis) and for sites of another width; pearson has no answer for targets that never fire on
the correlation texts; each pair counts once in "all kinds". ``max_pairs`` drops whole target
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
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from saeflow.hooks import BlockRerun, editing, recording, run_sites
from saeflow.sites import Feature, Site

STRATEGIES = ("top1", "top5", "random5", "permutation", "pearson", "exhaustive")
KIND_ORDER = ("res", "mlp", "att")


@dataclass(frozen=True)
class DeactivationConfig:
    layers: tuple[int, ...] = (6, 12, 18)
    strategies: tuple[str, ...] = STRATEGIES
    rs: tuple[float, ...] = (0.0,)
    tokens_per_text: int = 5
    max_len: int = 64  # tokens per text (longer texts are cut)
    max_pairs: int | None = None  # over all layers, split evenly
    top_k: int = 5
    corr_tokens: int = 4096  # tokens for the Pearson baseline
    batch_tokens: int = 8192  # edited rows x prefix length per block call
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))
        object.__setattr__(self, "strategies", tuple(self.strategies))
        object.__setattr__(self, "rs", tuple(float(x) for x in self.rs))
        if not self.layers or min(self.layers) < 1:
            raise ValueError(f"deactivate: layers must be >= 1 (layer L needs R_(L-1)), got "
                             f"{list(self.layers)}")
        bad = [s for s in self.strategies if s not in STRATEGIES]
        if bad or not self.strategies:
            raise ValueError(f"deactivate: unknown strategies {bad}; known: "
                             f"{', '.join(STRATEGIES)}")
        if not self.rs:
            raise ValueError("deactivate: give at least one r")
        for name in ("tokens_per_text", "top_k", "corr_tokens", "batch_tokens"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"deactivate: {name} must be >= 1, got {getattr(self, name)}")
        if self.max_len < 2:
            raise ValueError("deactivate: max_len must be >= 2 (position 0 is never sampled)")
        if self.max_pairs is not None and self.max_pairs < 1:
            raise ValueError(f"deactivate: max_pairs must be >= 1, got {self.max_pairs}")


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


class SummaryRow(NamedTuple):
    strategy: str
    r: float
    layer: str  # a layer number or "all"
    kind: str  # res | mlp | att | all
    n: int
    success_rate: float
    mean_change: float
    median_change: float  # robust to targets that barely fired (z_old near 0)
    oracle_success_rate: float  # the exhaustive oracle on the same pairs (nan if not run)
    oracle_mean_change: float


@dataclass
class DeactivationResult:
    pairs: list[PairOutcome]
    summary: list[SummaryRow]
    info: dict  # settings, per-layer counts, notes, recompute check, timings


class Edit(NamedTuple):
    """Add ``delta`` [width] to the hidden state of ``site`` at one token of one text."""
    text: int
    position: int
    site: Site
    delta: Tensor


# ---- pure functions ---------------------------------------------------------------------
def edit_delta(acts_P: Tensor, vectors_PD: Tensor, r: float) -> Tensor:
    """``(r - 1) * sum_j a_j v_j``: rescale features with activations ``a`` by ``r``."""
    return (r - 1.0) * (acts_P.to(vectors_PD.dtype) @ vectors_PD)


def pearson_top1(x_NT: Tensor, y_NF: Tensor, block: int = 1024) -> tuple[Tensor, Tensor]:
    """For each column of ``x`` the column of ``y`` with the highest Pearson correlation over
    the N rows: (values [T], indices [T]); index -1 where x's column is constant."""
    x = x_NT.float() - x_NT.float().mean(0)
    y = y_NF.float() - y_NF.float().mean(0)
    xs, ys = x.norm(dim=0), y.norm(dim=0)
    yn = torch.where(ys > 0, 1.0 / ys.clamp_min(1e-30), torch.zeros_like(ys))
    vals, idx = [], []
    for i in range(0, x.shape[1], block):
        C = (x[:, i:i + block].T @ y) * yn  # [b, F], still to divide by |x|
        C = C / xs[i:i + block, None].clamp_min(1e-30)
        C[:, ys == 0] = -math.inf
        v, j = C.max(dim=1)
        vals.append(v.float())
        idx.append(j)
    v, j = torch.cat(vals), torch.cat(idx)
    dead = (xs == 0) | (ys > 0).sum().eq(0)
    return torch.where(dead, torch.nan, v), torch.where(dead, -1, j)


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
        o = [oracle.get(key(p)) for p in g]
        o_ok = all(x is not None for x in o)
        rows.append(SummaryRow(
            *k, n=len(g), success_rate=sum(p.success for p in g) / len(g),
            mean_change=float(np.mean(change)), median_change=float(np.median(change)),
            oracle_success_rate=sum(x.success for x in o) / len(g) if o_ok else math.nan,
            oracle_mean_change=float(np.mean([x.change for x in o])) if o_ok else math.nan))
    return rows


# ---- running block L on edited prefixes -------------------------------------------------
def _adder(b_idx: Tensor, t_idx: Tensor, delta_ND: Tensor):
    def fn(h):
        h = h.clone()
        h[b_idx, t_idx] = h[b_idx, t_idx] + delta_ND.to(h.dtype)
        return h
    return fn


def _setter(value_BD: Tensor):
    """Replace a one-token hidden state [B, 1, width] by ``value``."""
    return lambda h: value_BD[:, None].to(h.dtype)


def _chunks(order: list[int], cost, budget: int) -> list[list[int]]:
    """Split ``order`` into runs whose ``len(run) * cost(last)`` stays within ``budget``."""
    out, cur = [], []
    for i in order:
        if cur and (len(cur) + 1) * cost(i) > budget:
            out.append(cur)
            cur = []
        cur.append(i)
    return out + [cur] if cur else out


@torch.no_grad()
def iter_edited_acts(lm, prev_hidden: Sequence[Tensor], edits: Sequence[Edit], layer: int, sae,
                     batch_tokens: int = 8192, progress: bool = False
                     ) -> Iterator[tuple[Tensor, Tensor]]:
    """Target-SAE activations at R_``layer`` after each edit, in batches: yields
    (edit indices [B], acts [B, F]). ``prev_hidden[text]`` is the clean input of block
    ``layer`` [T, d]; edits sit at ``layer-1/res`` or at ``layer``'s mlp / att / att_z.

    An edit of R_{L-1} at token t changes what token t attends with, so its row holds the clean
    prefix [0..t]. An edit of A_L, M_L or the o_proj input changes nothing before it in block L,
    so its row is token t alone, with the attention output (or o_proj input) set to its clean
    value plus the edit: only the rest of the block is recomputed."""
    from tqdm.auto import tqdm

    for e in edits:
        if not (e.site == Site(layer - 1, "res")
                or (e.site.layer == layer and e.site.kind in ("mlp", "att", "att_z"))):
            raise ValueError(f"edit at {e.site} cannot feed {layer}/res directly; edits must be "
                             f"at {layer - 1}/res or at {layer}/mlp, att or att_z")
    run, dev, dt = BlockRerun(lm, layer), lm.device, lm.dtype
    att, att_z = Site(layer, "att"), Site(layer, "att_z")
    pre = sorted((i for i, e in enumerate(edits) if e.site.kind == "res"),
                 key=lambda i: (edits[i].position, edits[i].text))
    batches = [("res", b) for b in _chunks(pre, lambda i: edits[i].position + 1, batch_tokens)]
    for kind in ("mlp", "att", "att_z"):
        one = [i for i, e in enumerate(edits) if e.site.kind == kind]
        batches += [(kind, b) for b in _chunks(one, lambda i: 1, batch_tokens)]
    clean: dict[int, dict[Site, Tensor]] = {}  # text -> clean attention outputs [T, width]
    for text in sorted({edits[i].text for k, b in batches if k != "res" for i in b}):
        with recording(lm, [att, att_z]) as rec:
            run(prev_hidden[text][None])
        clean[text] = {s: v[0] for s, v in rec.items()}
    for kind, batch in tqdm(batches, desc=f"layer {layer} edits", disable=not progress,
                            leave=False):
        es = [edits[i] for i in batch]
        delta = torch.stack([e.delta for e in es]).to(dev)
        if kind == "res":
            T = es[-1].position + 1
            h = torch.zeros(len(es), T, prev_hidden[0].shape[-1], dtype=dt, device=dev)
            for b, e in enumerate(es):
                h[b, :e.position + 1] = prev_hidden[e.text][:e.position + 1]
            t_idx = torch.tensor([e.position for e in es], device=dev)
            h[torch.arange(len(es), device=dev), t_idx] += delta.to(dt)
            hooks = {}
        else:
            T, t_idx = 1, torch.zeros(len(es), dtype=torch.long, device=dev)
            h = torch.stack([prev_hidden[e.text][e.position] for e in es])[:, None]

            def at(site):
                return torch.stack([clean[e.text][site][e.position] for e in es]).to(dev)
            hooks = ({att_z: _setter(at(att_z) + delta)} if kind == "att_z" else
                     {att: _setter(at(att) + delta)} if kind == "att" else
                     {att: _setter(at(att)), Site(layer, "mlp"): _adder(
                         torch.arange(len(es), device=dev), t_idx, delta)})
        run.prepare(T)  # before the edit hooks exist: the capture pass must run clean
        with editing(lm, hooks):
            out = run(h)
        x = out[torch.arange(len(es), device=dev), t_idx]
        yield torch.tensor(batch), sae.encode(x).float().cpu()


@torch.no_grad()
def block_inputs(lm, ids: Sequence[Tensor], layer: int) -> list[Tensor]:
    """The clean input of block ``layer`` for each text (its R_{layer-1}), [T, d] each."""
    out = []
    for x in ids:
        out.append(run_sites(lm, x[None], [Site(layer - 1, "res")])[Site(layer - 1, "res")][0])
    return out


def edited_target_acts(lm, ids: Sequence[Tensor], edits: Sequence[Edit], layer: int, sae,
                       batch_tokens: int = 8192) -> Tensor:
    """Target-SAE activations [n_edits, F] at R_``layer`` after each edit (batched path)."""
    prev = block_inputs(lm, ids, layer)
    out = torch.zeros(len(edits), sae.d_sae)
    for idx, acts in iter_edited_acts(lm, prev, edits, layer, sae, batch_tokens):
        out[idx] = acts
    return out


@torch.no_grad()
def naive_target_acts(lm, ids: Sequence[Tensor], edit: Edit, layer: int, sae) -> Tensor:
    """Reference: one full forward pass of the whole text with the edit hooked in, [F]."""
    target = Site(layer, "res")
    fn = _adder(torch.tensor([0]), torch.tensor([edit.position]), edit.delta[None])
    with editing(lm, {edit.site: fn}), recording(lm, [target]) as rec:
        lm.model(input_ids=ids[edit.text][None].to(lm.device), use_cache=False)
    return sae.encode(rec[target][0, edit.position]).float().cpu()


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


def predecessor_sites(suite, layer: int) -> dict[str, Site]:
    """The source sites of ``layer/res`` that the suite has SAEs for, by kind."""
    out = {}
    for kind, site in (("res", Site(layer - 1, "res")), ("mlp", Site(layer, "mlp")),
                       ("att", Site(layer, "att")), ("att", Site(layer, "att_z"))):
        if kind not in out and site in suite:
            out[kind] = site
    return out


def _batched_sites(lm, ids, sites, batch=8):
    """Yield (first text index, {site: [B, T, d]}) over right-padded batches of texts."""
    for i in range(0, len(ids), batch):
        chunk = ids[i:i + batch]
        T = max(len(x) for x in chunk)
        inp = torch.zeros(len(chunk), T, dtype=torch.long)
        mask = torch.zeros(len(chunk), T, dtype=torch.long)
        for b, x in enumerate(chunk):
            inp[b, :len(x)], mask[b, :len(x)] = x, 1
        yield i, run_sites(lm, inp, sites, attention_mask=mask.to(lm.device))


def _fingerprint(cfg, layer, suite, ids, corr_ids) -> str:
    h = hashlib.sha1(json.dumps([asdict(cfg), layer, str(suite.name), str(suite.root)],
                                default=str).encode())
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


def _candidates(lm, suite, layer, present, corr, cfg, notes):
    """Per kind and strategy, the named predecessors of each present target: [P, m] int64,
    -1 where a strategy has no answer (None for exhaustive: every active feature). Also the
    residual-basis unit decoders of the targets [P, d] and of each source site."""
    from saeflow.match import cosine_topk, permutation_match, residual_decoder

    tgt = Site(layer, "res")
    sae_t = suite[tgt]
    U_t = residual_decoder(suite, tgt, lm).float()[present]
    rng = np.random.default_rng([cfg.seed, layer])
    x_corr = None
    if "pearson" in cfg.strategies:
        x_corr = sae_t.encode(corr[tgt]).float()[:, present]
        if (silent := int((x_corr.amax(0) <= 0).sum())):
            notes.append(f"layer {layer}: {silent} of {len(present)} targets never fire on the "
                         f"correlation texts (no pearson predecessor)")
    cands, U_p = {}, {}
    for kind, site in predecessor_sites(suite, layer).items():
        sae = suite[site]
        U_p[kind] = U = residual_decoder(suite, site, lm).float()
        k = min(cfg.top_k, U.shape[0])
        top = cosine_topk(U_t, U, k=k).indices.numpy()
        c = {"top1": top[:, :1], "top5": top, "exhaustive": None,
             "random5": top[np.arange(len(top)), rng.integers(0, k, len(top))][:, None]}
        if "permutation" in cfg.strategies:
            if site.kind == "att_z" or (sae.d_sae, sae.d_in) != (sae_t.d_sae, sae_t.d_in):
                notes.append(f"layer {layer}: no permutation match for {kind} ({site} has width "
                             f"{sae.d_sae}, basis {site.kind}; {tgt} has {sae_t.d_sae})")
            else:
                c["permutation"] = permutation_match(sae_t, sae).perm.numpy()[present][:, None]
        if x_corr is not None:
            c["pearson"] = pearson_top1(x_corr, sae.encode(corr[site]).float())[1].numpy()[:, None]
        cands[kind] = {s: c[s] for s in cfg.strategies if s in c}
    return cands, U_t, U_p


def _pair_specs(occ, pos_of, cands, A_p, cap, rng, notes, layer):
    """(sample, target, kind, strategy, deactivated features) for every pair, at most ``cap``
    of them, dropping whole target occurrences at random."""
    by_occ = []
    for s, j in occ:
        specs = []
        for kind, cs in cands.items():
            a = A_p[kind][s]
            for strat, c in cs.items():
                named = np.flatnonzero(a > 0) if c is None else c[pos_of[j]]
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


def _run_layer(lm, suite, layer, samples, prev, rows, corr, cfg, cap, progress):
    tgt, notes = Site(layer, "res"), []
    sae_t, sites = suite[tgt], predecessor_sites(suite, layer)
    check = _recompute_error(lm, prev, samples, rows[tgt], layer)  # fail before the real work
    A_t = sae_t.encode(rows[tgt]).float().numpy()  # [S, Ft]
    occ = np.argwhere(A_t > 0)  # [n_occ, 2]: (sample, target) of every target occurrence
    present = np.unique(occ[:, 1])
    if not len(present):
        raise ValueError(f"deactivate: no feature of {tgt} is active at any sampled token; "
                         f"check that the suite's SAEs fit the model")
    pos_of = {int(j): i for i, j in enumerate(present)}
    A_p = {k: suite[s].encode(rows[s]).float().numpy() for k, s in sites.items()}
    V_p = {k: suite[s].steering_vectors().float() for k, s in sites.items()}  # [F, width]
    t0 = time.perf_counter()
    cands, U_t, U_p = _candidates(lm, suite, layer, torch.from_numpy(present), corr, cfg, notes)
    t1 = time.perf_counter()
    specs, n_occ = _pair_specs(occ.tolist(), pos_of, cands, A_p, cap,
                               np.random.default_rng([cfg.seed, layer, 1]), notes, layer)
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
    order = np.argsort(row, kind="stable")
    z = np.full(len(row), np.nan)
    for idx, acts in iter_edited_acts(lm, prev, edits, layer, sae_t, cfg.batch_tokens, progress):
        lo, hi = (np.searchsorted(row[order], idx.numpy(), side) for side in ("left", "right"))
        for b in range(len(idx)):
            pr = order[lo[b]:hi[b]]
            z[pr] = acts[b].numpy()[tgt_idx[pr]]
    t2 = time.perf_counter()
    best = {}  # per pair the probe that lowered the target most (the only one but exhaustive)
    for p in np.lexsort((z, pid)):
        best.setdefault(int(pid[p]), int(p))
    out = []
    for i, ((s, j, kind, strat, _), r) in enumerate(meta):
        m = members[row[best[i]]]
        z_old, z_new = float(A_t[s, j]), float(z[best[i]])
        out.append(PairOutcome(
            layer, kind, strat, r, samples[s][0], samples[s][1], str(Feature(tgt, j)),
            ";".join(str(Feature(sites[kind], q)) for q in m),
            max(float(U_t[pos_of[j]] @ U_p[kind][q]) for q in m),
            z_old, z_new, 1.0 - z_new / z_old, z_new <= 0.0))
    info = {"sites": {k: str(s) for k, s in sites.items()}, "samples": len(samples),
            "target_occurrences": n_occ, "pairs": len(meta), "edited_rows": len(edits),
            "recompute_error": check, "match_seconds": round(t1 - t0, 2),
            "rerun_seconds": round(t2 - t1, 2), "notes": notes}
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


def _collect_corr(lm, suite, corr_ids, layers, n_tokens):
    """Hidden states of every needed site at up to ``n_tokens`` tokens (never position 0)."""
    need = _needed_sites(suite, layers)
    acc: dict[Site, list] = {s: [] for s in need}
    n = 0
    for i, hs in _batched_sites(lm, corr_ids, need):
        for b in range(hs[need[0]].shape[0]):
            end = min(len(corr_ids[i + b]), n_tokens - n + 1)
            for s in need:
                acc[s].append(hs[s][b, 1:end].float().cpu())
            n += max(end - 1, 0)
        if n >= n_tokens:
            break
    return {s: torch.cat(v) for s, v in acc.items()}


def run_deactivation(lm, suite, ids: Sequence[Tensor], corr_ids: Sequence[Tensor] | None,
                     cfg: DeactivationConfig, checkpoint_dir: str | Path | None = None,
                     progress: bool = True) -> DeactivationResult:
    """The experiment over token-id sequences ``ids`` (``corr_ids``: separate texts for the
    Pearson baseline). With ``checkpoint_dir`` each finished layer is saved there and a re-run
    with the same settings and texts resumes."""
    import time

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
    fps = {L: _fingerprint(cfg, L, suite, ids, corr_ids) for L in cfg.layers}
    done = {}
    for L in cfg.layers:
        f = ckpt / f"layer-{L}.json" if ckpt else None
        if f and f.exists() and (data := json.loads(f.read_text())).get("fingerprint") == fps[L]:
            done[L] = ([PairOutcome(*p) for p in data["pairs"]], data["info"])
    todo = [L for L in cfg.layers if L not in done]
    if todo:
        prev, rows = _collect(lm, suite, ids, samples, todo)
        corr = (_collect_corr(lm, suite, corr_ids, todo, cfg.corr_tokens)
                if "pearson" in cfg.strategies else {})
        cap = None if cfg.max_pairs is None else -(-cfg.max_pairs // len(cfg.layers))
        for L in tqdm(todo, desc="layers", disable=not progress):
            t0 = time.perf_counter()
            pairs, info = _run_layer(lm, suite, L, samples, prev[L], rows, corr, cfg, cap, progress)
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
