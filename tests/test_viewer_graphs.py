"""The viewer's flow graphs: ``flow.FlowIndex`` (the top-1 links in RAM, children indexed)
reads exactly what the atlas's own lookups say, and the viewer's traces over it are the graphs
``flow.trace`` gives without one, on a planted atlas with long chains (many children, graphs
cut at ``max_nodes``, block seeds, thresholds under and over the nulls)."""

from __future__ import annotations

import random
import warnings

import pytest

from saeflow.atlas import compute_atlas
from saeflow.flow import FlowIndex, trace
from saeflow.sites import Feature
from saeflow.synthetic import planted_suite


@pytest.fixture(scope="module")
def atlas(tmp_path_factory):
    suite, _ = planted_suite(5, 160, 64, seed=3,
                             fractions={"translated": 0.6, "unexplained": 0.05})
    return compute_atlas(suite, tmp_path_factory.mktemp("graphs"), null_samples=256,
                         progress=False)


def test_flow_index_reads_what_the_atlas_says(atlas):
    ix = FlowIndex(atlas)
    fanout = 0
    for site in atlas.sites:
        for i in range(atlas.widths[site]):
            f = site.feature(i)
            node = (ix.number[site], i)

            def feat(n):
                return ix.sites[n[0]].feature(n[1])
            if f.kind == "res":
                for kind, (g, cos) in atlas.predecessors(f).items():
                    p = ix.predecessor(node, kind)
                    assert p is not None and (feat(p[0]), p[1]) == (g, cos)
                assert ix.predecessor(node, "nothing") is None
                assert ix.lineage(node) == atlas.lineage(f)
            succ = ix.successor(node)
            assert ([] if succ is None else [(feat(succ[0]), succ[1])]) == atlas.successors(f)
            kids = [(feat(n), c) for n, c in ix.children(node)]
            assert kids == atlas.children(f)
            fanout = max(fanout, len(kids))
    assert fanout >= 2  # the planted splits are there, so the CSR groups are exercised


@pytest.mark.parametrize("rule", ["stored", "reclassified"])
def test_viewer_graphs_are_flow_traces(atlas, rule):
    from saeflow.viewer.data import AtlasView
    if rule == "reclassified":  # other thresholds: other lineage classes and cuts
        atlas = atlas.with_thresholds(quantile=0.9, min_cos=0.3)
    view = AtlasView(atlas)
    view._prefill_labels()
    rng = random.Random(0)
    seen = {"truncated": 0, "blocks": 0, "children": 0, "block_seed": 0}
    for _ in range(150):
        site = rng.choice(atlas.sites)
        f = Feature(site, rng.randrange(atlas.widths[site]))
        rt, bt = rng.choice([0.0, 0.2, 0.5, 0.8, 0.99]), rng.choice([0.0, 0.15, 0.4, 0.99])
        cap, below = rng.choice([2, 12, 1000]), rng.random() < 0.3
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # below_null warns at chance-level layers
            got = view.graph(f, rt, bt, cap, below).to_json()
            want = trace(atlas, f, rt, bt, max_nodes=cap, below_null=below).to_json()
        assert got == want, (str(f), rt, bt, cap, below)
        seen["truncated"] += got["settings"]["truncated"]
        seen["blocks"] += any(n["site"].split("/")[1] != "res" for n in got["nodes"][1:])
        forks = [e["source"] for e in got["edges"]
                 if e["source"].split("/")[1] == e["target"].split("/")[1] == "res"]
        seen["children"] += len(forks) != len(set(forks))  # a residual node with 2+ successors
        seen["block_seed"] += f.kind != "res" and len(got["nodes"]) > 1
    assert all(seen.values()), seen


def test_an_index_of_another_atlas_is_refused(atlas):
    other = atlas.with_thresholds(quantile=0.5)
    with pytest.raises(ValueError, match="another atlas"):
        trace(atlas, "2/res/3", index=FlowIndex(other))
