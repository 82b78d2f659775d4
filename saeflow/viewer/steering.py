"""Steering from the viewer: requests become ``saeflow.steer`` plans, run as background jobs.

A request names a seed feature (its flow graph at the given thresholds is steered) and
optionally a subset of that graph's nodes picked on the page (or any features of the atlas).
The plan is built while the request is answered (no model needed, so a bad plan is a 400); the
job then loads the model on first use, resolves magnitudes, and generates the unsteered and the
steered continuation with the same random seed, one after the other. While a continuation runs,
its text grows on the job: a forward pre-hook on the model sees each sampled token as the input
of the next step (the last token appears when generation returns); the hook is removed when
the continuation ends, and it stops generation at once when the job is cancelled (the viewer
is shutting down).

Magnitude default: ``res_norm`` (a coefficient is a fraction of the layer's typical residual
norm, as in ``saeflow steer``) when corpus text is available to measure norms, else ``none``.
Measured magnitudes are cached per feature for the viewer's lifetime.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from saeflow.sites import Feature
from saeflow.viewer.jobs import Job, Worker

MAGNITUDE_TEXTS = 32  # paragraphs used to measure res_norm / activation magnitudes


@dataclass(frozen=True)
class SteerRequest:
    prompt: str
    features: list[Feature] = field(default_factory=list)
    seed: Feature | None = None
    res_threshold: float = 0.5
    block_threshold: float = 0.15
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
        graph = self.view.graph(req.seed, req.res_threshold, req.block_threshold) \
            if req.seed is not None else None
        if req.features:
            known = {n.feature: n for n in graph.nodes} if graph is not None else {}
            nodes = [known.get(f) or FlowNode(f, self.view.lineage(f), self.view.label(f), 0.0)
                     for f in dict.fromkeys(req.features)]
            picked = {n.feature for n in nodes}
            edges = [e for e in (graph.edges if graph is not None else [])
                     if e.source in picked and e.target in picked]
            top = max(layer for layer in (n.feature.layer for n in nodes))
            seed = req.seed if req.seed in picked else \
                next(n.feature for n in nodes if n.feature.layer == top)
            graph = FlowGraph(seed=seed, nodes=nodes, edges=edges)
        return plan_from_graph(graph, mode=req.mode, layer=req.layer, schedule=req.schedule,
                               coefficient=req.coefficient, alpha=req.alpha,
                               end_coefficient=req.end_coefficient, action=req.action)

    def submit(self, req: SteerRequest, plan) -> Job:
        """Queue the job of a request whose ``plan`` was built (raises ``QueueFull``)."""
        job = self.worker.submit("steer", lambda job, res: self._run(job, res, req, plan))
        job.update(request={k: (str(v) if isinstance(v, Feature) else v)
                            for k, v in vars(req).items() if k != "features"},
                   plan=[{"feature": str(f), "coefficient": c} for f, c in plan.terms],
                   progress={"done": 0, "total": 2 * req.max_new_tokens, "phase": ""},
                   unsteered="", steered="")
        return job

    def submit_theme(self, description: str, examples: list[str] | None, site, top: int) -> Job:
        """Queue a theme search (``saeflow.themes``): the features of ``site`` most specific to
        the theme's text, with their atlas labels."""
        def run(job: Job, resources) -> None:
            from saeflow.themes import build_theme, rank_features
            lm, suite = resources
            job.update(progress={"done": 0, "total": 2, "phase": "finding theme text"})
            corpus = self._texts if self._texts else None
            theme = build_theme(description, examples=examples or None, corpus=corpus)
            job.update(progress={"done": 1, "total": 2, "phase": "ranking features"},
                       theme_texts=[t[:200] for t in theme.texts[:5]])
            ranked = rank_features(lm, suite, theme, site=site, top=top, atlas=self.view.atlas)
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
                from saeflow.commands.steer import magnitude_texts
                self._texts = magnitude_texts("default", n=MAGNITUDE_TEXTS)
            except (ImportError, OSError, ValueError):  # no corpus installed: raw rows
                self._texts = []
        return list(self._texts)

    def _with_magnitudes(self, plan, lm, suite, how: str | None):
        from saeflow.steer import SteeringPlan, feature_magnitudes
        if plan.action != "activate":
            return plan, "none"
        texts = self._texts_for_magnitudes()
        how = how or ("res_norm" if texts else "none")
        missing = [f for f in plan.features if (how, f) not in self._magnitudes]
        if missing:
            found = feature_magnitudes(lm, suite, missing, how, texts=texts)
            self._magnitudes.update({(how, f): m for f, m in found.items()})
        mags = {f: self._magnitudes[(how, f)] for f in plan.features}
        return SteeringPlan(plan.terms, plan.action, mags, {**plan.info, "magnitude": how}), how

    def _run(self, job: Job, resources, req: SteerRequest, plan) -> None:
        from saeflow.steer import generate
        lm, suite = resources
        plan, how = self._with_magnitudes(plan, lm, suite, req.magnitude)
        job.update(magnitude=how, plan=[{"feature": str(f), "coefficient": c,
                                         "magnitude": plan.magnitude(f)} for f, c in plan.terms])
        kwargs = dict(max_new_tokens=req.max_new_tokens, seed=req.random_seed,
                      temperature=req.temperature, top_p=req.top_p, greedy=req.greedy)
        for i, (key, p) in enumerate((("unsteered", None), ("steered", plan))):
            with _streaming(lm, job, key, offset=i * req.max_new_tokens,
                            total=2 * req.max_new_tokens):
                out = generate(lm, req.prompt, p, suite=suite if p is not None else None, **kwargs)
            job.update(**{key: out[0].text})
        job.update(progress={"done": 2 * req.max_new_tokens, "total": 2 * req.max_new_tokens,
                             "phase": "done"})


class _streaming:
    """Context manager: a forward pre-hook on the model that appends each sampled token (seen
    as the input of the next decoding step) to ``job.data[key]``."""

    def __init__(self, lm, job: Job, key: str, offset: int, total: int):
        self.lm, self.job, self.key, self.offset, self.total = lm, job, key, offset, total
        self.ids: list[int] = []
        self.calls = 0
        self.handle = None

    def _hook(self, module, args, kwargs):
        self.job.check()  # raising here stops generate() at once
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.calls += 1
        if self.calls > 1 and ids is not None and ids.ndim == 2:
            self.ids.append(int(ids[0, -1]))
            self.job.update(**{self.key: self.lm.tokenizer.decode(self.ids,
                                                                   skip_special_tokens=True)})
        self.job.update(progress={"done": self.offset + self.calls - 1, "total": self.total,
                                  "phase": self.key})

    def __enter__(self):
        self.handle = self.lm.model.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()
        return False
