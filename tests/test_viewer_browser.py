"""The viewer end to end in a real headless browser (Debian's Chromium driven by playwright).

The server runs in a thread on a free port of 127.0.0.1 over the planted atlas of
``test_viewer_api`` (a tiny Llama with a byte-level tokenizer, so steering runs the real code).
The test opens the overview (lineage bars, share curves over the threshold grid), searches, opens
a feature and its flow graph (thresholds, the below-null warning and switch, the permutation
chain beside it), moves a threshold, clicks a node, and steers (also from the generated tokens
on); it checks what the page shows against the API and the library.
Set ``SAEFLOW_VIEWER_SCREENSHOTS=DIR`` to also save a screenshot of each page.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = [
    pytest.mark.skipif(not Path(CHROMIUM).exists() and not shutil.which("chromium"),
                       reason="Debian's chromium is not installed at /usr/bin/chromium "
                              "(apt-get install chromium)"),
]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    pytest.importorskip("playwright", reason="the playwright package is not installed")
    from test_viewer_api import TEXTS, build_setup

    from saeflow.permutation import PermutationConfig, PermutationStore, consecutive_pairs
    from saeflow.viewer import ViewerServer, create_app
    atlas, suite, lm, truth = build_setup(tmp_path_factory.mktemp("atlas"))
    perms = tmp_path_factory.mktemp("perms")
    PermutationStore(suite, PermutationConfig(), perms).compute(
        consecutive_pairs(suite.sites("res")), progress=False)
    app = create_app(atlas.root, load_model=lambda: (lm, suite), texts=TEXTS, suite=suite,
                     permutations=perms)
    server = ViewerServer(app, port=0).start()
    yield server, atlas, suite, lm
    server.shutdown()


@pytest.fixture(scope="module")
def browser(served):
    from playwright.sync_api import sync_playwright
    exe = CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    ctx = browser.new_context(viewport={"width": 1360, "height": 900})
    pg = ctx.new_page()
    pg.set_default_timeout(20_000)
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    pg.errors = errors
    yield pg
    ctx.close()
    assert not errors, errors


def shot(page, name: str) -> None:
    folder = os.environ.get("SAEFLOW_VIEWER_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(folder) / f"viewer-{name}.png"), full_page=True)


def test_overview_search_feature_graph_and_steering(served, page):
    from saeflow.flow import trace
    from saeflow.steer import generate, plan_from_graph
    server, atlas, suite, lm = served
    url = server.url

    # overview: the suite, the lineage chart, the thresholds
    page.goto(url + "/")
    page.wait_for_selector("[data-testid=lineage-chart]")
    assert page.inner_text("main h1") == "planted"
    bars = page.locator("[data-testid=lineage-chart] rect").count()
    assert bars > 4  # background + at least one bar per layer
    rows = page.locator("[data-testid=thresholds] tbody tr")
    assert rows.count() == len(atlas.layers)
    assert "tiny-llama" in page.inner_text("#suite-name")
    assert "no_prev" in page.inner_text("[data-testid=no-previous]")
    # class shares over the threshold grid: one curve per class present, the layer's marks
    page.wait_for_selector("[data-testid=share-curves] path")
    page.select_option("select[name=curve_layer]", "2")
    page.wait_for_selector("[data-testid=share-curves][data-layer='2']")
    curves = atlas.share_curves()["layers"]["2"]
    drawn = page.eval_on_selector_all("[data-testid=share-curves] path",
                                      "ps => ps.map(p => p.dataset.class)")
    assert drawn and sorted(drawn) == sorted(c for c, v in curves.items() if max(v) > 0)
    assert page.locator("[data-testid=share-curves] [data-mark=threshold-res]").count() == 1
    page.select_option("select[name=curve_layer]", "0")
    page.wait_for_selector("[data-testid=share-curves][data-layer='0'] path")
    drawn0 = page.eval_on_selector_all("[data-testid=share-curves] path",
                                       "ps => ps.map(p => p.dataset.class)")
    assert drawn0 and all(c.startswith("no_prev") for c in drawn0)
    shot(page, "overview")

    # search by lineage and layer from the form
    page.click("header nav >> text=Features")
    page.wait_for_selector("[data-testid=search-form]")
    page.select_option("select[name=lineage]", "translated")
    page.select_option("select[name=layer]", "2")
    page.click("[data-testid=search-form] button")
    page.wait_for_function("() => location.hash.includes('lineage=translated')")
    page.wait_for_selector("[data-testid=results] tbody tr")
    n = int((atlas.lineage_codes(2) == 0).sum())
    assert page.inner_text("[data-testid=result-count]").startswith(f"{n} feature")
    shot(page, "search")

    # quick search by id opens the feature page
    page.fill("#quick-q", "2/res/3")
    page.press("#quick-q", "Enter")
    page.wait_for_selector("[data-testid=feature-id]")
    assert page.inner_text("[data-testid=feature-id]") == "2/res/3"
    pred = atlas.predecessors("2/res/3")["res"][0]
    assert str(pred) in page.inner_text("[data-testid=predecessors]")
    assert page.locator("[data-testid=promoted] .chip").count() == len(atlas.tokens("2/res/3"))
    page.wait_for_selector("[data-testid=contexts] li")
    shot(page, "feature")

    # its flow graph: one circle group per node of the traced graph
    page.click("main a.button:has-text('Flow graph')")
    page.wait_for_selector("[data-testid=flow-graph] g.node")
    graph = trace(atlas, "2/res/3")
    assert page.locator("[data-testid=flow-graph] g.node").count() == len(graph.nodes)
    assert page.inner_text("[data-testid=graph-info]").startswith(f"{len(graph.nodes)} nodes")
    # the permutation chain beside it: one row per residual layer, ticks on the graph's nodes
    page.wait_for_selector("[data-testid=perm-chain] tbody tr")
    chain = page.eval_on_selector_all("[data-testid=perm-chain] tbody tr",
                                      "rs => rs.map(r => [r.dataset.id, r.classList.contains('in-graph')])")
    ids = {str(f) for f in graph.features}
    assert [c[0].split("/")[0] for c in chain] == ["0", "1", "2", "3"] and ["2/res/3", True] in chain
    assert all(marked == (cid in ids) for cid, marked in chain)
    # moving a threshold re-fetches the graph
    rt, bt = next(t for t in ((0.3, 0.3), (0.5, 0.99), (0.05, 0.05))
                  if len(trace(atlas, "2/res/3", *t).nodes) != len(graph.nodes))
    strict = trace(atlas, "2/res/3", rt, bt)
    for name, value in (("res_threshold", rt), ("block_threshold", bt)):
        page.locator(f"input[name={name}]").evaluate(
            f"e => {{ e.value = {value}; e.dispatchEvent(new Event('input')); }}")
    page.wait_for_function(
        f"() => location.hash.includes('res_threshold={rt}&block_threshold={bt}')")
    page.wait_for_function(
        f"() => document.querySelector('[data-testid=graph-info]').textContent.startsWith('{len(strict.nodes)} nodes')")
    assert page.locator("[data-testid=flow-graph] g.node").count() == len(strict.nodes)
    # thresholds below the null: a warning; "below null" admits the chance-level links
    for name in ("res_threshold", "block_threshold"):
        page.locator(f"input[name={name}]").evaluate(
            "e => { e.value = 0.01; e.dispatchEvent(new Event('input')); }")
    page.wait_for_selector("[data-testid=graph-notes] .warn")
    assert "below the null" in page.inner_text("[data-testid=graph-notes]")
    with pytest.warns(UserWarning):
        loose = trace(atlas, "2/res/3", 0.01, 0.01, below_null=True)
    page.check("input[name=below_null]")
    page.wait_for_function("() => location.hash.includes('below_null=1')")
    page.wait_for_function(
        f"() => document.querySelector('[data-testid=graph-info]').textContent.startsWith('{len(loose.nodes)} nodes')")
    page.uncheck("input[name=below_null]")
    for name, value in (("res_threshold", rt), ("block_threshold", bt)):
        page.locator(f"input[name={name}]").evaluate(
            f"e => {{ e.value = {value}; e.dispatchEvent(new Event('input')); }}")
    page.wait_for_function(
        f"() => document.querySelector('[data-testid=graph-info]').textContent.startsWith('{len(strict.nodes)} nodes')")
    href = page.get_attribute("a[data-fmt=svg]", "href")
    r = page.request.get(url + href)
    assert r.status == 200 and r.headers["content-type"].startswith("image/svg+xml")
    shot(page, "graph")

    # clicking a node opens its page
    other = next(n for n in graph.nodes if str(n.feature) != "2/res/3")
    page.locator("input[name=res_threshold]").evaluate(
        "e => { e.value = 0.5; e.dispatchEvent(new Event('input')); }")
    page.locator("input[name=block_threshold]").evaluate(
        "e => { e.value = 0.15; e.dispatchEvent(new Event('input')); }")
    page.wait_for_function(
        f"() => document.querySelector('[data-testid=graph-info]').textContent.startsWith('{len(graph.nodes)} nodes')")
    page.locator(f"g.node[data-id='{other.feature}']").click()
    page.wait_for_selector("[data-testid=feature-id]")
    assert page.inner_text("[data-testid=feature-id]") == str(other.feature)

    # steering from the graph page: the page shows saeflow.steer's generations
    page.go_back()
    page.wait_for_selector("[data-testid=steer-form]")
    page.fill("[data-testid=steer-form] textarea[name=prompt]", "The wedding")
    page.fill("input[name=coefficient]", "40")
    page.select_option("select[name=magnitude]", "none")
    page.fill("input[name=max_new_tokens]", "8")
    page.click("[data-testid=steer-form] button[type=submit]")
    page.wait_for_selector("[data-testid=steer-status][data-status=done]", timeout=120_000)
    plan = plan_from_graph(trace(atlas, "2/res/3"), coefficient=40.0)
    plain = generate(lm, "The wedding", None, 8)[0].text
    steered = generate(lm, "The wedding", plan, 8, suite=suite)[0].text
    assert page.locator("[data-testid=unsteered]").text_content() == plain
    assert page.locator("[data-testid=steered]").text_content() == steered
    assert plain != steered
    assert re.search(rf"{len(plan.terms)} steered features", page.inner_text("[data-testid=steer-plan]"))
    shot(page, "steer")
    # only the generated tokens: saeflow.steer's token window
    import dataclasses
    page.select_option("select[name=window]", "generated")
    page.click("[data-testid=steer-form] button[type=submit]")
    page.wait_for_function("() => document.querySelector('[data-testid=steer-plan]').textContent"
                           ".includes('generated tokens only')")
    page.wait_for_selector("[data-testid=steer-status][data-status=done]", timeout=120_000)
    late = generate(lm, "The wedding", dataclasses.replace(plan, generated_only=True), 8,
                    suite=suite)[0].text
    assert page.locator("[data-testid=steered]").text_content() == late


def test_unknown_feature_shows_an_error(served, page):
    server = served[0]
    page.goto(server.url + "/#/feature/2/res/5000")
    page.wait_for_selector("[data-testid=error]")
    assert "out of range" in page.inner_text("[data-testid=error]")
    page.errors.clear()  # the failed fetch is logged by the browser as a console error
