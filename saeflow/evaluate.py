"""Scoring steered generations and sweeping steering settings (method.md section 6, "Evaluation").

The paper scores generations with an LLM judge (topic and coherence, 0-5) and reports
topic x coherence (or (1 - topic) x coherence when suppressing). saeflow scores offline, with
calibrated automatic measures, and can add a judge through any OpenAI-compatible endpoint:
  - topic: cosine between the continuation's sentence embedding and the theme centroid (mean
    embedding of half of the theme paragraphs), mapped linearly so the mean of background-corpus
    snippets is 0 and the mean of the other half of the theme paragraphs is 1, clipped to [0, 1].
    Calibration snippets are cut to the generations' length (``snippet_words`` words), because
    short texts embed less sharply than whole paragraphs.
  - coherence: two measures under the *unsteered* model, each mapped linearly so corpus snippets
    (natural text) are 1 and the same snippets with shuffled tokens (word salad) are 0:
    the continuation's mean per-token NLL given its prompt, and its *context gain*, the
    context-free NLL (the model's next-token distribution after a document separator alone)
    minus that NLL. NLL alone passes salad of frequent words ("have. team. are are have"),
    gain alone passes salad of rare tokens; the worse of the two, clipped to [0, 1], is
    multiplied by (1 - repetition), the share of repeated token trigrams (loops have a low
    NLL and a high gain). Continuations under 4 tokens score 0.
  - score = topic x coherence (activate) or (1 - topic) x coherence (suppress).
A sweep runs one cell per (mode, layer, coefficient) plus two baselines, "unsteered" and
"prompting" (the theme asked for in the prompt, no steering), over fixed prompts and seeds. All
cells draw from the same random streams, so their differences are paired. Results are saved
after every cell (atomically) and a re-run skips the cells already done. ``compare_modes``
picks each mode's best cell on half of the samples and reports it on the other half, so the
best-of-grid number carries no selection bias against the single-cell baselines.
"""

from __future__ import annotations

import json
import math
import random
import re
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from saeflow.steer import ACTIONS, MODES, Generation, generate, plan_from_graph

MIN_TOKENS = 4


# ---- topic --------------------------------------------------------------------------------------
def snippet(text: str, words: int) -> str:
    return " ".join(text.split()[:words])


@dataclass
class TopicScorer:
    embed: Callable[[Sequence[str]], Tensor]
    theme_D: Tensor  # unit centroid
    background_mean: float
    theme_mean: float

    def similarity(self, texts: Sequence[str]) -> Tensor:
        return self.embed(list(texts)) @ self.theme_D

    def __call__(self, texts: Sequence[str]) -> list[float]:
        if not texts:
            return []
        sim = self.similarity(texts)
        z = ((sim - self.background_mean) / (self.theme_mean - self.background_mean)).clamp(0, 1)
        return [0.0 if not t.strip() else float(v) for t, v in zip(texts, z)]

    def info(self) -> dict:
        return {"background_mean": self.background_mean, "theme_mean": self.theme_mean}


def calibrate_topic(theme_texts: Sequence[str], background: Sequence[str], embed,
                    snippet_words: int = 30) -> TopicScorer:
    """See the module docstring; raises when theme text is not nearer the theme than background."""
    texts = list(theme_texts)
    half_a, half_b = (texts[0::2], texts[1::2]) if len(texts) >= 2 else (texts, texts)
    c = embed(half_a).mean(0)
    c = c / c.norm().clamp_min(1e-12)
    mu_t = float((embed([snippet(t, snippet_words) for t in half_b]) @ c).mean())
    mu_b = float((embed([snippet(t, snippet_words) for t in background]) @ c).mean())
    if not mu_t > mu_b + 1e-3:
        raise ValueError(f"theme snippets are not nearer the theme than background snippets "
                         f"(cosine {mu_t:.3f} vs {mu_b:.3f}); give better theme examples")
    return TopicScorer(embed, c, mu_b, mu_t)


# ---- coherence ----------------------------------------------------------------------------------
def repetition(seq: str | Sequence) -> float:
    """Share of repeated trigrams of ``seq`` (a text's words, or token ids): 0 for text without
    repeats, near 1 for loops."""
    items = seq.lower().split() if isinstance(seq, str) else list(seq)
    grams = [tuple(items[i:i + 3]) for i in range(len(items) - 2)]
    return 0.0 if not grams else 1.0 - len(set(grams)) / len(grams)


@torch.no_grad()
def continuation_nll(lm, pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
                     batch_size: int = 8) -> list[float]:
    """Mean NLL (nats/token) of each continuation given its prompt, ``(prompt_ids, new_ids)``."""
    pad = getattr(lm.tokenizer, "pad_token_id", None) or 0
    out = []
    for start in range(0, len(pairs), batch_size):
        chunk = [(list(p), list(n)) for p, n in pairs[start:start + batch_size]]
        seqs = [p + n for p, n in chunk]
        width = max(map(len, seqs))
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=lm.device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=lm.device)
        logp = lm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        logp = logp.log_softmax(-1)
        for i, (p, n) in enumerate(chunk):
            if not n:
                out.append(float("nan"))
                continue
            pos = torch.arange(len(p) - 1, len(p) + len(n) - 1, device=lm.device)
            tgt = torch.tensor(n, device=lm.device)
            out.append(float(-logp[i, pos, tgt].mean()))
    return out


@torch.no_grad()
def context_free_logprobs(lm) -> Tensor:
    """The model's next-token log-probabilities after a document separator alone, [vocab]: a
    unigram model of the language as the model sees it."""
    tok = lm.tokenizer
    cands = (tok.get_vocab().get("<|endoftext|>"), getattr(tok, "eos_token_id", None),
             getattr(tok, "bos_token_id", None), 0)
    ids = torch.tensor([[int(next(c for c in cands if c is not None))]], device=lm.device)
    return lm.model(input_ids=ids, use_cache=False).logits[0, -1].float().log_softmax(-1).cpu()


class Coherence(NamedTuple):
    coherence: list[float]
    nll: list[float]  # nats/token under the unsteered model, given the prompt
    gain: list[float]  # context-free NLL minus nll: how much the context explains the text
    repetition: list[float]  # share of repeated token trigrams


@dataclass
class CoherenceScorer:
    lm: object
    unigram_V: Tensor  # context_free_logprobs(lm)
    natural_nll: float
    shuffled_nll: float
    natural_gain: float
    shuffled_gain: float

    def __call__(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> Coherence:
        """Scores of continuations given as ``(prompt_ids, new_ids)``."""
        nll = continuation_nll(self.lm, pairs)
        gain = [float(-self.unigram_V[list(n)].mean()) - x if n else float("nan")
                for (_, n), x in zip(pairs, nll)]
        rep = [repetition(n) for _, n in pairs]
        coh = []
        for (_, n), x, g, r in zip(pairs, nll, gain, rep):
            if len(n) < MIN_TOKENS or math.isnan(x):
                coh.append(0.0)
                continue
            by_nll = (self.shuffled_nll - x) / (self.shuffled_nll - self.natural_nll)
            by_gain = (g - self.shuffled_gain) / (self.natural_gain - self.shuffled_gain)
            coh.append(min(1.0, max(0.0, min(by_nll, by_gain))) * (1.0 - r))
        return Coherence(coh, nll, gain, rep)

    def info(self) -> dict:
        return {"natural_nll": self.natural_nll, "shuffled_nll": self.shuffled_nll,
                "natural_gain": self.natural_gain, "shuffled_gain": self.shuffled_gain}


def calibrate_coherence(lm, texts: Sequence[str], n_tokens: int = 36, prompt_tokens: int = 2,
                        seed: int = 0) -> CoherenceScorer:
    """NLL and gain anchors: corpus snippets of ``n_tokens`` tokens and token-shuffled copies."""
    rng = random.Random(seed)
    natural, shuffled = [], []
    for t in texts:
        ids = lm.tokenizer(t, add_special_tokens=False)["input_ids"][:n_tokens + prompt_tokens]
        if len(ids) < prompt_tokens + MIN_TOKENS:
            continue
        p, n = ids[:prompt_tokens], ids[prompt_tokens:]
        natural.append((p, n))
        shuffled.append((p, rng.sample(n, len(n))))
    if len(natural) < 2:
        raise ValueError("coherence calibration needs at least 2 texts of a few tokens")
    uni = context_free_logprobs(lm)

    def anchors(pairs):
        nll = continuation_nll(lm, pairs)
        gain = [float(-uni[n].mean()) - x for (_, n), x in zip(pairs, nll)]
        return sum(nll) / len(nll), sum(gain) / len(gain)
    (nat, nat_g), (shuf, shuf_g) = anchors(natural), anchors(shuffled)
    if not (shuf > nat + 0.1 and nat_g > shuf_g + 0.1):
        raise ValueError(f"shuffled text is not less likely than natural text under {lm.name} "
                         f"(NLL {shuf:.2f} vs {nat:.2f}, gain {shuf_g:.2f} vs {nat_g:.2f}): "
                         "coherence cannot be calibrated")
    return CoherenceScorer(lm, uni, nat, shuf, nat_g, shuf_g)


# ---- optional judge -----------------------------------------------------------------------------
JUDGE_PROMPT = ("Rate the text below on two scales from 0 to 5.\n"
                "topic: how much the text is about {theme} (0 = not at all, 5 = entirely).\n"
                "coherence: how fluent and coherent the text is (0 = gibberish, 5 = perfect).\n"
                'Answer with JSON only, like {{"topic": 3, "coherence": 4}}.\n\nText:\n{text}')


def judge(url: str, model: str, theme: str, text: str, api_key: str | None = None,
          timeout: float = 60.0) -> tuple[float, float]:
    """(topic, coherence) in [0, 1] from an OpenAI-compatible chat endpoint."""
    endpoint = url.rstrip("/")
    if not endpoint.endswith("/chat/completions"):
        endpoint += "/chat/completions"
    body = {"model": model, "temperature": 0,
            "messages": [{"role": "user", "content": JUDGE_PROMPT.format(theme=theme, text=text)}]}
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(endpoint, json.dumps(body).encode(), headers)
    with urllib.request.urlopen(req, timeout=timeout) as r:
        reply = json.loads(r.read())["choices"][0]["message"]["content"]
    m = re.search(r"\{.*?\}", reply, re.S)
    try:
        d = json.loads(m.group(0)) if m else {}
        return (min(5.0, max(0.0, float(d["topic"]))) / 5,
                min(5.0, max(0.0, float(d["coherence"]))) / 5)
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"judge {model} at {endpoint} gave no topic/coherence JSON: "
                         f"{reply[:200]!r}") from None


# ---- sweeps -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SweepConfig:
    modes: tuple[str, ...] = MODES
    layers: tuple[int, ...] = ()
    coefficients: tuple[float, ...] = (0.05, 0.1, 0.2, 0.4)
    prompts: tuple[str, ...] = ("I think", "Let me tell you about", "Yesterday,", "The best thing")
    seeds: tuple[int, ...] = (0,)
    samples: int = 2
    max_new_tokens: int = 36
    schedule: str = "constant"
    alpha: float = -0.05
    end_coefficient: float | None = None
    action: str = "activate"
    temperature: float = 1.27
    top_p: float = 0.7
    baseline_prompt: str = "Write about {theme}.\n\n{prompt}"

    def __post_init__(self):
        if self.action not in ACTIONS:
            raise ValueError(f"unknown action {self.action!r}; known: {', '.join(ACTIONS)}")
        for m in self.modes:
            if m not in MODES:
                raise ValueError(f"unknown mode {m!r}; known: {', '.join(MODES)}")
        if not self.layers or not self.coefficients or not self.prompts or not self.seeds:
            raise ValueError("a sweep needs layers, coefficients, prompts and seeds")


@dataclass
class CellResult:
    theme: str
    cell: str  # "unsteered", "prompting" or "MODE/LAYER/COEFFICIENT"
    mode: str  # "none", "prompt", "single" or "cumulative"
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

    def row(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "generations"}


SCORER_VERSION = 2  # bumped when scores change meaning; resuming older results needs --rescore


def _mean_se(xs: Sequence[float]) -> tuple[float, float]:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    if not xs:
        return float("nan"), float("nan")
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, float("nan")
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs))


def cells(cfg: SweepConfig) -> list[tuple[str, str, int, float]]:
    """(key, mode, layer, coefficient) of every cell, baselines first."""
    out = [("unsteered", "none", -1, 0.0), ("prompting", "prompt", -1, 0.0)]
    out += [(f"{m}/{layer}/{c:g}", m, layer, c) for m in cfg.modes for layer in cfg.layers
            for c in cfg.coefficients]
    return out


def score_records(recs: list[dict], topic: TopicScorer, coherence: CoherenceScorer,
                  action: str = "activate", judge_fn=None) -> None:
    """(Re)compute the scores of generation records in place; a judge only fills missing ones."""
    co = coherence([(r["prompt_ids"], r["new_ids"]) for r in recs])
    for r, t, c, x, g, rep in zip(recs, topic([r["text"] for r in recs]), *co):
        if judge_fn is not None and r.get("judge_topic") is None:
            r["judge_topic"], r["judge_coherence"] = judge_fn(r["text"])
        r.update(topic=t, coherence=c, nll=x, gain=g, repetition=rep,
                 score=(t if action == "activate" else 1 - t) * c,
                 judge_topic=r.get("judge_topic"), judge_coherence=r.get("judge_coherence"))


def _cell(theme, key, mode, layer, coef, n_features, recs, seconds, action) -> CellResult:
    def col(k):
        return [r[k] for r in recs]
    jt, jc = col("judge_topic"), col("judge_coherence")
    js = [None if a is None else (a if action == "activate" else 1 - a) * b for a, b in zip(jt, jc)]
    judged = [None if all(x is None for x in xs) else _mean_se(xs)[0] for xs in (jt, jc, js)]
    return CellResult(theme, key, mode, layer, coef, n_features, len(recs), *_mean_se(col("topic")),
                      *_mean_se(col("coherence")), *_mean_se(col("score")), _mean_se(col("nll"))[0],
                      _mean_se(col("gain"))[0], _mean_se(col("repetition"))[0], *judged, seconds,
                      recs)


def run_sweep(lm, suite, theme: str, graph, cfg: SweepConfig, out: Path, topic: TopicScorer,
              coherence: CoherenceScorer, magnitudes: dict | None = None, setup: dict | None = None,
              judge_fn: Callable[[str], tuple[float, float]] | None = None,
              rescore: bool = False) -> list[CellResult]:
    """Run (or resume) every cell of ``cfg`` for one theme; results go to ``out`` (JSON).
    ``rescore`` first recomputes the scores of the cells already saved (no generation)."""
    from tqdm.auto import tqdm

    from saeflow.io import write_json_atomic
    cfg_json = json.loads(json.dumps(asdict(cfg)))
    setup = json.loads(json.dumps(setup or {}, default=str))
    state = {"theme": theme, "config": cfg_json, "setup": setup, "scorer": SCORER_VERSION,
             "cells": {}}
    if out.exists():
        old = json.loads(out.read_text())
        if old.get("config") != cfg_json or old.get("setup", {}).get("seed") != setup.get("seed"):
            raise ValueError(f"{out} holds a sweep with other settings; delete it or choose "
                             "another --out")
        if old.get("scorer") != SCORER_VERSION and not rescore:
            raise ValueError(f"{out} was scored by an older scorer; re-run with --rescore")
        state["cells"] = old.get("cells", {})
        if rescore:
            for key, c in tqdm(list(state["cells"].items()), desc=f"rescore {theme}", unit="cell"):
                score_records(c["generations"], topic, coherence, cfg.action, judge_fn)
                res = _cell(theme, key, c["mode"], c["layer"], c["coefficient"], c["n_features"],
                            c["generations"], c["seconds"], cfg.action)
                state["cells"][key] = {**res.row(), "generations": res.generations}
            write_json_atomic(out, state)
    todo = [c for c in cells(cfg) if c[0] not in state["cells"]]
    for key, mode, layer, coef in tqdm(todo, desc=f"steer-eval {theme}", unit="cell"):
        t0 = time.perf_counter()
        plan, prompts = None, list(cfg.prompts)
        if mode == "prompt":
            prompts = [cfg.baseline_prompt.format(theme=theme, prompt=p) for p in prompts]
        elif mode != "none":
            plan = plan_from_graph(graph, mode, layer, cfg.schedule, coef, alpha=cfg.alpha,
                                   end_coefficient=cfg.end_coefficient, action=cfg.action,
                                   magnitudes=magnitudes)
        gens: list[Generation] = []
        for seed in cfg.seeds:
            gens += generate(lm, prompts, plan, cfg.max_new_tokens, suite=suite,
                             samples=cfg.samples, seed=seed, temperature=cfg.temperature,
                             top_p=cfg.top_p)
        recs = [{"prompt": g.prompt, "seed": g.seed, "text": g.text,
                 "prompt_ids": list(g.prompt_ids), "new_ids": list(g.new_ids)} for g in gens]
        score_records(recs, topic, coherence, cfg.action, judge_fn)
        res = _cell(theme, key, mode, layer, coef, 0 if plan is None else len(plan.terms), recs,
                    time.perf_counter() - t0, cfg.action)
        state["cells"][key] = {**res.row(), "generations": recs}
        write_json_atomic(out, state)
    return load_results(out)


def load_results(path: Path) -> list[CellResult]:
    """The cells of a saved sweep, in sweep order."""
    data = json.loads(Path(path).read_text())
    return [CellResult(**c) for c in data["cells"].values()]


def compare_modes(results: Sequence[CellResult]) -> dict:
    """Baselines vs each mode's best cell, honestly: the best cell (layer, coefficient) is chosen
    on half of the generations (even positions: the first sample of each prompt and seed) and
    scored on the other half (odd positions), which no choice has seen. Also each mode's mean
    over the whole grid (sensitivity to settings) and over its two smallest coefficients."""
    def half(r: CellResult, part: int) -> list[dict]:
        return r.generations if len(r.generations) < 2 else r.generations[part::2]

    def on(r: CellResult, part: int, key="score") -> float:
        return _mean_se([g[key] for g in half(r, part)])[0]

    def summary(r: CellResult) -> dict:
        held = half(r, 1)
        mean, se = _mean_se([g["score"] for g in held])
        return {"cell": r.cell, "heldout": mean, "heldout_se": se, "n_heldout": len(held),
                "selection": on(r, 0), "topic": on(r, 1, "topic"),
                "coherence": on(r, 1, "coherence")}

    out: dict = {}
    for r in results:
        if r.mode in ("none", "prompt"):
            out["unsteered" if r.mode == "none" else "prompting"] = summary(r)
    for mode in MODES:
        rs = [r for r in results if r.mode == mode]
        if not rs:
            continue
        best = max(rs, key=lambda r: on(r, 0))
        small = sorted({r.coefficient for r in rs})[:2]
        out[mode] = {**summary(best), "grid_mean": _mean_se([r.score for r in rs])[0],
                     "small_mean": _mean_se([r.score for r in rs if r.coefficient in small])[0]}
    return out
