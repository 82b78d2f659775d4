"""Multi-layer steering with flow graphs (Laptev et al., ICML 2025, sec. 6; method.md section 6).

A ``SteeringPlan`` is a list of ``(feature, coefficient)`` terms at any sites and layers, an
action, and an optional per-feature magnitude. While ``plan.apply(lm, suite)`` is open, every
forward pass of the model is edited at every token position (the prompt, and each generated
token when the KV cache is used; ``from_token`` and ``generated_only`` narrow that, below):
  - activate: ``h <- h + coefficient * magnitude * v`` at the feature's site, with ``v`` the raw
    row of ``SAE.steering_vectors()`` (decoder row with the SAE's output scale);
  - suppress: ``h <- h + (r - 1) * a * v`` with ``r`` the coefficient and ``a`` the feature's
    activation, encoded on the fly from ``h`` at that site (``r = 1`` leaves ``h`` unchanged,
    ``r = 0`` removes the feature, ``r < 0`` flips it). Magnitudes are not used. Only usable
    tokens are edited (``saeflow.tokens.usable_tokens``, the rule training and quality use):
    never a sequence's first token (its position, tracked through generation's left padding)
    and never a token whose norm is above 10x the median of the pass (SmolLM2's first token,
    at ~24,000, returns activations of 290-760 instead of 4-6 there); the one-token steps of
    cached generation keep the limit measured on the prompt.
A plan may steer only part of each sequence (steering-vectors' ``min_token_index``):
``from_token = N`` edits the tokens at positions >= N only, ``generated_only`` the tokens
``generate`` adds only (positions >= the row's prompt length: the first new token is drawn from
unsteered states, as with ``min_token_index = len(prompt)`` without a KV cache). Positions are
a token's place in its own sequence, tracked through left padding and the cache; steering-vectors
counts along the current forward's token axis instead, so with a cache its one-token steps are
never steered when N >= 1. The default (0, False) edits every token.
Activation costs one vector addition per site: the terms of a site are summed into one vector
when the plan is applied. Suppression encodes the plan's features only (all features for TopK
SAEs, whose activation depends on the others).

``plan_from_graph`` builds a plan from a flow graph (``saeflow.flow.FlowGraph``):
  - ``single``: the graph's features at layer ``l`` (res, mlp and att nodes of that layer);
  - ``cumulative``: every graph feature at layers ``<= l``;
  - schedules over the layer ``l`` of each feature: constant ``s``; exponential
    ``s * exp(alpha * l)`` (alpha = -0.05 in the paper); linear from ``s`` at the first steered
    layer to ``end`` at the last steered layer (the paper says "first/last graph layer"; saeflow
    takes the span of the features actually steered, so the ramp ends at ``l`` in cumulative
    mode; with one layer the coefficient is ``s``).

Magnitudes (``res_norm``, ``activation``, ``theta``, ``none``) are ``saeflow.magnitudes``.
Plans store the resolved magnitudes, so a plan file is self-contained; ``info`` keeps how it was
built. Plans save as JSON (written atomically) and load back.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from saeflow.compute import pad_batch, pad_id
from saeflow.configs import ACTIONS, MAGNITUDES, MODES, SCHEDULES  # noqa: F401  (re-exported)
from saeflow.hooks import editing
from saeflow.magnitudes import feature_magnitudes  # noqa: F401  (re-exported)
from saeflow.sites import Feature, Site
from saeflow.tokens import LimitMemory, PositionTracker, tracking_positions, usable_tokens

PLAN_FORMAT = "saeflow.steering_plan/1"


# ---- schedules (pure) ---------------------------------------------------------------------------
def schedule_coefficients(layers: Sequence[int], schedule: str = "constant",
                          coefficient: float = 1.0, alpha: float = -0.05,
                          end_coefficient: float | None = None) -> list[float]:
    """The coefficient of each layer in ``layers`` under a schedule (see the module docstring)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; known: {', '.join(SCHEDULES)}")
    s = float(coefficient)
    if schedule == "constant":
        return [s for _ in layers]
    if schedule == "exponential":
        return [s * math.exp(alpha * layer) for layer in layers]
    if end_coefficient is None:
        raise ValueError("the linear schedule needs an end coefficient (--end-coefficient)")
    first, last = min(layers), max(layers)
    if first == last:
        return [s for _ in layers]
    return [s + (float(end_coefficient) - s) * (layer - first) / (last - first) for layer in layers]


# ---- the plan -----------------------------------------------------------------------------------
@dataclass
class SteeringPlan:
    """``terms``: ``(Feature, coefficient)`` pairs; ``magnitudes``: per-feature multipliers of the
    raw steering vector (default 1); ``info``: how the plan was built (free-form, saved)."""
    terms: list[tuple[Feature, float]]
    action: str = "activate"
    magnitudes: dict[Feature, float] = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    from_token: int = 0  # edit only tokens at positions >= from_token (module docstring)
    generated_only: bool = False  # edit only the tokens generate() adds

    def __post_init__(self):
        if self.action not in ACTIONS:
            raise ValueError(f"unknown steering action {self.action!r}; "
                             f"known: {', '.join(ACTIONS)}")
        terms = []
        for item in self.terms:
            if not isinstance(item, (tuple, list)) or len(item) != 2:
                raise ValueError(f"a steering term is (feature, coefficient), got {item!r}")
            feat, coef = Feature.parse(item[0]), float(item[1])
            if not math.isfinite(coef):
                raise ValueError(f"steering coefficient of {feat} is not finite: {coef}")
            terms.append((feat, coef))
        if not terms:
            raise ValueError("a steering plan needs at least one (feature, coefficient) term")
        self.terms = terms
        mags = {Feature.parse(f): float(m) for f, m in self.magnitudes.items()}
        for f, m in mags.items():
            if not math.isfinite(m):
                raise ValueError(f"magnitude of {f} is not finite: {m}")
        self.magnitudes = mags
        if isinstance(self.from_token, bool) or not isinstance(self.from_token, int) or \
                self.from_token < 0:
            raise ValueError(f"from_token must be an integer >= 0, got {self.from_token!r}")
        if not isinstance(self.generated_only, bool):
            raise ValueError(f"generated_only must be true or false, got {self.generated_only!r}")

    @property
    def features(self) -> list[Feature]:
        return [f for f, _ in self.terms]

    @property
    def sites(self) -> list[Site]:
        return sorted({f.site for f, _ in self.terms})

    @property
    def layers(self) -> list[int]:
        return sorted({f.layer for f, _ in self.terms})

    def magnitude(self, feature: Feature) -> float:
        return self.magnitudes.get(feature, 1.0)

    @contextmanager
    def apply(self, lm, suite, prompt_lengths: Sequence[int] | None = None):
        """Edit ``lm`` at the plan's sites while the block runs; always restores the model.
        ``prompt_lengths`` (one per row of the batch, as ``generate`` passes them) say where
        each row's generated tokens start; a ``generated_only`` plan needs them."""
        if self.generated_only and prompt_lengths is None:
            raise ValueError("a generated_only plan steers the tokens generate() adds: pass "
                             "prompt_lengths (one per row) to apply()")
        windowed = self.from_token > 0 or self.generated_only
        if self.action == "activate" and not windowed:
            with editing(lm, site_edits(self, lm, suite)):
                yield self
            return
        with tracking_positions(lm.model) as tracker:
            window = TokenWindow(tracker, self.from_token,
                                 prompt_lengths if self.generated_only else None)
            with editing(lm, site_edits(self, lm, suite, tracker,
                                        window if windowed else None)):
                yield self

    # ---- JSON ---------------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {"format": PLAN_FORMAT, "action": self.action,
                "terms": [{"feature": str(f), "coefficient": c, "magnitude": self.magnitude(f)}
                          for f, c in self.terms],
                "from_token": self.from_token, "generated_only": self.generated_only,
                "info": self.info}

    @classmethod
    def from_json(cls, data: dict, source: str = "<json>") -> SteeringPlan:
        if not isinstance(data, dict) or not isinstance(data.get("terms"), list):
            raise ValueError(f"{source}: not a steering plan (expected an object with 'terms')")
        try:
            terms = [(t["feature"], t["coefficient"]) for t in data["terms"]]
            mags = {t["feature"]: t.get("magnitude", 1.0) for t in data["terms"]}
            return cls(terms, data.get("action", "activate"), mags, dict(data.get("info") or {}),
                       data.get("from_token", 0), data.get("generated_only", False))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{source}: bad steering plan: {e}") from None

    def save(self, path: str | Path) -> Path:
        from saeflow.io import write_json_atomic
        path = Path(path)
        write_json_atomic(path, self.to_json())
        return path

    @classmethod
    def load(cls, path: str | Path) -> SteeringPlan:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"steering plan {path} does not exist")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        return cls.from_json(data, source=str(path))


# ---- building plans -----------------------------------------------------------------------------
def plan_from_features(features: Iterable[Feature | str], coefficient: float = 1.0,
                       action: str = "activate",
                       magnitudes: Mapping[Feature, float] | None = None) -> SteeringPlan:
    """Steer the given features with one coefficient (no flow graph)."""
    feats = [Feature.parse(f) for f in features]
    return SteeringPlan([(f, coefficient) for f in feats], action, dict(magnitudes or {}),
                        {"mode": "features", "coefficient": coefficient})


def graph_features(graph) -> list[Feature]:
    """Every feature of a flow graph (its seed included), sorted by site."""
    return sorted({Feature.parse(n.feature) for n in graph.nodes} | {Feature.parse(graph.seed)})


def plan_from_graph(graph, mode: str = "cumulative", layer: int | None = None,
                    schedule: str = "constant", coefficient: float = 1.0, *,
                    alpha: float = -0.05, end_coefficient: float | None = None,
                    action: str = "activate", magnitudes: Mapping[Feature, float] | None = None,
                    kinds: Sequence[str] | None = None) -> SteeringPlan:
    """A plan over a flow graph's features (``layer`` defaults to the seed's layer)."""
    if mode not in MODES:
        raise ValueError(f"unknown steering mode {mode!r}; known: {', '.join(MODES)}")
    seed = Feature.parse(graph.seed)
    feats = [f for f in graph_features(graph) if kinds is None or f.kind in kinds]
    layer = seed.layer if layer is None else int(layer)
    chosen = [f for f in feats if (f.layer == layer if mode == "single" else f.layer <= layer)]
    if not chosen:
        have = sorted({f.layer for f in feats})
        raise ValueError(f"the flow graph of {seed} has no features at layer "
                         f"{'' if mode == 'single' else '<= '}{layer}; its layers: {have}")
    coefs = schedule_coefficients([f.layer for f in chosen], schedule, coefficient, alpha,
                                  end_coefficient)
    mags = {f: float(magnitudes[f]) for f in chosen if magnitudes and f in magnitudes}
    info = {"seed": str(seed), "mode": mode, "layer": layer, "schedule": schedule,
            "coefficient": coefficient, "alpha": alpha, "end_coefficient": end_coefficient}
    return SteeringPlan(list(zip(chosen, coefs)), action, mags, info)


# ---- hooks --------------------------------------------------------------------------------------
class TokenWindow:
    """The tokens a plan edits: positions >= ``from_token`` and, given ``prompt_lengths``
    (one per row), >= the row's prompt length. Positions come from ``tracker``."""

    def __init__(self, tracker: PositionTracker, from_token: int = 0,
                 prompt_lengths: Sequence[int] | None = None):
        self.tracker, self.from_token = tracker, int(from_token)
        self.prompt_lengths = None if prompt_lengths is None else torch.tensor(
            [int(n) for n in prompt_lengths])

    def mask(self, h: Tensor) -> Tensor:
        """Bool [B, T] (or [T]) of the tokens of ``h`` [..., T, D] to edit."""
        pos = self.tracker.for_hidden(h)
        pos = torch.arange(h.shape[-2], device=h.device) if pos is None else pos
        if self.prompt_lengths is None:
            return pos >= self.from_token
        if h.dim() != 3 or len(self.prompt_lengths) != h.shape[0]:
            raise ValueError(f"{len(self.prompt_lengths)} prompt lengths for hidden states of "
                             f"shape {tuple(h.shape)} (one per row expected)")
        start = self.prompt_lengths.to(h.device).clamp_min(self.from_token)
        return pos >= start[:, None]


def site_edits(plan: SteeringPlan, lm, suite, tracker: PositionTracker | None = None,
               window: TokenWindow | None = None) -> dict[Site, object]:
    """One edit function per site of the plan (activation terms summed into one vector).
    Suppressors read token positions from ``tracker`` (``tokens.tracking_positions``); without
    one a token's index is its position. With ``window`` only its tokens are edited."""
    by_site: dict[Site, list[tuple[Feature, float]]] = {}
    for f, c in plan.terms:
        by_site.setdefault(f.site, []).append((f, c))
    edits = {}
    for site, terms in sorted(by_site.items()):
        sae = suite[site]
        idx = torch.tensor([f.index for f, _ in terms])
        if int(idx.max()) >= sae.d_sae:
            bad = next(f for f, _ in terms if f.index >= sae.d_sae)
            raise ValueError(f"feature {bad} is out of range: the SAE at {site} has {sae.d_sae} "
                             "features")
        V_nD = sae.W_dec[idx].float() * sae.output_scale  # = steering_vectors()[idx], n rows only
        if plan.action == "activate":
            w_n = torch.tensor([c * plan.magnitude(f) for f, c in terms])
            edits[site] = _adder((w_n @ V_nD).to(device=lm.device, dtype=lm.dtype), window)
        else:
            r_n = torch.tensor([c for _, c in terms])
            edits[site] = _suppressor(sae, idx, r_n - 1.0, V_nD, lm.device, tracker, window)
    return edits


def _adder(vec_D: Tensor, window: TokenWindow | None = None):
    def fn(h: Tensor) -> Tensor:
        if window is None:
            return h + vec_D
        return torch.where(window.mask(h)[..., None], h + vec_D, h)
    return fn


def _suppressor(sae, idx_n: Tensor, gain_n: Tensor, V_nD: Tensor, device,
                tracker: PositionTracker | None = None, window: TokenWindow | None = None):
    """``h + sum_i gain_i * a_i(h) * v_i`` with ``a`` encoded from ``h`` at this site, on
    usable tokens only (``tokens.usable_tokens``; the others are returned unchanged)."""
    full = sae.activation == "topk"
    limits = LimitMemory()
    enc = sae.to(device) if full else sae.replace(
        W_enc=sae.W_enc[:, idx_n], b_enc=sae.b_enc[idx_n], W_dec=sae.W_dec[idx_n],
        threshold=None if sae.threshold is None else sae.threshold[idx_n]).to(device)
    idx_n, G_nD = idx_n.to(device), (gain_n[:, None] * V_nD).to(device)

    def fn(h: Tensor) -> Tensor:
        pos = tracker.for_hidden(h) if tracker is not None else None
        keep = usable_tokens(h, limits(h, pos), positions=pos)  # [..., T]
        if window is not None:
            keep = keep & window.mask(h)
        x = h.to(enc.W_enc.dtype)
        acts = enc.encode(x)
        a_n = acts[..., idx_n] if full else acts  # [..., n]
        delta = a_n.to(G_nD.dtype) @ G_nD
        if enc.input_norm == "layer_norm":  # the SAE's output lives in standardised units
            delta = delta * enc._standardise(x)[2]
        return torch.where(keep[..., None], h + delta.to(h.dtype), h)
    return fn


# ---- generation ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Generation:
    """One sampled continuation: ``text`` excludes the prompt; ids are the model's own tokens."""
    prompt: str
    text: str
    seed: int
    prompt_ids: tuple[int, ...]
    new_ids: tuple[int, ...]


@torch.no_grad()
def generate(lm, prompt: str | Sequence[str], plan: SteeringPlan | None = None,
             max_new_tokens: int = 36, *, suite=None, samples: int = 1, seed: int = 0,
             temperature: float = 1.27, top_p: float = 0.7, greedy: bool = False,
             batch_size: int = 8, progress: bool = False, streamer=None,
             stopping_criteria=None) -> list[Generation]:
    """Continue each prompt ``samples`` times, steered by ``plan`` (needs ``suite``) or not.
    ``streamer`` and ``stopping_criteria`` go to transformers' ``generate`` (the viewer streams
    tokens and stops cancelled jobs with them).

    Rows are ``[p0, p0, ..., p1, ...]``; batch ``b`` samples with the torch seed
    ``(seed, b)``, so the same call with and without a plan draws from the same random stream.
    Sampling defaults are the paper's (temperature 1.27, top-p 0.7, no top-k)."""
    from transformers import GenerationConfig

    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or samples < 1 or max_new_tokens < 1 or batch_size < 1:
        raise ValueError("generate needs prompts, samples >= 1, max_new_tokens >= 1 and "
                         "batch_size >= 1")
    if plan is not None and suite is None:
        raise ValueError("steering needs the suite whose SAEs the plan's features belong to")
    tok = lm.tokenizer
    pad = pad_id(tok)
    eos = lm.model.generation_config.eos_token_id
    eos = {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None}
    eos |= {int(tok.eos_token_id)} if getattr(tok, "eos_token_id", None) is not None else set()
    end = tok.get_vocab().get("<|endoftext|>")  # a document's end also ends a continuation
    eos |= {int(end)} if end is not None else set()
    cfg = GenerationConfig(do_sample=not greedy, temperature=None if greedy else temperature,
                           top_p=None if greedy else top_p, top_k=None if greedy else 0,
                           max_new_tokens=max_new_tokens, pad_token_id=pad,
                           eos_token_id=sorted(eos) or None)
    rows = [p for p in prompts for _ in range(samples)]
    encoded = [tok(p, add_special_tokens=False)["input_ids"] for p in rows]
    if any(len(ids) == 0 for ids in encoded):
        raise ValueError("every prompt needs at least one token")
    starts = range(0, len(rows), batch_size)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(rows), desc="generate", unit="seq", leave=False)
    out: list[Generation] = []
    for b, start in enumerate(starts):
        chunk = encoded[start:start + batch_size]
        ids, mask = pad_batch(chunk, pad, left=True, device=lm.device)
        width = ids.shape[1]
        torch.manual_seed(seed * 1_000_003 + b)
        with (plan.apply(lm, suite, [len(c) for c in chunk]) if plan is not None
              else nullcontext()):
            seqs = lm.model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg,
                                     streamer=streamer, stopping_criteria=stopping_criteria)
        for i, c in enumerate(chunk):
            new = seqs[i, width:].tolist()
            cut = next((j for j, t in enumerate(new) if t in eos), len(new))
            new = new[:cut]
            out.append(Generation(rows[start + i], tok.decode(new, skip_special_tokens=True),
                                  seed, tuple(c), tuple(new)))
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return out
