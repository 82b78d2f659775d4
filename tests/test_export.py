"""Graph exports: every format renders, round-trips or parses, and the CLI writes them."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET

import networkx as nx
import pytest

from saeflow.atlas import compute_atlas
from saeflow.export import FORMATS, neuronpedia, render
from saeflow.flow import FlowGraph, trace
from saeflow.synthetic import planted_suite


@pytest.fixture(scope="module")
def graph_and_dir(tmp_path_factory):
    suite, _ = planted_suite(4, 256, 96, seed=6, fractions={"translated": 0.7})
    out = tmp_path_factory.mktemp("export")
    atlas = compute_atlas(suite, out, progress=False)
    with pytest.warns(UserWarning, match="below their layer's null"):  # keep the block nodes
        g = trace(atlas, "2/res/3", 0.3, -1.0, below_null=True)
    return g, out, atlas


def test_json_roundtrip(graph_and_dir):
    g = graph_and_dir[0]
    text = render(g, "json")
    assert FlowGraph.from_json(json.loads(text)) == g


def test_graphml_opens_in_networkx(graph_and_dir):
    g = graph_and_dir[0]
    h = nx.parse_graphml(render(g, "graphml"))
    assert set(h.nodes) == {str(f) for f in g.features}
    assert set(h.edges) == {(str(e.source), str(e.target)) for e in g.edges}
    seed = h.nodes[str(g.seed)]
    assert seed["lineage"] == g.node(g.seed).lineage and seed["layer"] == 2
    blocks = [n for n in g.nodes if n.feature.kind != "res"]
    assert blocks and h.nodes[str(blocks[0].feature)]["lineage"] == ""
    e = g.edges[0]
    assert h.edges[str(e.source), str(e.target)]["cos"] == pytest.approx(e.cos)


def test_dot_svg_png(graph_and_dir):
    g = graph_and_dir[0]
    dot = render(g, "dot")
    assert dot.startswith("digraph flow {") and dot.rstrip().endswith("}")
    assert all(f'"{f}"' in dot for f in g.features)
    assert dot.count("->") == len(g.edges)
    svg = render(g, "svg")
    assert ET.fromstring(svg.encode()).tag.endswith("svg")
    png = render(g, "png")
    assert isinstance(png, bytes) and png[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image as mpimg
    assert mpimg.imread(io.BytesIO(png)).shape[2] in (3, 4)


# labels with the characters real tokens carry: controls, NUL, a non-character
NASTY = "a\x00b\x1bc\x0bd\x7fe\ufffef \"q\" \\ <&>"


def nasty(g: FlowGraph) -> FlowGraph:
    return FlowGraph(g.seed, [dataclasses.replace(n, label=NASTY) for n in g.nodes], g.edges,
                     g.settings)


def test_graphml_with_control_characters_is_valid_xml(graph_and_dir, tmp_path):
    g = nasty(graph_and_dir[0])
    text = render(g, "graphml")
    ET.fromstring(text.encode())  # strict XML parser: raises on a control character
    (tmp_path / "g.graphml").write_text(text, encoding="utf-8")
    h = nx.read_graphml(tmp_path / "g.graphml")
    want = "a\ufffdb\ufffdc\ufffdd\ufffde\ufffdf \"q\" \\ <&>"
    assert {h.nodes[str(f)]["label"] for f in g.features} == {want}


def test_dot_with_control_characters_parses_in_graphviz(graph_and_dir, tmp_path):
    g = nasty(graph_and_dir[0])
    dot = render(g, "dot")
    assert "\x00" not in dot and "\x1b" not in dot and dot.count("->") == len(g.edges)
    if shutil.which("dot") is None:
        if os.environ.get("CI"):
            pytest.fail("Graphviz's dot is missing: bash scripts/setup.sh --test installs it")
        pytest.skip("Graphviz's dot is not installed (bash scripts/setup.sh --test installs it)")
    r = subprocess.run(["dot", "-Tsvg"], input=dot.encode(), capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    svg = ET.fromstring(r.stdout)  # and what Graphviz draws from it is valid XML too
    titles = {t.text for t in svg.iter("{http://www.w3.org/2000/svg}title")}
    assert {str(f) for f in g.features} <= titles
    texts = " ".join(t.text or "" for t in svg.iter("{http://www.w3.org/2000/svg}text"))
    assert "a\ufffdb\ufffdc" in texts and '"q"' in texts


def test_neuronpedia_fields(graph_and_dir):
    g = graph_and_dir[0]
    data = json.loads(render(g, "neuronpedia"))
    assert data == neuronpedia(g)
    assert {"slug", "scan", "prompt_tokens", "prompt"} <= set(data["metadata"])
    assert {"pinnedIds", "supernodes", "linkType", "clickedId", "sg_pos"} <= set(data["qParams"])
    ids = {n["node_id"] for n in data["nodes"]}
    assert len(ids) == len(g.nodes) + 4  # three embedding (column) nodes and one logit node
    for n in data["nodes"]:
        assert {"node_id", "feature", "layer", "ctx_idx", "feature_type", "jsNodeId",
                "clerp"} <= set(n)
        assert isinstance(n["layer"], str) and n["ctx_idx"] in (0, 1, 2)
    assert all(link["source"] in ids and link["target"] in ids for link in data["links"])
    assert data["qParams"]["clickedId"] in ids


def test_unknown_format(graph_and_dir):
    with pytest.raises(ValueError, match="unknown graph format"):
        render(graph_and_dir[0], "pdf")
    assert set(FORMATS) == {"json", "graphml", "dot", "svg", "png", "neuronpedia"}


def test_cli_graph(graph_and_dir, tmp_path):
    _, atlas_dir, atlas = graph_and_dir
    g = trace(atlas, "2/res/3", 0.3, -1.0)  # what the CLI traces (block nodes over the null)
    base = [sys.executable, "-m", "saeflow.cli", "graph", str(atlas_dir), "2/res/3",
            "--res-threshold", "0.3", "--block-threshold", "-1"]
    r = subprocess.run(base, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert FlowGraph.from_json(json.loads(r.stdout)).features == g.features
    r = subprocess.run(base + ["--format", "png", "--out", str(tmp_path / "g.png")],
                       capture_output=True, text=True)
    assert r.returncode == 0 and (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"
    r = subprocess.run(base[:5] + ["2/res/99999"], capture_output=True, text=True)
    assert r.returncode == 2 and "out of range" in r.stderr
    r = subprocess.run(base[:5] + ["2/bogus/1"], capture_output=True, text=True)
    assert r.returncode == 2 and "cannot parse feature" in r.stderr


def test_exports_carry_both_label_lines(graph_and_dir):
    """With ``labels`` (``graph_labels``' readings) DOT shows the promoted tokens under the
    label, GraphML carries every reading (control characters escaped), and the neuronpedia
    feature files list the label, then the promoted tokens."""
    from saeflow.export import graph_labels
    from saeflow.labels import FeatureLabels
    from saeflow.neuronpedia import feature_file, graph_json
    g, _, atlas = graph_and_dir
    plain = graph_labels(atlas, g)  # no model: no readings
    assert set(plain) == set(g.features) and all(v.label == "" for v in plain.values())
    labels = {f: FeatureLabels(f"fires {f.index}", f"fires {f.index}", "…«x»\x01…",
                               "p1 · p\x002", "") for f in g.features}
    dot = render(g, "dot", labels)
    assert "promotes p1 · p\ufffd2" in dot and "\x00" not in dot
    root = ET.fromstring(render(g, "graphml", labels))
    ns = {"g": "http://graphml.graphdrawing.org/xmlns"}
    keys = {k.get("attr.name"): k.get("id") for k in root.findall("g:key", ns)}
    seed = root.find(f"g:graph/g:node[@id='{g.seed}']", ns)
    data = {d.get("key"): d.text for d in seed.findall("g:data", ns)}
    assert data[keys["promotes"]] == "p1 · p\ufffd2" and data[keys["context"]] == "…«x»\ufffd…"
    nodes = {n["node_id"]: n for n in graph_json(g, labels)["nodes"]}
    seed_node = nodes[f"{g.seed.layer}_{g.seed.index}_1"]
    assert seed_node["clerp"].endswith(f": fires {g.seed.index}")
    assert feature_file(g.seed, labels[g.seed])["top_logits"] == [f"fires {g.seed.index}",
                                                                 "p1", "p\x002"]
