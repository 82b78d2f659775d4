"""circuit-tracer 0.5.0's own frontend on saeflow's ``neuronpedia`` export, in a real headless
browser (Debian's Chromium driven by playwright).

circuit-tracer's own server (``circuit_tracer.frontend.local_server.CircuitGraphHandler``, run
from ``.venv-peers`` and bound to 127.0.0.1) serves its frontend at ``/`` and the export folder
at ``/data/`` and ``/graph_data/``, exactly as ``circuit-tracer start-server --graph_file_dir``
does. The frontend's ``index.html`` loads its libraries from CDNs; with no internet here the test
answers those URLs (``page.route``) with the same versions installed from npm by
``scripts/setup_peers.sh`` (d3, d3-collection + d3-jetpack, dagre, pako). Two of them have no npm
release: ``hotserver-client-ws.js`` (a live-reload client for the page's authors) and
``npy_v0.js`` (the ``.npy`` loader, which this graph never calls: the test checks no ``.npy`` is
requested); they are answered with an empty script. Any other request off 127.0.0.1 fails the
test. The graph is traced on a planted atlas (as in tests/test_neuronpedia.py), beside a
30-layer one; the page is opened with ``?slug=`` only, as the README says. The tests check 0
console errors, every node at a finite position in its layer's row and its site's column, the
seed selected (by the export's own ``qParams``) with its links drawn and its neighbours listed,
and, clicking each feature, its title ``L{layer}/{index}``.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from saeflow.neuronpedia import COLUMNS, write_graph_folder

REPO = Path(__file__).resolve().parents[1]
PEERS = REPO / ".venv-peers" / "bin" / "python"
NODE_MODULES = REPO / ".venv-peers" / "js" / "node_modules"
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

LIB = "https://transformer-circuits.pub/2025/attribution-graphs/static_js/lib/"
# The CDN scripts of circuit-tracer 0.5.0's index.html, and the npm files that answer them.
SCRIPTS = {
    LIB + "d3.js": ["d3/dist/d3.min.js"],
    LIB + "jetpack_2024-07-20.js": ["d3-collection/dist/d3-collection.min.js",
                                    "d3-jetpack/build/d3-jetpack.js"],
    "https://unpkg.com/dagre@0.8.5/dist/dagre.min.js": ["dagre/dist/dagre.min.js"],
    "https://unpkg.com/pako@2.1.0/dist/pako.min.js": ["pako/dist/pako.min.js"],
    LIB + "hotserver-client-ws.js": [],  # the page authors' live reload: no npm release
    LIB + "npy_v0.js": [],  # .npy loader, unused by this graph: no npm release
}
# The one difference between npm's d3-jetpack and the 2024-07-20 build the page loads that the
# page meets: the build's d3.conventions returns c.drawAxis(svg) (svg defaults to c.svg), where
# npm's has d3.drawAxis(c).
DRAW_AXIS = """
;(function () {
  var conventions = d3.conventions
  d3.conventions = function (c) {
    c = conventions(c)
    c.drawAxis = function (svg) { return d3.drawAxis(Object.assign({}, c, {svg: svg || c.svg})) }
    return c
  }
})()
"""

# circuit-tracer's own request handler, on 127.0.0.1 and a free port (its serve() binds all
# interfaces to a fixed port).
SERVER = """
import functools, sys
from circuit_tracer.frontend.local_server import (CircuitGraphHandler, DEFAULT_FRONTEND_DIR,
                                                  ReusableTCPServer)
handler = functools.partial(CircuitGraphHandler, frontend_dir=DEFAULT_FRONTEND_DIR,
                            data_dir=sys.argv[1])
httpd = ReusableTCPServer(("127.0.0.1", 0), handler)
print(httpd.server_address[1], flush=True)
httpd.serve_forever()
"""


def _missing() -> tuple[list[str], list[str]]:
    """What is not installed: the browser (skipped, as the other browser tests are), and the
    peers scripts/setup_peers.sh installs (a failure in CI)."""
    browser = []
    if not Path(CHROMIUM).exists() and not shutil.which("chromium"):
        browser.append("Debian's chromium (apt-get install chromium)")
    try:
        import playwright  # noqa: F401
    except ImportError:
        browser.append("the playwright package")
    peers = []
    if not PEERS.exists() or not list((REPO / ".venv-peers" / "lib").glob(
            "python3*/site-packages/circuit_tracer/frontend/assets/index.html")):
        peers.append("circuit-tracer in .venv-peers")
    peers += [f"{f} in .venv-peers/js (needs npm)" for files in SCRIPTS.values() for f in files
              if not (NODE_MODULES / f).is_file()]
    return browser, peers


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """The flow graph of a planted atlas and a 30-layer one (SmolLM2's depth, past the 26 rows
    the frontend assumes without a logit node), written to one folder as two slugs."""
    browser, peers = _missing()
    if browser:
        pytest.skip("missing: " + "; ".join(browser))
    if peers:
        why = "missing: " + "; ".join(peers) + " (bash scripts/setup_peers.sh installs them)"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    from test_neuronpedia import deep_graph

    from saeflow.atlas import compute_atlas
    from saeflow.flow import trace
    from saeflow.suite import read_suite
    from saeflow.synthetic import planted_suite
    root = tmp_path_factory.mktemp("ctb")
    suite, _ = planted_suite(4, 256, 96, seed=6, fractions={"translated": 0.7})
    suite.save(root / "suite")
    atlas = compute_atlas(read_suite(root / "suite"), root / "atlas", progress=False)
    with pytest.warns(UserWarning, match="below their layer's null"):
        graph = trace(atlas, "2/res/3", 0.3, -1.0, below_null=True)
    deep = deep_graph()
    return {"flow": (graph, write_graph_folder(graph, root / "ct")),
            "deep": (deep, write_graph_folder(deep, root / "ct"))}


@pytest.fixture(scope="module")
def server(export):
    _, graph_file = export["flow"]
    proc = subprocess.Popen([str(PEERS), "-c", SERVER, str(graph_file.parent)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def browser(server):
    """One Chromium for every page of this module (the server is up before it starts)."""
    from playwright.sync_api import sync_playwright
    driver = sync_playwright().start()
    try:
        yield driver.chromium.launch(args=ARGS, executable_path=CHROMIUM if Path(
            CHROMIUM).exists() else shutil.which("chromium"))
    finally:
        driver.stop()  # closes the browser with it


def open_graph(browser, server, graph, graph_file):
    """A page opened on the graph as the README says (``?slug=`` only: the export itself has
    the seed selected), and what it asked the network for and logged as errors."""
    data = json.loads(graph_file.read_text())
    seen = {"errors": [], "offline": [], "status": {}}

    def answer(route):
        url = route.request.url
        if url in SCRIPTS:
            body = "\n;\n".join((NODE_MODULES / f).read_text() for f in SCRIPTS[url])
            if url.endswith("jetpack_2024-07-20.js"):
                body += DRAW_AXIS
            route.fulfill(status=200, content_type="application/javascript", body=body)
        elif url.startswith(server + "/"):
            route.continue_()
        else:
            seen["offline"].append(url)
            route.abort()

    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(15_000)
    page.on("pageerror", lambda e: seen["errors"].append(str(e)))
    page.on("console", lambda m: seen["errors"].append(m.text) if m.type == "error" else None)
    page.on("response", lambda r: seen["status"].__setitem__(r.url[len(server):], r.status)
            if r.url.startswith(server + "/") else None)
    page.route("**/*", answer)
    page.goto(f"{server}/index.html?slug={data['metadata']['slug']}")
    page.wait_for_selector(".link-graph text.node", state="attached")
    page.wait_for_selector(".feature-detail .feature-title", state="attached")
    page.wait_for_load_state("networkidle")
    return page, seen, data


@pytest.fixture(scope="module")
def opened(export, server, browser):
    graph, graph_file = export["flow"]
    page, seen, data = open_graph(browser, server, graph, graph_file)
    yield page, seen, graph, data
    page.close()


def node_id(f) -> str:
    return f"{f.layer}_{f.index}_{COLUMNS[f.kind]}"


LINK_GRAPH = """() => {
  const nodes = [...document.querySelectorAll('.link-graph text.node')].map(el => ({
    nodeId: el.__data__.nodeId, x: el.__data__.pos[0], y: el.__data__.pos[1],
    transform: el.getAttribute('transform'), clicked: el.classList.contains('clicked')}))
  const canvases = [...document.querySelectorAll('.link-graph canvas')]
  const inked = canvases.map(cv => {
    const px = cv.getContext('2d').getImageData(0, 0, cv.width, cv.height).data
    let n = 0
    for (let i = 3; i < px.length; i += 4) n += px[i] > 0
    return n
  })
  return {nodes, inked, circles: document.querySelectorAll('.link-graph circle').length}
}"""

PANELS = """() => ({
  title: document.querySelector('.feature-detail .feature-title')?.innerText,
  clerp: document.querySelector('.feature-detail .pp-clerp')?.innerText,
  connected: [...document.querySelectorAll('.node-connections div.label')].map(e => e.innerText),
  header: document.querySelector('.node-connections .feature-title')?.innerText})"""


def test_the_page_loads_offline_without_console_errors(opened):
    page, seen, graph, data = opened
    assert not seen["errors"], seen["errors"]
    assert seen["offline"] == []  # nothing but the CDN scripts answered above left 127.0.0.1
    status = seen["status"]
    assert status["/data/graph-metadata.json"] == 200
    assert status[f"/graph_data/{data['metadata']['slug']}.json"] == 200
    seed = next(n for n in data["nodes"] if n["node_id"] == node_id(graph.seed))
    assert status[f"/data/features/{seed['feature']}.json"] == 200  # the local feature file
    assert all(code == 200 for code in status.values()), status
    assert not [u for u in status if u.split("?")[0].endswith(".npy")]


def check_positions(page, data, n_layers):
    got = page.evaluate(LINK_GRAPH)
    nodes = {n["nodeId"]: n for n in got["nodes"]}
    assert len(got["nodes"]) == len(nodes) == len(data["nodes"]) == got["circles"]
    assert set(nodes) == {n["node_id"] for n in data["nodes"]}
    for n in got["nodes"]:
        assert math.isfinite(n["x"]) and math.isfinite(n["y"]), n
        assert "NaN" not in n["transform"], n
    # one row per layer, embeddings at the bottom and the logit node on top
    row = {n["node_id"]: -1 if n["layer"] == "E" else int(n["layer"]) for n in data["nodes"]}
    ys: dict[int, set[float]] = {}
    for nid, n in nodes.items():
        ys.setdefault(row[nid], set()).add(round(n["y"], 3))
    assert all(len(v) == 1 for v in ys.values()), ys
    by_row = sorted(ys)
    assert by_row[0] == -1 and by_row[-1] == n_layers  # the embedding and the logit row
    y_of = [next(iter(ys[r])) for r in by_row]  # svg y grows downwards
    assert y_of == sorted(y_of, reverse=True) and len(set(y_of)) == len(y_of), y_of
    # one column per site kind: att, res, mlp from left to right
    col = {n["node_id"]: n["ctx_idx"] for n in data["nodes"]}
    xs = [{round(nodes[nid]["x"], 3) for nid in nodes if col[nid] == c} for c in range(3)]
    assert all(len(v) == 1 for v in xs) and xs[0].pop() < xs[1].pop() < xs[2].pop(), xs
    return got


def test_every_node_is_drawn_at_a_finite_position_in_its_row(opened):
    page, seen, graph, data = opened
    check_positions(page, data, max(graph.layers) + 1)


def test_a_30_layer_graph_gets_a_row_for_every_layer(export, server, browser):
    graph, graph_file = export["deep"]
    page, seen, data = open_graph(browser, server, graph, graph_file)
    try:
        got = check_positions(page, data, 30)
        assert [n["nodeId"] for n in got["nodes"] if n["clicked"]] == [node_id(graph.seed)]
        assert got["inked"][3] > 0
        assert not seen["errors"] and not seen["offline"], seen
    finally:
        page.close()


def test_the_seed_is_selected_with_its_links_drawn(opened):
    page, seen, graph, data = opened
    seed = graph.seed
    got = page.evaluate(LINK_GRAPH)
    assert [n["nodeId"] for n in got["nodes"] if n["clicked"]] == [node_id(seed)]
    # canvases: all, pinned, background and clicked links; the seed's links are drawn on the last
    assert len(got["inked"]) == 4 and got["inked"][3] > 0 and got["inked"][2] > 0
    panels = page.evaluate(PANELS)
    assert re.match(rf"Feature\s+L{seed.layer}/{seed.index}\b", panels["title"]), panels
    assert panels["clerp"].startswith(str(seed)) and panels["header"].startswith(str(seed))
    neighbours = {str(e.source) for e in graph.edges if e.target == seed} | \
                 {str(e.target) for e in graph.edges if e.source == seed}
    assert {t.split()[0] for t in panels["connected"]} == neighbours
    assert not seen["errors"], seen["errors"]


def test_clicking_each_feature_shows_its_layer_and_index(opened):
    page, seen, graph, data = opened
    order = [n.feature for n in graph.nodes if n.feature != graph.seed] + [graph.seed]
    for f in order:
        box = page.evaluate("id => { const r = [...document.querySelectorAll("
                            "'.link-graph text.node')].find(el => el.__data__.nodeId == id)"
                            ".getBoundingClientRect(); return {x: r.x + r.width / 2, "
                            "y: r.y + r.height / 2} }", node_id(f))
        page.mouse.click(box["x"], box["y"])  # the link graph picks the node nearest a click
        panels = page.evaluate(PANELS)
        assert re.match(rf"Feature\s+L{f.layer}/{f.index}\b", panels["title"]), (f, panels)
        assert panels["clerp"].startswith(str(f)), (f, panels)
        clicked = [n["nodeId"] for n in page.evaluate(LINK_GRAPH)["nodes"] if n["clicked"]]
        assert clicked == [node_id(f)]
    assert not seen["errors"], seen["errors"]
