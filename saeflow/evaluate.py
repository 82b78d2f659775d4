"""Sweeping steering settings and reporting them without selection bias (method.md section 6,
"Evaluation"; the scores themselves are ``saeflow.scoring``).

A sweep runs in two stages on disjoint prompts *and* seeds (``SweepConfig`` refuses overlap):
  1. selection (``run_sweep``): one cell per (mode, layer, coefficient) plus two baselines,
     "unsteered" and "prompting" (the theme asked for in the prompt, no steering), generated
     from the selection prompts x seeds x samples;
  2. report (``run_heldout``): each mode's best cell (highest mean score in stage 1) and both
     baselines, generated again from the report prompts x report seeds, which no choice saw.
``compare_modes`` reports stage 2 only: mean and standard error per cell, and *paired*
differences against unsteered (and cumulative against single): every cell of a stage draws
from the same random streams (prompt, seed, sample index), so differences are taken per
generation and their standard error is that of the paired differences.
Modes: single and cumulative as ``saeflow.steer`` builds them, and, when both are swept and the
action is activation, "cumulative_norm": the cumulative plan at layer l with all its terms
rescaled so its total added norm equals that of single/l/c. Cumulative adds 4-37 vectors where
single adds 1-3, so only this equal-push comparison separates "more layers" from "more push".
Every cell records its ``added_norm``: the sum over the plan's sites of the norm of the vector
added there (att_z rows in the residual basis), per token. ``compare_modes`` also pools the
paired differences cumulative_norm - single over the whole stage-1 grid (no choice involved).
Coherence is scored under the bare prompt for every cell, the prompting baseline included
(``context_ids``). A configured LLM judge rates a seeded sample of the held-out generations
(``judge_sample``); ``validate_with_judge`` stores the rank correlations of the automatic
scores with the judge's, so the proxies are checked where a judge exists. Results are saved
after every cell (atomically); a re-run skips the cells already done.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from saeflow.scoring import (MIN_TOKENS, Coherence, CoherenceScorer, TopicScorer,  # noqa: F401
                             calibrate_coherence, calibrate_topic, context_free_logprobs,
                             continuation_nll, judge, repetition, snippet, unigram_repetition)
from saeflow.configs import REPORT_PROMPTS, SweepConfig  # noqa: F401  (defined there)
from saeflow.steer import MODES, Generation, SteeringPlan, generate, plan_from_graph

NORM_MODE = "cumulative_norm"
SCORER_VERSION = 3  # bumped when scores change meaning; resuming older results needs --rescore


# ---- results (the sweep settings, SweepConfig, live in saeflow.configs) -----------------------
@dataclass
class CellResult:
    theme: str
    cell: str  # "unsteered", "prompting" or "MODE/LAYER/COEFFICIENT"
    mode: str  # "none", "prompt", "single", "cumulative" or "cumulative_norm"
    layer: int  # -1 for baselines
    coefficient: float
    n_features: int
    n: int
    topic: float
    topic_se: float
    coherence: float
    coherence_se: float
    score: float
    score_se: float
    nll: float
    gain: float
    repetition: float
    judge_topic: float | None
    judge_coherence: float | None
    judge_score: float | None
    seconds: float
    generations: list[dict] = field(default_factory=list, repr=False)
    added_norm: float | None = None  # sum over sites of the added vector's norm (activation)
    stage: str = "selection"  # or "report"

    def row(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "generations"}


def mean_se(xs: Sequence[float | None]) -> tuple[float, float]:
    """Mean and standard error of the finite values (NaN when there are none / one)."""
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    if not xs:
        return float("nan"), float("nan")
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, float("nan")
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs))


def cells(cfg: SweepConfig) -> list[tuple[str, str, int, float]]:
    """(key, mode, layer, coefficient) of every stage-1 cell, baselines first."""
    modes = list(cfg.modes) + ([NORM_MODE] if cfg.norm_cells else [])
    out = [("unsteered", "none", -1, 0.0), ("prompting", "prompt", -1, 0.0)]
    out += [(f"{m}/{layer}/{c:g}", m, layer, c) for m in modes for layer in cfg.layers
            for c in cfg.coefficients]
    return out


# ---- plans and generation -----------------------------------------------------------------------
def added_norm(plan: SteeringPlan, lm, suite) -> float:
    """Sum over the plan's sites of the norm of the vector it adds there (activation)."""
    by_site: dict = {}
    for f, c in plan.terms:
        v = suite[f.site].steering_vectors()[f.index].float() * (c * plan.magnitude(f))
        if f.kind == "att_z":
            v = lm.att_z_to_residual(f.layer, v[None])[0].float()
        by_site[f.site] = by_site.get(f.site, 0) + v
    return float(sum(float(v.norm()) for v in by_site.values()))


def cell_plan(graph, cfg: SweepConfig, mode: str, layer: int, coef: float, magnitudes, lm,
              suite) -> SteeringPlan:
    """The plan of a steered cell; cumulative_norm is rescaled to single's added norm."""
    def build(m):
        return plan_from_graph(graph, m, layer, cfg.schedule, coef, alpha=cfg.alpha,
                               end_coefficient=cfg.end_coefficient, action=cfg.action,
                               magnitudes=magnitudes)
    if mode != NORM_MODE:
        return build(mode)
    single, cum = build("single"), build("cumulative")
    target, have = added_norm(single, lm, suite), added_norm(cum, lm, suite)
    k = target / have if have > 0 else 0.0
    return SteeringPlan([(f, c * k) for f, c in cum.terms], cum.action, cum.magnitudes,
                        {**cum.info, "mode": NORM_MODE, "scale": k,
                         "norm_of": f"single/{layer}/{coef:g}"})


def _generate(lm, suite, plan, prompts: Sequence[str], bare: Sequence[str], seeds, cfg
              ) -> list[dict]:
    """Generation records of one cell: ``base_prompt`` the bare prompt, ``context_ids`` its
    tokens (the coherence context), ``sample`` the index among its prompt and seed."""
    recs = []
    for seed in seeds:
        gens: list[Generation] = generate(lm, list(prompts), plan, cfg.max_new_tokens, suite=suite,
                                          samples=cfg.samples, seed=seed,
                                          temperature=cfg.temperature, top_p=cfg.top_p)
        for i, g in enumerate(gens):
            base = bare[i // cfg.samples]
            recs.append({"prompt": g.prompt, "base_prompt": base, "seed": g.seed,
                         "sample": i % cfg.samples, "text": g.text,
                         "prompt_ids": list(g.prompt_ids),
                         "context_ids": lm.tokenizer(base, add_special_tokens=False)["input_ids"],
                         "new_ids": list(g.new_ids)})
    return recs


def score_records(recs: list[dict], topic: TopicScorer, coherence: CoherenceScorer,
                  action: str = "activate") -> None:
    """(Re)compute the automatic scores of generation records in place (coherence given the
    bare prompt, ``context_ids``); judge ratings already there are kept."""
    co = coherence([(r.get("context_ids", r["prompt_ids"]), r["new_ids"]) for r in recs])
    for i, (r, t) in enumerate(zip(recs, topic([r["text"] for r in recs]))):
        c = co.coherence[i]
        r.update(topic=t, coherence=c, nll=co.nll[i], gain=co.gain[i],
                 repetition=co.repetition[i], trigram_repetition=co.trigram[i],
                 unigram_repetition=co.unigram[i],
                 score=(t if action == "activate" else 1 - t) * c,
                 judge_topic=r.get("judge_topic"), judge_coherence=r.get("judge_coherence"))


def _cell(theme, key, mode, layer, coef, n_features, recs, seconds, action, norm=None,
          stage="selection") -> CellResult:
    def col(k):
        return [r[k] for r in recs]
    jt, jc = col("judge_topic"), col("judge_coherence")
    js = [None if a is None or b is None else (a if action == "activate" else 1 - a) * b
          for a, b in zip(jt, jc)]
    judged = [None if all(x is None for x in xs) else mean_se(xs)[0] for xs in (jt, jc, js)]
    return CellResult(theme, key, mode, layer, coef, n_features, len(recs), *mean_se(col("topic")),
                      *mean_se(col("coherence")), *mean_se(col("score")), mean_se(col("nll"))[0],
                      mean_se(col("gain"))[0], mean_se(col("repetition"))[0], *judged, seconds,
                      recs, norm, stage)


# ---- running the stages -------------------------------------------------------------------------
def _open_state(out: Path, theme, cfg, setup, rescore, topic, coherence) -> dict:
    from saeflow.io import write_json_atomic
    cfg_json = json.loads(json.dumps(asdict(cfg)))
    setup = json.loads(json.dumps(setup or {}, default=str))
    state = {"theme": theme, "config": cfg_json, "setup": setup, "scorer": SCORER_VERSION,
             "cells": {}, "heldout": {}}
    if not out.exists():
        return state
    old = json.loads(out.read_text())
    was = old.get("setup", {})
    if old.get("config") != cfg_json or was.get("seed") != setup.get("seed") or \
            was.get("model", setup.get("model")) != setup.get("model"):  # (older: no model)
        raise ValueError(f"{out} holds a sweep with other settings; delete it or choose another "
                         "--out")
    if old.get("scorer") != SCORER_VERSION and not rescore:
        raise ValueError(f"{out} was scored by an older scorer; re-run with --rescore")
    state.update(cells=old.get("cells", {}), heldout=old.get("heldout", {}))
    if "judge_validation" in old:
        state["judge_validation"] = old["judge_validation"]
    if rescore:
        for part in ("cells", "heldout"):
            for key, c in state[part].items():
                score_records(c["generations"], topic, coherence, cfg.action)
                res = _cell(theme, key, c["mode"], c["layer"], c["coefficient"], c["n_features"],
                            c["generations"], c["seconds"], cfg.action, c.get("added_norm"),
                            c.get("stage", "selection"))
                state[part][key] = {**res.row(), "generations": res.generations}
        write_json_atomic(out, state)
    return state


def generate_cell(lm, suite, theme, graph, cfg, magnitudes, prompts, seeds, cell) -> tuple:
    """The unscored generations of one cell ``(key, mode, layer, coefficient)``: (records,
    number of plan terms, added norm, seconds). Cells are independent (each generation is
    seeded by its prompt, seed and sample), so any worker may run any cell."""
    t0 = time.perf_counter()
    _, mode, layer, coef = cell
    plan, ps, norm = None, list(prompts), None
    if mode == "prompt":
        ps = [cfg.baseline_prompt.format(theme=theme, prompt=p) for p in prompts]
    elif mode != "none":
        plan = cell_plan(graph, cfg, mode, layer, coef, magnitudes, lm, suite)
        norm = added_norm(plan, lm, suite) if cfg.action == "activate" else None
    recs = _generate(lm, suite, plan, ps, list(prompts), seeds, cfg)
    return recs, 0 if plan is None else len(plan.terms), norm, time.perf_counter() - t0


def _run_cells(state, part, todo, lm, suite, theme, graph, cfg, out, topic, coherence,
               magnitudes, prompts, seeds, desc, order, fan_out=None) -> None:
    """Run the cells ``todo``, each scored and saved as it finishes. ``fan_out(fn, args,
    cells)`` (the Ray back end) yields ``(cell, fn(lm, suite, *args, cell))`` in any order;
    ``order`` (keys) keeps the saved cells in sweep order either way."""
    from tqdm.auto import tqdm

    from saeflow.io import write_json_atomic
    args = (theme, graph, cfg, magnitudes, tuple(prompts), tuple(seeds))
    made = (fan_out(generate_cell, args, todo) if fan_out is not None else
            ((c, generate_cell(lm, suite, *args, c)) for c in tqdm(todo, desc=desc, unit="cell")))
    rank = {k: i for i, k in enumerate(order)}
    for (key, mode, layer, coef), (recs, n_features, norm, seconds) in made:
        t0 = time.perf_counter()
        score_records(recs, topic, coherence, cfg.action)
        res = _cell(theme, key, mode, layer, coef, n_features, recs,
                    seconds + time.perf_counter() - t0, cfg.action, norm,
                    "report" if part == "heldout" else "selection")
        state[part][key] = {**res.row(), "generations": recs}
        state[part] = dict(sorted(state[part].items(), key=lambda kv: rank.get(kv[0], -1)))
        write_json_atomic(out, state)


def run_sweep(lm, suite, theme: str, graph, cfg: SweepConfig, out: Path, topic: TopicScorer,
              coherence: CoherenceScorer, magnitudes: dict | None = None, setup: dict | None = None,
              rescore: bool = False, fan_out=None) -> list[CellResult]:
    """Stage 1: run (or resume) every cell of ``cfg`` on the selection prompts and seeds;
    results go to ``out`` (JSON). ``rescore`` first recomputes the saved cells' scores;
    ``fan_out`` generates the cells elsewhere (``_run_cells``)."""
    state = _open_state(out, theme, cfg, setup, rescore, topic, coherence)
    every = cells(cfg)
    todo = [c for c in every if c[0] not in state["cells"]]
    _run_cells(state, "cells", todo, lm, suite, theme, graph, cfg, out, topic, coherence,
               magnitudes, cfg.prompts, cfg.seeds, f"steer-eval {theme}",
               [c[0] for c in every], fan_out)
    return load_results(out)


def best_cells(results: Sequence[CellResult]) -> dict[str, CellResult]:
    """Each mode's cell with the highest mean score on stage 1."""
    out = {}
    for r in results:
        if r.mode in ("none", "prompt"):
            continue
        if r.mode not in out or r.score > out[r.mode].score:
            out[r.mode] = r
    return out


def run_heldout(lm, suite, theme: str, graph, cfg: SweepConfig, out: Path, topic: TopicScorer,
                coherence: CoherenceScorer, magnitudes: dict | None = None,
                judge_fn: Callable[[str], tuple[float, float]] | None = None, fan_out=None
                ) -> list[CellResult]:
    """Stage 2: the baselines and each mode's best stage-1 cell again on the report prompts and
    seeds (resumable, in the same ``out``); with ``judge_fn``, ``validate_with_judge``;
    ``fan_out`` as for ``run_sweep``."""
    from saeflow.io import write_json_atomic
    state = json.loads(Path(out).read_text())
    chosen = best_cells(load_results(out))
    want = [("unsteered", "none", -1, 0.0), ("prompting", "prompt", -1, 0.0)] + \
        [(r.cell, r.mode, r.layer, r.coefficient) for r in chosen.values()]
    todo = [c for c in want if c[0] not in state["heldout"]]
    _run_cells(state, "heldout", todo, lm, suite, theme, graph, cfg, out, topic, coherence,
               magnitudes, cfg.report_prompts, cfg.report_seeds, f"held-out {theme}",
               [c[0] for c in want], fan_out)
    if judge_fn is not None and cfg.judge_sample > 0:
        state["judge_validation"] = validate_with_judge(
            [g for c in state["heldout"].values() for g in c["generations"]], judge_fn,
            cfg.judge_sample, cfg.action)
        for key, c in state["heldout"].items():
            res = _cell(theme, key, c["mode"], c["layer"], c["coefficient"], c["n_features"],
                        c["generations"], c["seconds"], cfg.action, c.get("added_norm"), "report")
            state["heldout"][key] = {**res.row(), "generations": res.generations}
        write_json_atomic(out, state)
    keys = [c[0] for c in want]
    return [CellResult(**state["heldout"][k]) for k in keys]


def load_results(path: Path, part: str = "cells") -> list[CellResult]:
    """The cells of a saved sweep (stage 1; ``part="heldout"``: stage 2), in run order."""
    data = json.loads(Path(path).read_text())
    return [CellResult(**c) for c in data.get(part, {}).values()]


# ---- judge validation ---------------------------------------------------------------------------
def spearman(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties; NaN if either side is constant)."""
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r
    if len(xs) < 3:
        return float("nan")
    a, b = ranks(list(xs)), ranks(list(ys))
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    va = sum((x - ma) ** 2 for x in a)
    vb = sum((y - mb) ** 2 for y in b)
    if va == 0 or vb == 0:
        return float("nan")
    return sum((x - ma) * (y - mb) for x, y in zip(a, b)) / math.sqrt(va * vb)


def validate_with_judge(recs: list[dict], judge_fn, n: int, action: str = "activate",
                        seed: int = 0) -> dict:
    """Rate a seeded sample of ``n`` records with the judge (in place; records already rated
    are reused) and return the rank correlations of topic, coherence and score with it."""
    pick = random.Random(seed).sample(range(len(recs)), min(n, len(recs)))
    for i in pick:
        r = recs[i]
        if r.get("judge_topic") is None:
            r["judge_topic"], r["judge_coherence"] = judge_fn(r["text"])
    rated = [recs[i] for i in pick]

    def js(r):
        t = r["judge_topic"] if action == "activate" else 1 - r["judge_topic"]
        return t * r["judge_coherence"]
    return {"n": len(rated),
            "topic": spearman([r["topic"] for r in rated], [r["judge_topic"] for r in rated]),
            "coherence": spearman([r["coherence"] for r in rated],
                                  [r["judge_coherence"] for r in rated]),
            "score": spearman([r["score"] for r in rated], [js(r) for r in rated])}


# ---- the comparison -----------------------------------------------------------------------------
def _key(g: dict) -> tuple:
    return g.get("base_prompt", g["prompt"]), g["seed"], g.get("sample", 0)


def paired(a: CellResult, b: CellResult, metric: str = "score") -> tuple[float, float, int]:
    """Mean and standard error of a - b over the generations both cells share (same prompt,
    seed and sample index), and how many they share."""
    theirs = {_key(g): g[metric] for g in b.generations}
    d = [g[metric] - theirs[_key(g)] for g in a.generations if _key(g) in theirs]
    m, se = mean_se(d)
    return m, se, len(d)


def compare_modes(results: Sequence[CellResult], heldout: Sequence[CellResult]) -> dict:
    """Stage 2 numbers per baseline and mode (the best stage-1 cell, reported on the held-out
    prompts and seeds), paired differences against unsteered and between the modes, the
    equal-norm comparison over the stage-1 grid, and which prompts and seeds each stage used."""
    held = {r.cell: r for r in heldout}
    base = held["unsteered"]

    def summary(r: CellResult, sel: CellResult | None) -> dict:
        d, d_se, n = paired(r, base)
        return {"cell": r.cell, "heldout": r.score, "heldout_se": r.score_se, "n_heldout": r.n,
                "topic": r.topic, "coherence": r.coherence, "selection": sel.score if sel else None,
                "vs_unsteered": d, "vs_unsteered_se": d_se, "n_paired": n,
                "added_norm": r.added_norm, "n_features": r.n_features}

    grid = {r.cell: r for r in results}
    out: dict = {"unsteered": summary(base, grid.get("unsteered")),
                 "prompting": summary(held["prompting"], grid.get("prompting"))}
    for mode in (*MODES, NORM_MODE):
        rs = [r for r in results if r.mode == mode]
        best = best_cells(rs).get(mode)
        if best is None or best.cell not in held:
            continue
        small = sorted({r.coefficient for r in rs})[:2]
        out[mode] = {**summary(held[best.cell], best),
                     "grid_mean": mean_se([r.score for r in rs])[0],
                     "small_mean": mean_se([r.score for r in rs if r.coefficient in small])[0]}
    if "single" in out and "cumulative" in out:
        d, se, n = paired(held[out["cumulative"]["cell"]], held[out["single"]["cell"]])
        out["cumulative_vs_single"] = {"diff": d, "se": se, "n": n}
    pairs, diffs = [], []
    for r in results:
        if r.mode != NORM_MODE or (s := grid.get(f"single/{r.layer}/{r.coefficient:g}")) is None:
            continue
        c = grid.get(f"cumulative/{r.layer}/{r.coefficient:g}")
        d, se, n = paired(r, s)
        theirs = {_key(g): g["score"] for g in s.generations}
        diffs += [g["score"] - theirs[_key(g)] for g in r.generations if _key(g) in theirs]
        pairs.append({"layer": r.layer, "coefficient": r.coefficient, "added_norm": r.added_norm,
                      "single": s.score, "cumulative_norm": r.score, "diff": d, "diff_se": se,
                      "cumulative": c.score if c else None,
                      "cumulative_added_norm": c.added_norm if c else None})
    if pairs:
        m, se = mean_se(diffs)
        out["equal_norm"] = {"cells": pairs, "diff": m, "diff_se": se, "n": len(diffs)}
    out["split"] = {"selection": sorted({(g.get("base_prompt", g["prompt"]), g["seed"])
                                         for r in results for g in r.generations}),
                    "report": sorted({(g.get("base_prompt", g["prompt"]), g["seed"])
                                      for r in heldout for g in r.generations})}
    return out
