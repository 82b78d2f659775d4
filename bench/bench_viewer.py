"""Load test of the viewer: a bounded burst of API requests on 127.0.0.1, for both servers.

    python bench/bench_viewer.py [--atlas DIR] [--requests 400] [--concurrency 32]

Starts ``saeflow view ATLAS --no-steering`` in a subprocess (once with waitress, once with
werkzeug's threaded server as the baseline, same app, same request list), sends ``--requests``
requests from ``--concurrency`` client threads (capped at 50), and prints per server: errors
(5xx, connection failures, or a status other than the one expected), throughput and latency
percentiles, plus the waitress/werkzeug ratios. The request mix: overview, feature pages,
flow graphs at random thresholds, searches (id, lineage filter, text), a JSON export, and bad
requests that must be answered 4xx. Everything stops by itself: the request count is fixed,
each request has a 30 s timeout, the whole burst a 300 s budget, and the servers are
terminated at the end.

Without ``--atlas``: the SmolLM2 starter atlas from the cache when present, else a planted
12-layer suite (3 x 2,048 features per layer) computed into a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 300


def find_atlas(arg: str | None, tmp: Path) -> Path:
    if arg:
        return Path(arg)
    from saeflow.models import cache_dir
    cached = sorted((cache_dir() / "atlases").glob("*/atlas.json"),
                    key=lambda p: p.parent.name != "smollm2-starter")
    if cached:
        return cached[0].parent
    from saeflow.atlas import compute_atlas
    from saeflow.synthetic import planted_suite
    print("bench: no cached atlas; computing a planted 12-layer atlas (3 x 2048 per layer)")
    suite, _ = planted_suite(n_layers=12, width=2048, d_model=128, seed=0)
    return compute_atlas(suite, tmp / "atlas", progress=False).root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(atlas: Path, backend: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "saeflow.cli", "view", str(atlas),
                             "--port", str(port), "--no-steering", "--server", backend,
                             "--threads", "8"], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    t0 = time.time()
    while time.time() - t0 < 180:
        if proc.poll() is not None:
            raise RuntimeError(f"the {backend} viewer exited: {proc.stderr.read()[-2000:]}")
        try:
            status = json.loads(urllib.request.urlopen(url + "/api/status", timeout=2).read())
            if status["index"]["ready"]:  # measure the steady state, not the start-up indexing
                print(f"bench: {backend} ready (search index built) in {time.time() - t0:.1f} s")
                return proc, url
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"the {backend} viewer was not ready within 180 s")


def request_list(overview: dict, n: int, seed: int = 0) -> list[tuple[str, int]]:
    """``(path, expected status)`` pairs: a fixed, seeded mix."""
    rng = random.Random(seed)
    sites = [(s, w) for s, w in overview["widths"].items()]
    res = [(s, w) for s, w in sites if s.endswith("/res")]

    def feat(pool):
        s, w = rng.choice(pool)
        return f"{s}/{rng.randrange(w)}"
    kinds = [
        (0.10, lambda: ("/api/overview", 200)),
        (0.25, lambda: (f"/api/features/{feat(sites)}", 200)),
        (0.25, lambda: (f"/api/graph/{feat(res)}?res_threshold={rng.choice([0.3, 0.5, 0.7])}"
                        f"&block_threshold={rng.choice([0.1, 0.15, 0.3])}", 200)),
        (0.06, lambda: (f"/api/search?q={feat(sites)}", 200)),
        (0.06, lambda: (f"/api/search?lineage={rng.choice(overview['classes'])}"
                        f"&layer={rng.choice(overview['layers'])}", 200)),
        (0.06, lambda: (f"/api/search?q={rng.choice(['the', 'ing', 'war', 'music', 'zz'])}", 200)),
        (0.04, lambda: (f"/api/export/{feat(res)}?fmt=json", 200)),
        (0.03, lambda: ("/static/app.js", 200)),
        (0.05, lambda: (rng.choice(["/api/features/999/res/1", "/api/jobs/none",
                                    "/api/features/0/res/99999999"]), 404)),
        (0.10, lambda: (rng.choice(["/api/features/bogus", "/api/graph/0/res/0?res_threshold=9",
                                    "/api/search?limit=0", "/api/export/0/res/0?fmt=exe"]), 400)),
    ]
    weights = [w for w, _ in kinds]
    return [rng.choices(kinds, weights)[0][1]() for _ in range(n)]


def burst(url: str, requests: list[tuple[str, int]], concurrency: int) -> dict:
    deadline = time.time() + BUDGET_S
    lat: list[float] = []
    by_route: dict[str, list[float]] = {}
    errors: dict[str, int] = {}

    def one(item):
        path, want = item
        if time.time() > deadline:
            return "skipped (budget)", 0.0
        t0 = time.perf_counter()
        try:
            with urllib.request.urlopen(url + path, timeout=30) as r:
                r.read()
                status = r.status
        except urllib.error.HTTPError as e:
            e.read()
            status = e.code
        except (urllib.error.URLError, OSError) as e:
            return f"connection: {type(e).__name__}", time.perf_counter() - t0
        dt = time.perf_counter() - t0
        return (None if status == want else f"{status} (wanted {want})"), dt

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        for (path, want), (err, dt) in zip(requests, pool.map(one, requests)):
            lat.append(dt)
            route = "bad request (4xx)" if want != 200 else path.split("?")[0].split("/")[2] \
                if path.startswith("/api/") else "static"
            by_route.setdefault(route, []).append(dt)
            if err:
                errors[err] = errors.get(err, 0) + 1
    wall = time.perf_counter() - t0
    lat.sort()

    def pct(q):
        return 1000 * lat[min(len(lat) - 1, int(q * len(lat)))]
    routes = {r: (len(v), 1000 * sorted(v)[len(v) // 2], 1000 * max(v)) for r, v in by_route.items()}
    return {"n": len(requests), "errors": sum(errors.values()), "error_kinds": errors,
            "routes": routes,
            "rps": len(requests) / wall, "p50": pct(0.50), "p95": pct(0.95), "p99": pct(0.99),
            "max": 1000 * lat[-1]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--atlas", default=None, help="atlas folder (default: see module docstring)")
    ap.add_argument("--requests", type=int, default=400, help="requests per server (400)")
    ap.add_argument("--concurrency", type=int, default=32, help="client threads, 1-50 (32)")
    args = ap.parse_args()
    n = max(1, min(args.requests, 5000))
    conc = max(1, min(args.concurrency, 50))
    sys.path.insert(0, str(ROOT))
    with tempfile.TemporaryDirectory(prefix="bench-viewer-") as tmp:
        atlas = find_atlas(args.atlas, Path(tmp))
        print(f"bench: atlas {atlas}; {n} requests at concurrency {conc} on 127.0.0.1")
        results = {}
        for backend in ("werkzeug", "waitress"):
            proc, url = start(atlas, backend)
            try:
                overview = json.loads(urllib.request.urlopen(url + "/api/overview").read())
                reqs = request_list(overview, n)
                burst(url, reqs[: min(40, n)], conc)  # warm-up: caches and lazy label reads
                results[backend] = burst(url, reqs, conc)
                alive = proc.poll() is None
                results[backend]["alive"] = alive and urllib.request.urlopen(
                    url + "/api/overview", timeout=10).status == 200
            finally:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
    print(f"\n{'server':<22}{'errors':>7}{'req/s':>9}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}"
          f"{'max ms':>9}  alive after")
    for backend, r in results.items():
        name = backend + (" (baseline)" if backend == "werkzeug" else "")
        print(f"{name:<22}{r['errors']:>7}{r['rps']:>9.1f}{r['p50']:>9.1f}{r['p95']:>9.1f}"
              f"{r['p99']:>9.1f}{r['max']:>9.1f}  {'yes' if r['alive'] else 'NO'}")
        for kind, count in r["error_kinds"].items():
            print(f"    {count} x {kind}")
        print("    " + ", ".join(f"{route} n={n} p50 {p50:.0f} max {mx:.0f}"
                                  for route, (n, p50, mx) in sorted(r["routes"].items())))
    a, b = results["waitress"], results["werkzeug"]
    print(f"\nwaitress / werkzeug: throughput x{a['rps'] / b['rps']:.2f}, "
          f"p50 x{a['p50'] / b['p50']:.2f}, p95 x{a['p95'] / b['p95']:.2f}, "
          f"p99 x{a['p99'] / b['p99']:.2f}")
    return 1 if any(r["errors"] or not r["alive"] for r in results.values()) else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
