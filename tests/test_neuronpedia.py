"""Neuronpedia / circuit-tracer: the graph export folder, the graph schema, explanation labels
and feature links, on a planted suite and on explanation files written here in Neuronpedia's
export layout."""

from __future__ import annotations

import gzip
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from saeflow.atlas import compute_atlas
from saeflow.flow import trace
from saeflow.formats import save_saelens
from saeflow.neuronpedia import (COLUMNS, NeuronpediaIds, feature_code, graph_json,
                                 read_explanations, write_graph_folder)
from saeflow.sites import Feature, Site
from saeflow.suite import read_suite
from saeflow.synthetic import planted_suite

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "tests" / "data" / "neuronpedia_graph.schema.json"
PEERS = REPO / ".venv-peers" / "bin" / "python"
MODEL_ID = "tiny-model"


def unpair(z: int) -> tuple[int, int]:
    """circuit-tracer's frontend's cantorUnpair."""
    w = math.floor((math.sqrt(8 * z + 1) - 1) / 2)
    y = z - (w * w + w) // 2
    return w - y, y


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("np")
    suite, _ = planted_suite(4, 256, 96, seed=6, fractions={"translated": 0.7})
    suite.info = {"neuronpedia": {"model": MODEL_ID, "source": "{layer}-flow-{kind}"}}
    suite.save(root / "suite")
    suite = read_suite(root / "suite")
    atlas = compute_atlas(suite, root / "atlas", progress=False)
    with pytest.warns(UserWarning, match="below their layer's null"):
        graph = trace(atlas, "2/res/3", 0.3, -1.0, below_null=True)
    return root, suite, graph


def write_explanations(root: Path, source: str, rows_by_batch: dict[str, list]) -> None:
    folder = root / "v1" / MODEL_ID / source / "explanations"
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in rows_by_batch.items():
        text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
        if name.endswith(".gz"):
            with gzip.open(folder / name, "wt", encoding="utf-8") as f:
                f.write(text)
        else:
            (folder / name).write_text(text)


def row(index, description, model="gpt-4o-mini"):
    return {"modelId": MODEL_ID, "index": str(index), "description": description,
            "explanationModelName": model, "typeName": "oai_token-act-pair"}


# ---- the graph JSON ----------------------------------------------------------------------
def test_graph_json_codes_rows_and_columns(setup):
    _, _, g = setup
    data = graph_json(g)
    meta = data["metadata"]
    assert meta["schema_version"] == 1 and meta["scan"] == "./data/features"
    assert not meta["scan"].startswith("http") and isinstance(meta["node_threshold"], float)
    feats = [n for n in data["nodes"] if n["feature_type"] == "cross layer transcoder"]
    assert len(feats) == len(g.nodes)
    codes = [n["feature"] for n in feats]
    assert len(set(codes)) == len(codes)  # no two features share a code (labels never bleed)
    for n, node in zip(g.nodes, feats):
        f = n.feature
        assert unpair(node["feature"]) == (3 * f.layer + COLUMNS[f.kind], f.index)
        assert node["layer"] == str(f.layer)  # title L{layer}/{index}
    emb = [n for n in data["nodes"] if n["feature_type"] == "embedding"]
    assert sorted(n["ctx_idx"] for n in emb) == [0, 1, 2] and {n["layer"] for n in emb} == {"E"}
    assert meta["prompt_tokens"] == ["att", "res", "mlp"]
    (logit,) = [n for n in data["nodes"] if n["feature_type"] == "logit"]
    assert int(logit["layer"]) == max(g.layers) + 1 and "(p=" in logit["clerp"]
    col = {n["node_id"]: n["ctx_idx"] for n in data["nodes"]}
    assert all(abs(col[x["source"]] - col[x["target"]]) <= 1 for x in data["links"])
    assert any(n.feature.kind == "att" for n in g.nodes)  # att -> res links were checked


def test_influence_is_small_for_important_nodes(setup):
    _, _, g = setup
    feats = [n for n in graph_json(g)["nodes"] if n["feature_type"] == "cross layer transcoder"]
    infl = {Feature.parse(n["clerp"].split()[0]): n["influence"] for n in feats}
    assert min(infl, key=infl.get) == g.seed and max(infl.values()) == pytest.approx(1.0)
    by_score = sorted(g.nodes, key=lambda n: -n.score)
    assert infl[by_score[1].feature] <= infl[by_score[-1].feature]


def test_export_passes_the_neuronpedia_graph_schema(setup, tmp_path):
    _, _, g = setup
    if not PEERS.exists():
        if os.environ.get("CI"):
            pytest.fail(".venv-peers is missing: bash scripts/setup.sh --test creates it")
        pytest.skip(".venv-peers (with jsonschema) is missing: bash scripts/setup.sh --test")
    good = tmp_path / "good.json"
    good.write_text(json.dumps(graph_json(g)))
    bad = json.loads(good.read_text())
    bad["metadata"]["node_threshold"] = None  # what the export wrote before
    bad_path = tmp_path / "bad.json"
    bad_path.write_text(json.dumps(bad))
    check = ("import json, sys, jsonschema\n"
             "v = jsonschema.Draft7Validator(json.load(open(sys.argv[1])))\n"
             "v.check_schema(v.schema)\n"
             "for p in sys.argv[2:]:\n"
             "    errors = list(v.iter_errors(json.load(open(p))))\n"
             "    print(p, len(errors), errors[0].message if errors else '')\n")
    r = subprocess.run([str(PEERS), "-c", check, str(SCHEMA), str(good), str(bad_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = dict(line.split(" ", 1) for line in r.stdout.strip().splitlines())
    assert out[str(good)].startswith("0 ")
    assert out[str(bad_path)].startswith("1 ") and "None" in out[str(bad_path)]


# ---- the folder circuit-tracer serves ----------------------------------------------------
def test_graph_folder_has_index_and_feature_files(setup, tmp_path):
    _, suite, g = setup
    folder = tmp_path / "ct"
    folder.mkdir()
    (folder / "graph-metadata.json").write_text(json.dumps({"graphs": [{"slug": "other"}]}))
    path = write_graph_folder(g, folder)
    data = json.loads(path.read_text())
    assert path.name == f"{data['metadata']['slug']}.json"
    index = json.loads((folder / "graph-metadata.json").read_text())
    assert [x["slug"] for x in index["graphs"]] == ["other", data["metadata"]["slug"]]
    write_graph_folder(g, folder)  # writing again replaces its own entry only
    assert len(json.loads((folder / "graph-metadata.json").read_text())["graphs"]) == 2
    for node in data["nodes"]:
        if node["feature_type"] == "cross layer transcoder":
            feature = json.loads((folder / "features" / f"{node['feature']}.json").read_text())
            assert feature["index"] == node["feature"]
            assert {"examples_quantiles", "top_logits", "bottom_logits", "act_min",
                    "act_max"} <= set(feature)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="writes a folder"):
        write_graph_folder(g, tmp_path / "file")
    (folder / "graph-metadata.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="graph-metadata.json: not a graph index"):
        write_graph_folder(g, folder)


# ---- explanations, ids and links ---------------------------------------------------------
def test_read_explanations_batches_in_order(tmp_path):
    write_explanations(tmp_path, "3-flow-res", {
        "batch-10.jsonl.gz": [row(1, "late duplicate"), row(7, "seven")],
        "batch-2.jsonl.gz": [row(1, "religion and worship"), "", row(2, "  ")],
        "batch-0.jsonl": [row(5, "plain text batch")],
        "notes.txt": ["not a batch"]})
    got = read_explanations(tmp_path, MODEL_ID, "3-flow-res")
    assert got == {1: "religion and worship", 5: "plain text batch", 7: "seven"}
    assert read_explanations(tmp_path, MODEL_ID, "missing-source") == {}
    write_explanations(tmp_path, "bad", {"batch-0.jsonl.gz": [row(1, "ok"), '{"index": 3}']})
    with pytest.raises(ValueError, match=r"batch-0.jsonl.gz: line 2 is not an explanation row"):
        read_explanations(tmp_path, MODEL_ID, "bad")


def test_ids_from_suite_json_and_from_sae_configs(setup, tmp_path):
    _, suite, _ = setup
    ids = NeuronpediaIds.of_suite(suite)
    assert ids.model_id == MODEL_ID and ids.sources[Site(3, "mlp")] == "3-flow-mlp"
    assert ids.feature_url(Feature.parse("2/res/17")) == \
        "https://neuronpedia.org/tiny-model/2-flow-res/17"
    # SAELens files that carry neuronpedia_id, and a suite.json without the key
    folder = tmp_path / "sl"
    for site in (Site(0, "res"), Site(1, "res")):
        save_saelens(suite[site], folder / site.slug,
                     extra={"neuronpedia_id": f"gpt2-small/{site.layer}-res-jb"})
    sl = read_suite(folder)
    ids = NeuronpediaIds.of_suite(sl)
    assert ids.model_id == "gpt2-small" and ids.sources == {Site(0, "res"): "0-res-jb",
                                                            Site(1, "res"): "1-res-jb"}
    plain = tmp_path / "plain"
    save_saelens(suite[Site(0, "res")], plain / "0-res")
    assert NeuronpediaIds.of_suite(read_suite(plain)) is None


def test_cli_writes_the_folder_with_neuronpedia_labels_and_links(setup, tmp_path):
    root, suite, g = setup
    seed = g.seed
    mlp = next(n.feature for n in g.nodes if n.feature.kind == "mlp")
    write_explanations(tmp_path / "exports", f"{seed.layer}-flow-res",
                       {"batch-0.jsonl.gz": [row(seed.index, "the planted seed concept")]})
    write_explanations(tmp_path / "exports", f"{mlp.layer}-flow-mlp",
                       {"batch-0.jsonl.gz": [row(mlp.index, "an mlp writer")]})
    out = tmp_path / "ct"
    r = subprocess.run([sys.executable, "-m", "saeflow.cli", "graph", str(root / "atlas"),
                        str(seed), "--res-threshold", "0.3", "--block-threshold", "-1",
                        "--format", "neuronpedia", "--out", str(out),
                        "--explanations", str(tmp_path / "exports")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    (graph_file,) = out.glob("saeflow-*.json")
    data = json.loads(graph_file.read_text())
    by_id = {n["node_id"]: n for n in data["nodes"]}
    node = by_id[f"{seed.layer}_{seed.index}_1"]
    assert node["clerp"].endswith(": the planted seed concept")
    assert node["vis_link"] == f"https://neuronpedia.org/{MODEL_ID}/2-flow-res/{seed.index}"
    feature = json.loads((out / "features" / f"{feature_code(seed)}.json").read_text())
    assert feature["top_logits"] == ["the planted seed concept"]
    r = subprocess.run([sys.executable, "-m", "saeflow.cli", "graph", str(root / "atlas"),
                        str(seed), "--format", "dot", "--explanations",
                        str(tmp_path / "exports")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "the planted seed concept" in r.stdout


# ---- circuit-tracer's own frontend code on the export -------------------------------------
ASSETS = next((REPO / ".venv-peers" / "lib").glob("python3*/site-packages/circuit_tracer/"
                                                  "frontend/assets"), None)
NODE_MODULES = REPO / ".venv-peers" / "js" / "node_modules"


def deep_graph():
    """A flow graph down 30 layers (SmolLM2's depth), with mlp and att writers on the way."""
    from saeflow.flow import FlowEdge, FlowGraph, FlowNode
    nodes, edges = [], []
    for layer in range(30):
        f = Feature(Site(layer, "res"), 7)
        nodes.append(FlowNode(f, "translated", f"token {layer}", 0.9))
        if layer:
            edges.append(FlowEdge(Feature(Site(layer - 1, "res"), 7), f, 0.9))
        if layer % 5 == 0:  # same index at all three sites of a layer: codes must still differ
            for kind in ("mlp", "att"):
                nodes.append(FlowNode(Feature(Site(layer, kind), 7), None, kind, 0.3))
                edges.append(FlowEdge(Feature(Site(layer, kind), 7), f, 0.3))
    return FlowGraph(Feature(Site(29, "res"), 7), nodes, edges, {"model": "smollm2"})


def test_circuit_tracer_frontend_rows_titles_and_features(tmp_path):
    import shutil
    missing = [what for what, ok in (("node", shutil.which("node")), ("circuit-tracer's frontend "
               "in .venv-peers", ASSETS), ("npm packages in .venv-peers/js",
               (NODE_MODULES / "d3-jetpack").is_dir())) if not ok]
    if missing:
        why = f"{', '.join(missing)} missing: bash scripts/setup.sh --test installs them"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    g = deep_graph()
    graph_file = write_graph_folder(g, tmp_path / "ct")
    r = subprocess.run(["node", str(REPO / "tests" / "circuit_tracer_frontend.js"), str(ASSETS),
                        str(NODE_MODULES), str(graph_file)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["deleted"] == 0 and out["features"] == len(out["nodes"]) == len(g.nodes) + 4
    rows = [n["streamIdx"] for n in out["nodes"]]
    assert all(0 <= row < out["yNumTicks"] for row in rows)  # every layer has a row
    assert out["yNumTicks"] == 1 + 30 + 1  # the embedding row, 30 layers, the logit row
    titles = {n["nodeId"]: n["title"] for n in out["nodes"]}
    for n in g.nodes:
        f = n.feature
        assert titles[f"{f.layer}_{f.index}_{COLUMNS[f.kind]}"] == f"L{f.layer}/{f.index}"
    assert out["links"] == len(g.edges)
