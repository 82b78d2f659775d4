"""The viewer's web app: a small Flask app over an atlas, served by waitress (threaded).

``create_app(atlas, ...)`` builds the app: the pages are static files shipped in
``saeflow/viewer/static`` (plain JS and SVG, no CDN, works offline) and talk to the JSON API in
``saeflow.viewer.api``. ``ViewerServer`` binds a port and serves the app until ``shutdown()``;
``saeflow view`` runs one in the foreground, tests run one in a thread.

Safety choices (the viewer runs on a researcher's machine, next to their files):
  - it binds 127.0.0.1 by default; when bound to a loopback address it answers only requests
    whose Host header names a loopback host (a web page cannot reach it by DNS rebinding);
  - files are served only from the static folder (Flask's ``send_from_directory``, which
    refuses paths that leave it); the API takes feature ids and numbers, never paths;
  - every API error is JSON with a message and a 4xx status; an unexpected error is logged on
    the console and answered with a bare 500 message, never a stack trace;
  - POST bodies are JSON only and small (64 KiB), so a cross-site form cannot post to it.
"""

from __future__ import annotations

import gc
import ipaddress
import logging
import sys
import threading
from collections.abc import Callable
from typing import Any
from pathlib import Path

STATIC = Path(__file__).parent / "static"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "[::1]"}

log = logging.getLogger("saeflow.viewer")


def create_app(atlas, *, contexts=None, lm=None, suite=None,
               load_model: Callable[[], tuple] | None = None, texts=None, host: str = DEFAULT_HOST,
               steering_off_reason: str | None = None, permutations: str | Path | None = None):
    """The viewer app for ``atlas`` (an ``saeflow.atlas.Atlas`` or its folder).

    Steering needs a model and the suite: pass ``lm`` and ``suite``, or ``load_model()`` that
    returns ``(lm, suite)`` and runs on the first steering request. ``texts`` are paragraphs
    used to measure steering magnitudes and as the corpus of theme searches (default: the
    bundled corpus). ``permutations`` is the folder ``saeflow permute --out`` wrote (default:
    the suite's, in the cache); ``suite`` (or the atlas's suite folder) checks them."""
    from flask import Flask, jsonify, request, send_from_directory
    from werkzeug.exceptions import HTTPException

    from saeflow.viewer.api import ApiError, bp
    from saeflow.viewer.data import AtlasView
    from saeflow.viewer.steering import SteeringService

    if isinstance(atlas, (str, Path)):
        from saeflow.atlas import Atlas
        atlas = Atlas.load(atlas)
    if contexts is None and getattr(atlas, "root", None) is not None:
        from saeflow.contexts import Contexts
        contexts = Contexts.find(atlas.root)
    view = AtlasView(atlas, contexts=contexts, suite=suite, permutations=permutations)
    view.start_indexing()
    if lm is not None and suite is not None:
        steering = SteeringService(view, resources=(lm, suite), texts=texts)
    else:
        steering = SteeringService(view, load=load_model, texts=texts,
                                   reason=steering_off_reason)

    app = Flask("saeflow.viewer", static_folder=str(STATIC), static_url_path="/static")
    app.config["MAX_CONTENT_LENGTH"] = 64 * 1024
    app.json.sort_keys = False  # pyright: ignore[reportAttributeAccessIssue]  (DefaultJSONProvider)
    app.extensions["saeflow.view"] = view
    app.extensions["saeflow.steering"] = steering
    app.extensions["saeflow.close"] = [view.close, steering.close]  # ViewerServer.shutdown
    app.register_blueprint(bp, url_prefix="/api")
    loopback_only = _is_loopback(host)

    @app.before_request
    def _check_host():
        if loopback_only and _host_name(request.host) not in LOOPBACK_NAMES:
            return jsonify(error=f"host {request.host!r} is not served; open the viewer at "
                                 "http://127.0.0.1"), 403
        return None

    @app.after_request
    def _headers(resp):
        resp.headers["X-Content-Type-Options"] = "nosniff"
        resp.headers["X-Frame-Options"] = "DENY"
        resp.headers["Referrer-Policy"] = "no-referrer"
        resp.headers["Content-Security-Policy"] = (
            "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
            "script-src 'self'; connect-src 'self'; frame-ancestors 'none'")
        if request.path.startswith("/api/"):
            resp.headers.setdefault("Cache-Control", "no-store")
        return resp

    @app.get("/")
    def index():
        return send_from_directory(STATIC, "index.html")

    @app.errorhandler(ApiError)
    def _api_error(e: ApiError):
        return jsonify(error=e.message), e.status

    @app.errorhandler(HTTPException)
    def _http_error(e: HTTPException):
        return jsonify(error=f"{e.name}: {e.description}"), e.code or 500

    @app.errorhandler(Exception)
    def _internal(e: Exception):
        log.exception("viewer: unexpected error on %s %s", request.method, request.path)
        return jsonify(error="internal error (details are in the viewer's console)"), 500

    return app


def _host_name(host: str) -> str:
    host = host.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


BACKENDS = ("auto", "waitress", "werkzeug")
GC_THRESHOLD = 20_000  # allocations between young-generation collections when serving
SWITCH_INTERVAL = 0.001  # seconds a thread holds the GIL while another waits (Python: 0.005)


class ViewerServer:
    """A bound server for an app: waitress with ``threads`` workers, or werkzeug's threaded
    server (``backend="auto"`` takes waitress when it is installed). ``port=0`` picks a free
    port."""

    def __init__(self, app, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, threads: int = 8,
                 backend: str = "auto"):
        if backend not in BACKENDS:
            raise ValueError(f"unknown server backend {backend!r}; known: {', '.join(BACKENDS)}")
        self.app, self.host = app, host
        self._server: Any  # waitress's server or werkzeug's, by ``kind``
        waitress = None
        if backend != "werkzeug":
            try:
                import waitress
            except ImportError:
                if backend == "waitress":
                    raise ImportError("the waitress server is not installed: pip install "
                                      "waitress") from None
        if waitress is not None:
            self.kind = "waitress"
            create = waitress.create_server  # pyright: ignore[reportAttributeAccessIssue]
            self._server = create(app, host=host, port=port, threads=threads,
                                  connection_limit=256, channel_timeout=60,
                                  clear_untrusted_proxy_headers=True, ident="saeflow")
            self.port = int(self._server.effective_port)
        else:
            from werkzeug.serving import make_server
            self.kind = "werkzeug"
            self._server = make_server(host, port, app, threaded=True)
            self.port = int(self._server.server_port)
        self._thread: threading.Thread | None = None
        self._stopped = False

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def serve_forever(self) -> None:
        if threading.current_thread() is threading.main_thread():
            # the process serves the viewer (``saeflow view``): collect less often. A flow
            # graph allocates ~10^5 short-lived objects; at the default threshold (700) the
            # collector runs over a hundred times per graph, and its older passes walk every
            # cached graph: about 15% of a graph's CPU time on the starter atlas.
            gc.set_threshold(GC_THRESHOLD, 20, 20)
            # and hand the GIL over sooner: a request passes it several times (waitress's
            # loop reads it, a worker answers, the loop writes the answer), and each time a
            # graph is being traced in another thread it waits up to the switch interval
            sys.setswitchinterval(SWITCH_INTERVAL)
        if self.kind == "waitress":
            try:
                self._server.run()
            except OSError:
                if not self._stopped:  # else: select() saw a socket shutdown() just closed
                    raise
        else:
            self._server.serve_forever()

    def start(self) -> ViewerServer:
        """Serve in a daemon thread (tests, notebooks)."""
        self._thread = threading.Thread(target=self.serve_forever, name="saeflow-viewer",
                                        daemon=True)
        self._thread.start()
        return self

    def shutdown(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self.kind == "waitress":
            srv = self._server
            logging.getLogger("waitress").setLevel(logging.ERROR)
            while srv._map:  # closing every channel (the listener too) ends the loop
                for channel in list(srv._map.values()):
                    channel.handle_close()
            srv.task_dispatcher.shutdown()
        else:
            self._server.shutdown()
        if self._thread is not None:
            self._thread.join(timeout=10)
        for close in self.app.extensions.get("saeflow.close", []):
            close()  # background threads end before the interpreter does
