"""Flow graphs: planted chains are traced backward and forward, pruning works and speaks the
lineage's threshold vocabulary, errors are clear."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from saeflow.atlas import compute_atlas
from saeflow.flow import FlowGraph, trace
from saeflow.lineage import CLASSES
from saeflow.synthetic import planted_suite

TRANSLATED = CLASSES.index("translated")


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    # mostly translated features: long planted chains through all layers
    suite, truth = planted_suite(6, 400, 128, seed=5,
                                 fractions={"translated": 0.8, "unexplained": 0.05})
    atlas = compute_atlas(suite, tmp_path_factory.mktemp("flow"), progress=False)
    return atlas, truth


def _ancestors(truth, layer, i):
    out = []
    while layer > 0 and truth.parent_res[layer][i] >= 0 and truth.classes[layer][i] == TRANSLATED:
        i = int(truth.parent_res[layer][i])
        layer -= 1
        out.append(f"{layer}/res/{i}")
    return out


def test_backward_chain_follows_planted_parents(chain):
    atlas, truth = chain
    L = 5
    for i in np.flatnonzero(truth.classes[L] == TRANSLATED)[:10]:
        g = trace(atlas, f"{L}/res/{i}", block_threshold=1.0, forward=False)
        res = [str(f) for f in g.residual_chain()]
        want = _ancestors(truth, L, int(i))
        # every planted translated ancestor is found; the chain ends where the planted one does
        # (a processed/newborn ancestor may still be reached through its own R parent)
        assert res[-1] == f"{L}/res/{i}" and res[::-1][1:len(want) + 1] == want
        assert all(e.cos >= min(0.5, atlas.thresholds[e.target.layer]["res"]) for e in g.edges)
        assert all(e.source.layer == e.target.layer - 1 for e in g.edges)


def test_forward_reaches_planted_children(chain):
    atlas, truth = chain
    L = 2
    child = int(np.flatnonzero((truth.classes[L + 1] == TRANSLATED))[0])
    parent = int(truth.parent_res[L + 1][child])
    g = trace(atlas, f"{L}/res/{parent}", backward=False, block_threshold=1.0)
    assert f"{L + 1}/res/{child}" in [str(f) for f in g.features]
    assert all(e.target.layer > L or e.target == g.seed for e in g.edges)


def test_nodes_edges_and_pruning(chain):
    atlas, truth = chain
    f = f"3/res/{int(np.flatnonzero(truth.classes[3] == TRANSLATED)[0])}"
    g = trace(atlas, f)
    seed = g.node(f)
    assert seed.score == 1.0 and seed.lineage == atlas.lineage(f)
    for n in g.nodes:
        assert (n.lineage is None) == (n.feature.kind != "res")
    for e in g.edges:  # edges run from earlier sites to the later residual stream
        assert e.target.kind == "res"
        assert e.source.layer < e.target.layer or e.source.kind in ("mlp", "att")
        t = atlas.thresholds[e.target.layer][e.source.kind]
        assert e.cos >= (min(0.5, t) if e.source.kind == "res" else max(0.15, t))
    strict = atlas.with_thresholds(1.0)  # nothing is high: only the user's numbers cut
    only_seed = trace(strict, f, res_threshold=1.0, block_threshold=1.0)
    assert [str(n.feature) for n in only_seed.nodes] == [f] and only_seed.edges == []
    with pytest.warns(UserWarning, match="below their layer's null"):
        blocks = trace(strict, f, res_threshold=1.0, block_threshold=-1.0, below_null=True)
    assert sorted(n.feature.kind for n in blocks.nodes) == ["att", "mlp", "res"]
    assert blocks.settings["warnings"] and blocks.settings["below_null"]
    with pytest.warns(UserWarning):
        small = trace(atlas, f, block_threshold=-1.0, max_nodes=3, below_null=True)
    assert len(small.nodes) == 3 and small.settings["truncated"]


def test_flow_admission_is_consistent_with_lineage(chain):
    """A feature the lineage calls translated or processed keeps its residual chain even under
    the strictest residual cut, and mlp/att nodes enter only when the lineage calls their score
    high (above the null), whatever lower block threshold is asked for."""
    atlas, truth = chain
    L = 4
    codes = atlas.lineage_codes(L)
    r_high = np.flatnonzero(codes <= 3)  # translated, processed_*
    assert len(r_high) > 100
    for i in r_high[:60]:
        f = f"{L}/res/{i}"
        g = trace(atlas, f, res_threshold=1.0, block_threshold=1.0, forward=False)
        pred = atlas.predecessors(f)["res"][0]
        assert pred in g.features, f  # its own chain is not cut
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default admission never warns
        for i in range(0, 400, 7):
            g = trace(atlas, f"{L}/res/{i}", block_threshold=-1.0)
            for e in g.edges:
                if e.source.kind in ("mlp", "att"):
                    layer = e.target.layer
                    assert e.cos > atlas.null_thresholds[layer][e.source.kind]
                    assert e.cos >= atlas.thresholds[layer][e.source.kind]
    with pytest.warns(UserWarning, match="mlp nodes are admitted below"):
        g = trace(atlas, f"{L}/res/{r_high[0]}", block_threshold=-1.0, below_null=True)
    low_blocks = [e for e in g.edges if e.source.kind != "res"]
    assert any(e.cos < atlas.null_thresholds[e.target.layer][e.source.kind]
               for e in low_blocks)  # below_null really admits chance matches


def test_block_seed_goes_forward(chain):
    atlas, truth = chain
    i = int(np.flatnonzero(truth.parent_mlp[4] >= 0)[0])
    m = int(truth.parent_mlp[4][i])
    g = trace(atlas, f"4/mlp/{m}")
    assert g.seed.kind == "mlp" and f"4/res/{i}" in [str(x) for x in g.features]
    assert g.node(f"4/mlp/{m}").lineage is None


def test_errors(chain):
    atlas, _ = chain
    with pytest.raises(KeyError, match="out of range"):
        trace(atlas, "3/res/400")
    with pytest.raises(KeyError, match="no site 9/res"):
        trace(atlas, "9/res/1")
    with pytest.raises(ValueError, match="cosine"):
        trace(atlas, "3/res/1", res_threshold=2.0)


def test_json_roundtrip(chain):
    atlas, _ = chain
    g = trace(atlas, "3/res/7", block_threshold=-1.0)
    data = g.to_json()
    assert data["schema"] == "saeflow.flowgraph/1" and data["seed"] == "3/res/7"
    assert {"id", "layer", "site", "index", "lineage", "label", "score"} <= set(data["nodes"][0])
    assert FlowGraph.from_json(data) == g
    with pytest.raises(ValueError, match="schema"):
        FlowGraph.from_json({**data, "schema": "other/1"})
    with pytest.raises(ValueError, match="not a node"):
        FlowGraph.from_json({**data, "edges": data["edges"] + [
            {"source": "0/res/0", "target": "3/res/7", "cos": 0.9}]})
    with pytest.raises(ValueError, match="missing the field"):
        FlowGraph.from_json({"schema": "saeflow.flowgraph/1", "nodes": []})
