"""Load test of the viewer: today's code against a baseline revision, side by side, in one run.

    python bench/bench_viewer.py [--atlas DIR] [--requests 300] [--repeats 3]
                                 [--baseline-rev REV] [--concurrency 4,32]

Starts two ``saeflow view ATLAS --no-steering`` servers on 127.0.0.1, each with its defaults:
  - the baseline: the package as it was at ``--baseline-rev`` (default ``BASELINE_REV``, the
    revision before the viewer's caches and the faster flow-graph layout), unpacked from git
    into a temporary folder and run from there;
  - the new path: this working tree.
Both get the same seeded request mix (overview, feature pages, flow graphs of random residual
features at random thresholds, searches, JSON exports, a static file, bad requests that must be
answered 4xx). For each repeat and each concurrency the two servers get the same fresh request
list (a new seed per repeat, so graph caches do not carry over), one after the other,
alternating which goes first. It prints per concurrency the median over repeats of requests/s
and latency percentiles, the new/baseline ratio of each repeat, and the issue's targets: p95 <=
50 ms and p99 <= 100 ms at concurrency 4, and >= 2x the baseline's requests/s at concurrency 32.

Everything stops by itself: the request count is fixed, each request has a 30 s timeout, each
burst a 300 s budget, and the servers are terminated at the end. Without ``--atlas``: the
SmolLM2 starter atlas from the cache when present, else a planted 12-layer suite (3 x 2,048
features per layer) computed into a temporary folder. The machine may be loaded by other
work: compare the ratios, which are measured side by side.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 300
# the last revision whose viewer recomputed every graph's layout and re-parsed the atlas's
# widths at every node (what the issue measured)
BASELINE_REV = "6ea4365e8f6f67c933bf765aaec9976efb124ef4"
TARGETS = {"p95_c4": 50.0, "p99_c4": 100.0, "rps_ratio_c32": 2.0}


def find_atlas(arg: str | None, tmp: Path) -> Path:
    if arg:
        return Path(arg)
    from saeflow.io import cache_dir
    cached = sorted((cache_dir() / "atlases").glob("*/atlas.json"),
                    key=lambda p: p.parent.name != "smollm2-starter")
    if cached:
        return cached[0].parent
    from saeflow.atlas import compute_atlas
    from saeflow.synthetic import planted_suite
    print("bench: no cached atlas; computing a planted 12-layer atlas (3 x 2048 per layer)")
    suite, _ = planted_suite(n_layers=12, width=2048, d_model=128, seed=0)
    return compute_atlas(suite, tmp / "atlas", progress=False).root


def unpack_baseline(rev: str, dest: Path) -> Path:
    """The ``saeflow`` package at ``rev`` (from this repository's git) under ``dest``."""
    try:
        tar = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", rev, "saeflow"],
                             capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        err = getattr(e, "stderr", b"") or b""
        raise SystemExit(f"bench: cannot read the baseline revision {rev!r} from git "
                         f"({err.decode(errors='replace').strip() or e}); give --baseline-rev")
    dest.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        t.extractall(dest, filter="data")
    found = subprocess.run([sys.executable, "-c", "import saeflow; print(saeflow.__file__)"],
                           cwd=dest, capture_output=True, text=True, env=_env(dest)).stdout.strip()
    if not found.startswith(str(dest)):
        raise SystemExit(f"bench: the baseline folder does not shadow the installed saeflow "
                         f"({found})")
    return dest


def _env(pythonpath: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(pythonpath), "PYTHONDONTWRITEBYTECODE": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(atlas: Path, name: str, code: Path) -> tuple[subprocess.Popen, str]:
    """``saeflow view`` from the package under ``code``, once its search index is built and
    its labels are read (servers that read no labels at start say nothing about them)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "saeflow.cli", "view", str(atlas),
                             "--port", str(port), "--no-steering"], cwd=code, env=_env(code),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    t0 = time.time()
    while time.time() - t0 < 180:
        if proc.poll() is not None:
            err = proc.stderr.read() if proc.stderr is not None else ""
            raise RuntimeError(f"the {name} viewer exited: {err[-2000:]}")
        try:
            status = json.loads(urllib.request.urlopen(url + "/api/status", timeout=2).read())
            index = status["index"]  # measure the steady state, not the start-up indexing
            if index["ready"] and index.get("labels_ready", True):
                print(f"bench: {name} ready (search index built, labels read) in "
                      f"{time.time() - t0:.1f} s")
                return proc, url
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"the {name} viewer was not ready within 180 s")


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


def route_of(path: str, want: int) -> str:
    if want != 200:
        return "4xx"
    return path.split("?")[0].split("/")[2] if path.startswith("/api/") else "static"


def burst(url: str, requests: list[tuple[str, int]], concurrency: int) -> dict:
    deadline = time.time() + BUDGET_S
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
        answers = list(pool.map(one, requests))
    wall = time.perf_counter() - t0
    lat = sorted(dt for _, dt in answers)
    by_route: dict[str, list[float]] = {}
    for (path, want), (err, dt) in zip(requests, answers):
        by_route.setdefault(route_of(path, want), []).append(dt)
        if err:
            errors[err] = errors.get(err, 0) + 1

    def pct(q):
        return 1000 * lat[min(len(lat) - 1, int(q * len(lat)))]
    return {"errors": sum(errors.values()), "error_kinds": errors, "by_route": by_route,
            "rps": len(requests) / wall, "p50": pct(0.50), "p95": pct(0.95), "p99": pct(0.99),
            "max": 1000 * lat[-1]}


def summary(runs: list[dict]) -> dict:
    """Median over repeats of each figure; errors summed; routes pooled."""
    out = {k: statistics.median(r[k] for r in runs) for k in ("rps", "p50", "p95", "p99", "max")}
    out["errors"] = sum(r["errors"] for r in runs)
    kinds: dict[str, int] = {}
    routes: dict[str, list[float]] = {}
    for r in runs:
        for k, v in r["error_kinds"].items():
            kinds[k] = kinds.get(k, 0) + v
        for k, v in r["by_route"].items():
            routes.setdefault(k, []).extend(v)
    out["error_kinds"], out["routes"] = kinds, routes
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--atlas", default=None, help="atlas folder (default: see module docstring)")
    ap.add_argument("--requests", type=int, default=300, help="requests per burst (300)")
    ap.add_argument("--repeats", type=int, default=3, help="bursts per server and concurrency (3)")
    ap.add_argument("--concurrency", default="4,32", help="client threads per burst, 1-64 (4,32)")
    ap.add_argument("--baseline-rev", default=BASELINE_REV,
                    help=f"git revision of the baseline (default {BASELINE_REV[:10]})")
    args = ap.parse_args()
    n = max(1, min(args.requests, 5000))
    repeats = max(1, min(args.repeats, 20))
    try:
        concs = [max(1, min(int(c), 64)) for c in args.concurrency.split(",") if c.strip()]
    except ValueError:
        ap.error(f"--concurrency: give numbers separated by commas, got {args.concurrency!r}")
    sys.path.insert(0, str(ROOT))
    rev = args.baseline_rev
    names = {"baseline": f"baseline ({rev[:10]})", "new": "new (this tree)"}
    with tempfile.TemporaryDirectory(prefix="bench-viewer-") as tmp:
        atlas = find_atlas(args.atlas, Path(tmp))
        code = {"baseline": unpack_baseline(rev, Path(tmp) / "baseline"), "new": ROOT}
        print(f"bench: atlas {atlas}; {repeats} x {n} requests per server at concurrency "
              f"{', '.join(map(str, concs))} on 127.0.0.1; load average "
              f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        procs, urls = {}, {}
        runs: dict[tuple[str, int], list[dict]] = {}
        alive = {}
        try:
            for key in ("baseline", "new"):
                procs[key], urls[key] = start(atlas, names[key], code[key])
            overview = json.loads(urllib.request.urlopen(urls["new"] + "/api/overview").read())
            old = json.loads(urllib.request.urlopen(urls["baseline"] + "/api/overview").read())
            overview["classes"] = [c for c in overview["classes"] if c in old["classes"]]
            warm = request_list(overview, min(60, n), seed=999)
            for key in urls:  # lazy label and column reads, the same for both
                burst(urls[key], warm, 4)
            for rep in range(repeats):
                for conc in concs:
                    reqs = request_list(overview, n, seed=1000 + 10 * rep + conc)
                    order = ("baseline", "new") if (rep + conc) % 2 == 0 else ("new", "baseline")
                    for key in order:
                        runs.setdefault((key, conc), []).append(burst(urls[key], reqs, conc))
                print(f"bench: repeat {rep + 1}/{repeats} done (load average "
                      f"{os.getloadavg()[0]:.1f})")
            for key, url in urls.items():
                alive[key] = procs[key].poll() is None and urllib.request.urlopen(
                    url + "/api/overview", timeout=10).status == 200
        finally:
            for proc in procs.values():
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
    return report(runs, concs, names, alive)


def report(runs: dict, concs: list[int], names: dict, alive: dict) -> int:
    bad = False
    for conc in concs:
        print(f"\nconcurrency {conc} (median over repeats)")
        print(f"{'server':<26}{'errors':>7}{'req/s':>9}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}"
              f"{'max ms':>9}")
        s = {key: summary(runs[(key, conc)]) for key in ("baseline", "new")}
        for key, r in s.items():
            print(f"{names[key]:<26}{r['errors']:>7}{r['rps']:>9.1f}{r['p50']:>9.1f}"
                  f"{r['p95']:>9.1f}{r['p99']:>9.1f}{r['max']:>9.1f}")
            for kind, count in r["error_kinds"].items():
                print(f"    {count} x {kind}")
            bad |= bool(r["errors"])
            print("    " + ", ".join(
                f"{route} p50 {1000 * statistics.median(v):.0f} max {1000 * max(v):.0f}"
                for route, v in sorted(r["routes"].items())))
        pairs = list(zip(runs[("baseline", conc)], runs[("new", conc)]))
        print("new / baseline per repeat: " + "; ".join(
            f"req/s x{n['rps'] / b['rps']:.2f}, p95 x{n['p95'] / b['p95']:.2f}, "
            f"p99 x{n['p99'] / b['p99']:.2f}" for b, n in pairs))
        if conc == 4:
            for q in ("p95", "p99"):
                want = TARGETS[f"{q}_c4"]
                got = {k: s[k][q] for k in s}
                print(f"target {q} <= {want:.0f} ms at concurrency 4: new {got['new']:.1f} ms "
                      f"({'met' if got['new'] <= want else 'NOT met'}), baseline "
                      f"{got['baseline']:.1f} ms")
        if conc == 32:
            ratio = s["new"]["rps"] / s["baseline"]["rps"]
            want = TARGETS["rps_ratio_c32"]
            print(f"target >= {want:.0f}x the baseline's requests/s at concurrency 32: "
                  f"x{ratio:.2f} ({'met' if ratio >= want else 'NOT met'}); p95 new "
                  f"{s['new']['p95']:.1f} ms, baseline {s['baseline']['p95']:.1f} ms")
    for key, ok in alive.items():
        if not ok:
            print(f"the {names[key]} server did not answer after the bursts")
            bad = True
    return 1 if bad else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
