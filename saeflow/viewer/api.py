"""The viewer's JSON API (documented in docs/viewer.md). Every route validates its inputs and
answers bad ones with a 4xx JSON message; the work is done by ``AtlasView`` (atlas reads) and
``SteeringService`` (model jobs)."""

from __future__ import annotations

import math

from flask import Blueprint, Response, current_app, jsonify, request

from saeflow.flow import BLOCK_THRESHOLD, RES_THRESHOLD
from saeflow.sites import Feature

bp = Blueprint("saeflow_api", __name__)

MAX_LIMIT = 500
MAX_QUERY = 200


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def _view():
    return current_app.extensions["saeflow.view"]


def _steering():
    return current_app.extensions["saeflow.steering"]


# ---- parameter parsing ------------------------------------------------------------------------
def number(source: dict, name: str, default, lo: float, hi: float, kind=float):
    """A finite number in [lo, hi] from a query dict or JSON body (400 otherwise)."""
    raw = source.get(name, default)
    if raw is None or raw == "":
        return default
    if isinstance(raw, bool):
        raise ApiError(400, f"{name} must be a number, got {raw!r}")
    try:
        value = kind(raw) if kind is float else int(str(raw).strip())
    except (TypeError, ValueError):
        raise ApiError(400, f"{name} must be {'an integer' if kind is int else 'a number'}, "
                            f"got {str(raw)[:40]!r}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise ApiError(400, f"{name} must be finite, got {raw!r}")
    if not lo <= value <= hi:
        raise ApiError(400, f"{name} must be between {lo} and {hi}, got {value}")
    return value


def choice(source: dict, name: str, default, allowed):
    raw = source.get(name, default)
    if raw is None or raw == "":
        return default
    if raw not in allowed:
        raise ApiError(400, f"{name} must be one of {', '.join(map(str, allowed))}, got "
                            f"{str(raw)[:40]!r}")
    return raw


def text(source: dict, name: str, default: str = "", max_len: int = MAX_QUERY) -> str:
    raw = source.get(name, default)
    if raw is None:
        return default
    if not isinstance(raw, str):
        raise ApiError(400, f"{name} must be a string")
    if len(raw) > max_len:
        raise ApiError(400, f"{name} is longer than {max_len} characters")
    return raw


def feature_id(text_id: str) -> Feature:
    """Parse a feature id and check the atlas has it (400 malformed, 404 unknown)."""
    try:
        feature = Feature.parse(text_id)
    except ValueError as e:
        raise ApiError(400, str(e)) from None
    problem = _view().check_feature(feature)
    if problem:
        raise ApiError(404, problem)
    return feature


def thresholds(source: dict) -> tuple[float, float]:
    return (number(source, "res_threshold", RES_THRESHOLD, 0.0, 1.0),
            number(source, "block_threshold", BLOCK_THRESHOLD, 0.0, 1.0))


def max_nodes(source: dict) -> int:
    from saeflow.viewer.data import MAX_GRAPH_NODES
    return int(number(source, "max_nodes", MAX_GRAPH_NODES, 1, 1000, int))


def flag(source: dict, name: str) -> bool:
    """A boolean: JSON true/false, or 1/0/true/false in a query string."""
    raw = source.get(name, False)
    if isinstance(raw, bool):
        return raw
    if str(raw).strip().lower() in ("1", "true"):
        return True
    if str(raw).strip().lower() in ("", "0", "false"):
        return False
    raise ApiError(400, f"{name} must be true or false, got {str(raw)[:40]!r}")


def graph_args(source: dict) -> tuple[float, float, int, bool]:
    """(res_threshold, block_threshold, max_nodes, below_null) of a graph request."""
    return (*thresholds(source), max_nodes(source), flag(source, "below_null"))


def json_bytes(body: bytes) -> Response:
    """An answer whose JSON was encoded (and cached) beforehand."""
    return Response(body, mimetype="application/json")


# ---- atlas routes -------------------------------------------------------------------------------
@bp.get("/overview")
def overview():
    return jsonify(_view().overview(steering=_steering().status()))


@bp.get("/search")
def search():
    q = request.args
    view = _view()
    layer = number(q, "layer", None, 0, 100_000, int)
    return jsonify(view.search(
        query=text(q, "q").strip(),
        lineage=choice(q, "lineage", None, view.classes),
        layer=layer,
        kind=choice(q, "kind", None, view.kinds),
        limit=number(q, "limit", 50, 1, MAX_LIMIT, int),
        offset=number(q, "offset", 0, 0, 10**9, int)))


@bp.get("/features/<path:fid>")
def feature(fid: str):
    f = feature_id(fid)
    return jsonify(_view().feature(f, n_successors=number(request.args, "successors", 5, 1, 50, int),
                                   n_contexts=number(request.args, "contexts", 8, 0, 64, int)))


@bp.get("/graph/<path:fid>")
def graph(fid: str):
    f = feature_id(fid)
    return json_bytes(_view().graph_bytes(f, *graph_args(request.args)))


@bp.get("/permutation/<path:fid>")
def permutation(fid: str):
    return jsonify(_view().permutation_chain(feature_id(fid)))


@bp.get("/share_curves")
def share_curves():
    from saeflow.lineage import SCORE_KINDS
    return json_bytes(_view().share_curves(choice(request.args, "vary", "all",
                                                  ("all", *SCORE_KINDS))))


@bp.get("/export/<path:fid>")
def export(fid: str):
    f = feature_id(fid)
    view = _view()
    fmt = choice(request.args, "fmt", "json", view.export_formats)
    body, mimetype, filename = view.export(f, fmt, *graph_args(request.args))
    return Response(body, mimetype=mimetype,
                    headers={"Content-Disposition": f'attachment; filename="{filename}"'})


# ---- steering routes ----------------------------------------------------------------------------
@bp.post("/steer")
def steer():
    from saeflow.viewer.jobs import QueueFull
    from saeflow.viewer.steering import SteerRequest

    body = _json_body()
    service = _steering()
    if not service.available:
        raise ApiError(409, "this viewer has no model for steering (start it with a suite "
                            "whose model can be loaded)")
    req = SteerRequest(**_steer_fields(body))
    try:
        plan = service.plan(req)
    except (ValueError, KeyError) as e:
        raise ApiError(400, str(e.args[0] if e.args else e)) from None
    try:
        job = service.submit(req, plan)
    except QueueFull as e:
        raise ApiError(429, str(e)) from None
    return jsonify(job.to_json()), 202


def _steer_fields(body: dict) -> dict:
    from saeflow.steer import ACTIONS, MAGNITUDES, MODES, SCHEDULES
    view = _view()
    prompt = text(body, "prompt", "", max_len=2000)
    if not prompt.strip():
        raise ApiError(400, "prompt must not be empty")
    raw_feats = body.get("features") or []
    if not isinstance(raw_feats, list) or len(raw_feats) > 512:
        raise ApiError(400, "features must be a list of at most 512 feature ids")
    feats = [feature_id(str(x)) for x in raw_feats]
    seed = body.get("seed")
    if seed is None and not feats:
        raise ApiError(400, "give a seed feature (its flow graph is steered) or features")
    rt, bt = thresholds(body)
    layer = number(body, "layer", None, 0, max(view.layers), int)
    return dict(
        prompt=prompt, features=feats, seed=feature_id(str(seed)) if seed is not None else None,
        res_threshold=rt, block_threshold=bt, below_null=flag(body, "below_null"),
        action=choice(body, "action", "activate", ACTIONS),
        mode=choice(body, "mode", "cumulative", MODES), layer=layer,
        schedule=choice(body, "schedule", "constant", SCHEDULES),
        coefficient=number(body, "coefficient", 0.2, -1000.0, 1000.0),
        end_coefficient=number(body, "end_coefficient", None, -1000.0, 1000.0),
        alpha=number(body, "alpha", -0.05, -5.0, 5.0),
        magnitude=choice(body, "magnitude", None, MAGNITUDES),
        max_new_tokens=number(body, "max_new_tokens", 32, 1, 256, int),
        random_seed=number(body, "random_seed", 0, 0, 2**31 - 1, int),
        temperature=number(body, "temperature", 1.27, 0.01, 5.0),
        top_p=number(body, "top_p", 0.7, 0.01, 1.0),
        greedy=bool(choice(body, "greedy", False, (True, False))),
        from_token=number(body, "from_token", 0, 0, 100_000, int),
        generated_only=flag(body, "generated_only"))


@bp.post("/themes")
def themes():
    from saeflow.sites import Site
    from saeflow.viewer.jobs import QueueFull

    body = _json_body()
    service = _steering()
    if not service.available:
        raise ApiError(409, "this viewer has no model, which theme search needs")
    description = text(body, "description", "", max_len=200).strip()
    if not description:
        raise ApiError(400, "description must not be empty, e.g. 'weddings'")
    examples = body.get("examples") or []
    if not isinstance(examples, list) or len(examples) > 64 or \
            not all(isinstance(x, str) and len(x) <= 5000 for x in examples):
        raise ApiError(400, "examples must be a list of at most 64 strings of <= 5000 characters")
    site = body.get("site")
    if site is not None:
        try:
            site = Site.parse(str(site))
        except ValueError as e:
            raise ApiError(400, str(e)) from None
        if site not in _view().widths:
            raise ApiError(404, f"the atlas has no site {site}")
    top = number(body, "top", 12, 1, 100, int)
    try:
        job = service.submit_theme(description, examples, site, top)
    except QueueFull as e:
        raise ApiError(429, str(e)) from None
    return jsonify(job.to_json()), 202


def _json_body() -> dict:
    if not request.is_json:
        raise ApiError(415, "send the request body as JSON (Content-Type: application/json)")
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


@bp.get("/jobs/<job_id>")
def job(job_id: str):
    found = _steering().get(job_id)
    if found is None:
        raise ApiError(404, f"no job {job_id[:40]!r} (unknown, or forgotten after many newer jobs)")
    return jsonify(found.to_json())


@bp.get("/status")
def status():
    return jsonify({"steering": _steering().status(), "index": _view().index_status()})
