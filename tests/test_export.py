"""Graph exports: every format renders, round-trips or parses, and the CLI writes them."""

from __future__ import annotations

import io
import json
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
    return trace(atlas, "2/res/3", 0.3, -1.0), out


def test_json_roundtrip(graph_and_dir):
    g, _ = graph_and_dir
    text = render(g, "json")
    assert FlowGraph.from_json(json.loads(text)) == g


def test_graphml_opens_in_networkx(graph_and_dir):
    g, _ = graph_and_dir
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
    g, _ = graph_and_dir
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


def test_neuronpedia_fields(graph_and_dir):
    g, _ = graph_and_dir
    data = json.loads(render(g, "neuronpedia"))
    assert data == neuronpedia(g)
    assert {"slug", "scan", "prompt_tokens", "prompt"} <= set(data["metadata"])
    assert {"pinnedIds", "supernodes", "linkType", "clickedId", "sg_pos"} <= set(data["qParams"])
    ids = {n["node_id"] for n in data["nodes"]}
    assert len(ids) == len(g.nodes)
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
    g, atlas_dir = graph_and_dir
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
