"""Steering from the viewer: requests become ``saeflow.steer`` plans, run as background jobs.

A request names a seed feature (its flow graph at the given thresholds is steered) and
optionally a subset of that graph's nodes picked on the page (or any features of the atlas).
The plan is built while the request is answered (no model needed, so a bad plan is a 400); the
job then loads the model on first use, resolves magnitudes, and generates the unsteered and the
steered continuation with the same random seed, one after the other. While a continuation runs,
its text grows on the job through a transformers streamer, and a stopping criterion ends the
generation at the next token when the job is cancelled (the viewer is shutting down); neither
touches the model's hooks.

Token window (steering-vectors' ``min_token_index``): ``from_token`` steers only positions
>= N, ``generated_only`` only the generated tokens (``SteeringPlan.from_token`` and
``generated_only``); the default steers every token.

Magnitude default: ``res_norm`` (a coefficient is a fraction of the layer's typical residual
norm, as in ``saeflow steer``) when corpus text is available to measure norms, else ``none``.
Measured magnitudes are cached per feature for the viewer's lifetime.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

from saeflow.flow import BLOCK_THRESHOLD, RES_THRESHOLD
from saeflow.sites import Feature
from saeflow.viewer.jobs import Job, Worker

MAGNITUDE_TEXTS = 32  # paragraphs used to measure res_norm / activation magnitudes


@dataclass(frozen=True)
class SteerRequest:
    prompt: str
    features: list[Feature] = field(default_factory=list)
    seed: Feature | None = None
    res_threshold: float = RES_THRESHOLD
    block_threshold: float = BLOCK_THRESHOLD
    below_null: bool = False  # the graph admits links below their layer's null
    action: str = "activate"
    mode: str = "cumulative"
    layer: int | None = None
    schedule: str = "constant"
    coefficient: float = 0.2
    end_coefficient: float | None = None
    alpha: float = -0.05
    magnitude: str | None = None  # None: res_norm when texts are available, else none
    max_new_tokens: int = 32
    random_seed: int = 0
    temperature: float = 1.27
    top_p: float = 0.7
    greedy: bool = False
    from_token: int = 0  # steer only positions >= from_token
    generated_only: bool = False  # steer only the generated tokens


class SteeringService:
    def __init__(self, view, load: Callable[[], tuple] | None = None, resources: tuple | None = None,
                 texts=None, max_queued: int = 4, reason: str | None = None):
        self.view = view
        self.reason = reason  # why steering is unavailable, when it is
        self.worker = Worker(load, max_queued=max_queued)
        if resources is not None:
            self.worker.set_resources(resources)
        self._texts = list(texts) if texts is not None else None
        self._magnitudes: dict[tuple[str, Feature], float] = {}

    @property
    def available(self) -> bool:
        return self.worker.available

    def status(self) -> dict:
        return {**self.worker.status(), "reason": None if self.available else
                (self.reason or "no model was given to the viewer")}

    def get(self, job_id: str) -> Job | None:
        return self.worker.get(job_id)

    def close(self) -> None:
        self.worker.close()

    # ---- plans (no model) ---------------------------------------------------------------------
    def plan(self, req: SteerRequest):
        """The steering plan of a request, without magnitudes (ValueError when impossible)."""
        from saeflow.flow import FlowGraph, FlowNode
        from saeflow.steer import plan_from_graph

        if req.schedule == "linear" and req.end_coefficient is None:
            raise ValueError("the linear schedule needs end_coefficient")
        graph = self.view.graph(req.seed, req.res_threshold, req.block_threshold,
                                below_null=req.below_null) if req.seed is not None else None
        if req.features:
            known = {n.feature: n for n in graph.nodes} if graph is not None else {}
            nodes = [known.get(f) or FlowNode(f, self.view.lineage(f), self.view.label(f), 0.0)
                     for f in dict.fromkeys(req.features)]
            picked = {n.feature for n in nodes}
            edges = [e for e in (graph.edges if graph is not None else [])
                     if e.source in picked and e.target in picked]
            top = max(layer for layer in (n.feature.layer for n in nodes))
            seed = req.seed if req.seed is not None and req.seed in picked else \
                next(n.feature for n in nodes if n.feature.layer == top)
            graph = FlowGraph(seed=seed, nodes=nodes, edges=edges)
        plan = plan_from_graph(graph, mode=req.mode, layer=req.layer, schedule=req.schedule,
                               coefficient=req.coefficient, alpha=req.alpha,
                               end_coefficient=req.end_coefficient, action=req.action)
        return dataclasses.replace(plan, from_token=req.from_token,
                                   generated_only=req.generated_only)

    def submit(self, req: SteerRequest, plan) -> Job:
        """Queue the job of a request whose ``plan`` was built (raises ``QueueFull``)."""
        job = self.worker.submit("steer", lambda job, res: self._run(job, res, req, plan))
        job.update(request={k: (str(v) if isinstance(v, Feature) else v)
                            for k, v in vars(req).items() if k != "features"},
                   plan=[{"feature": str(f), "coefficient": c} for f, c in plan.terms],
                   window={"from_token": plan.from_token, "generated_only": plan.generated_only},
                   progress={"done": 0, "total": 2 * req.max_new_tokens, "phase": ""},
                   unsteered="", steered="")
        return job

    def submit_theme(self, description: str, examples: list[str] | None, site, top: int) -> Job:
        """Queue a theme search (``saeflow.themes``): the features of ``site`` most specific to
        the theme's text, with their atlas labels."""
        def run(job: Job, resources) -> None:
            from saeflow.memo import setup_memo
            from saeflow.themes import build_theme, rank_features, theme_embedder
            lm, suite = resources
            job.update(progress={"done": 0, "total": 2, "phase": "finding theme text"})
            corpus = self._texts if self._texts else None
            embed = theme_embedder(examples or None)  # one embedder for retrieval and relevance
            theme = build_theme(description, examples=examples or None, corpus=corpus,
                                embed=embed)
            job.update(progress={"done": 1, "total": 2, "phase": "ranking features"},
                       theme_texts=[t[:200] for t in theme.texts[:5]])
            ranked = rank_features(lm, suite, theme, site=site, top=top, atlas=self.view.atlas,
                                   embed=embed, memo=setup_memo())
            job.update(progress={"done": 2, "total": 2, "phase": "done"},
                       features=[{"id": str(r.feature), "score": round(r.score, 3),
                                  "theme_frac": round(r.theme_frac, 3),
                                  "background_frac": round(r.background_frac, 3),
                                  "top_token": r.top_token, "label": r.label,
                                  "lineage": self.view.lineage(r.feature)} for r in ranked])
        job = self.worker.submit("theme", run)
        job.update(request={"description": description, "site": str(site) if site else None,
                            "top": top, "examples": len(examples or [])},
                   progress={"done": 0, "total": 2, "phase": ""}, features=[])
        return job

    # ---- the job (worker thread) --------------------------------------------------------------
    def _texts_for_magnitudes(self) -> list[str]:
        if self._texts is None:
            try:  # the same held-out sample `saeflow steer` measures magnitudes on
                from saeflow.recipes.steering import magnitude_texts
                self._texts = magnitude_texts("default", n=MAGNITUDE_TEXTS)
            except (ImportError, OSError, ValueError):  # no corpus installed: raw rows
                self._texts = []
        return list(self._texts)

    def _with_magnitudes(self, plan, lm, suite, how: str | None):
        from saeflow.steer import feature_magnitudes
        if plan.action != "activate":
            return plan, "none"
        texts = self._texts_for_magnitudes()
        how = how or ("res_norm" if texts else "none")
        missing = [f for f in plan.features if (how, f) not in self._magnitudes]
        if missing:
            found = feature_magnitudes(lm, suite, missing, how, texts=texts)
            self._magnitudes.update({(how, f): m for f, m in found.items()})
        mags = {f: self._magnitudes[(how, f)] for f in plan.features}
        return dataclasses.replace(plan, magnitudes=mags,
                                   info={**plan.info, "magnitude": how}), how

    def _run(self, job: Job, resources, req: SteerRequest, plan) -> None:
        from saeflow.steer import generate
        lm, suite = resources
        plan, how = self._with_magnitudes(plan, lm, suite, req.magnitude)
        job.update(magnitude=how, plan=[{"feature": str(f), "coefficient": c,
                                         "magnitude": plan.magnitude(f)} for f, c in plan.terms])
        for i, (key, p) in enumerate((("unsteered", None), ("steered", plan))):
            job.check()
            stream = _JobStream(lm, job, key, offset=i * req.max_new_tokens,
                                total=2 * req.max_new_tokens)
            out = generate(lm, req.prompt, p, req.max_new_tokens,
                           suite=suite if p is not None else None, seed=req.random_seed,
                           temperature=req.temperature, top_p=req.top_p, greedy=req.greedy,
                           streamer=stream, stopping_criteria=_cancel_criteria(job))
            job.check()  # a cancelled generation stopped early: report it as cancelled
            job.update(**{key: out[0].text})
        job.update(progress={"done": 2 * req.max_new_tokens, "total": 2 * req.max_new_tokens,
                             "phase": "done"})


def _cancel_criteria(job: Job):
    """Stopping criteria that end generation at the next token once ``job`` is cancelled."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Cancelled(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), job.cancelled, dtype=torch.bool,
                              device=input_ids.device)
    return StoppingCriteriaList([Cancelled()])


class _JobStream:
    """A transformers streamer (``put``/``end``) that appends each generated token to
    ``job.data[key]`` and reports progress. ``generate`` first puts the prompt: skipped."""

    def __init__(self, lm, job: Job, key: str, offset: int, total: int):
        self.lm, self.job, self.key, self.offset, self.total = lm, job, key, offset, total
        self.ids: list[int] = []
        self._prompt_seen = False
        job.update(progress={"done": offset, "total": total, "phase": key})

    def put(self, value) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.ids.extend(int(x) for x in value.reshape(-1).tolist())
        self.job.update(**{self.key: self.lm.tokenizer.decode(self.ids, skip_special_tokens=True)},
                        progress={"done": self.offset + len(self.ids), "total": self.total,
                                  "phase": self.key})

    def end(self) -> None:
        pass
