"""Permutations over depth, composition, layer pruning, persistence and the ablation, on planted
suites and tiny models built from a config (answers known in advance)."""

from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import torch

from saeflow.pair_judge import make_pair_judge, parse_verdict
from saeflow.permutation import (PermutationConfig, PermutationStore, compose,
                                 composition_agreement, consecutive_pairs, parse_pairs)
from saeflow.persistence import (PersistenceConfig, matching_score, persistence_distance,
                                 run_ablation, run_persistence)
from saeflow.prune import (Tail, check_tail, collect_states, estimators, explained_variance,
                           parse_layers, prunable_layers, run_pruning)
from saeflow.sae import SAE
from saeflow.sites import Site
from saeflow.suite import Suite
from saeflow.synthetic import permuted_copy


def clustered_jumprelu(width: int = 64, d: int = 32, seed: int = 0) -> SAE:
    """Features in pairs sharing a direction (cosine ~0.999) at decoder norms 1 and 2, with
    per-feature thresholds: without folding, a rescaled copy can swap a pair's members."""
    g = torch.Generator().manual_seed(seed)
    base = torch.nn.functional.normalize(torch.randn(width // 2, d, generator=g), dim=1)
    u = torch.nn.functional.normalize(base.repeat_interleave(2, 0)
                                      + 0.03 * torch.randn(width, d, generator=g), dim=1)
    norms = torch.tensor([1.0, 2.0]).repeat(width // 2)
    W_dec = u * norms[:, None]
    return SAE(W_enc=(u / norms[:, None]).T.contiguous(), b_enc=torch.zeros(width), W_dec=W_dec,
               b_dec=torch.zeros(d), activation="jumprelu",
               threshold=0.05 + 0.5 * torch.rand(width, generator=g))


def planted_chain(n_layers: int = 4, seed: int = 0):
    """Layer l+1 is an exact permutation of layer l, each feature rescaled (same function)."""
    saes, perms = [clustered_jumprelu(seed=seed)], []
    for layer in range(1, n_layers):
        nxt, perm = permuted_copy(saes[-1], seed=seed + layer, noise=0.0, rescale=True)
        saes.append(nxt)
        perms.append(perm)
    suite = Suite.from_saes({Site(i, "res"): s for i, s in enumerate(saes)}, name="chain")
    return suite, perms


def pair_swaps(sae: SAE, copy: SAE, perm: torch.Tensor) -> int:
    """Pairs whose members' decoder-norm order the rescaling reverses (the LAP on unfolded
    rows then prefers the swap)."""
    n_a = sae.W_dec.norm(dim=1)
    n_b = copy.W_dec.norm(dim=1)[perm]
    return int(((n_a[0::2] < n_a[1::2]) != (n_b[0::2] < n_b[1::2])).sum())


# ---- matching and folding ----------------------------------------------------------------------
@pytest.mark.parametrize("objective", ["decoder", "encoder", "both"])
def test_exact_recovery_only_with_folding(objective, tmp_path):
    suite, perms = planted_chain(2)
    a, b = Site(0, "res"), Site(1, "res")
    swaps = pair_swaps(suite[a], suite[b], perms[0])
    assert swaps > 0  # the planted rescaling reverses some pairs
    folded = PermutationStore(suite, PermutationConfig(objective=objective), tmp_path).get(a, b)
    assert torch.equal(folded.perm, perms[0])
    assert folded.mse < 1e-12  # folded rows are identical
    raw = PermutationStore(suite, PermutationConfig(objective=objective, fold=False),
                           tmp_path).get(a, b)
    wrong = raw.perm != perms[0]
    assert int(wrong.sum()) == 2 * swaps  # exactly the reversed pairs, both members each
    assert raw.mse > folded.mse


def test_sparse_solver_recovers_the_folded_permutation(tmp_path):
    suite, perms = planted_chain(2)
    res = PermutationStore(suite, PermutationConfig(solver="sparse", knn=4),
                           tmp_path).get("0/res", "1/res")
    assert res.solver.startswith("sparse") and torch.equal(res.perm, perms[0])


def test_composition_equals_direct_match(tmp_path):
    suite, perms = planted_chain(4)
    store = PermutationStore(suite, PermutationConfig(), tmp_path)
    truth = compose(perms)
    assert torch.equal(store.composed(0, 3), truth)
    assert torch.equal(store.get("0/res", "3/res").perm, truth)
    rows = composition_agreement(store, [0, 1], 3, progress=False)
    assert [(r.start, r.distance) for r in rows] == [(0, 1), (0, 2), (0, 3), (1, 1), (1, 2)]
    assert all(r.agreement == 1.0 for r in rows)
    assert all(abs(r.mse_direct - r.mse_composed) < 1e-12 for r in rows)


def test_store_resumes_and_notices_changed_weights(tmp_path):
    suite, perms = planted_chain(3)
    store = PermutationStore(suite, PermutationConfig(), tmp_path)
    store.compute(consecutive_pairs(suite.sites()), progress=False)
    again = PermutationStore(suite, PermutationConfig(), tmp_path)
    kept = again.stored(Site(0, "res"), Site(1, "res"))
    assert kept is not None and torch.equal(kept.perm, perms[0])
    other, _ = planted_chain(3, seed=5)
    other.name = suite.name
    assert PermutationStore(other, PermutationConfig(), tmp_path).stored(
        Site(0, "res"), Site(1, "res")) is None


def test_parsing_errors_name_the_argument():
    assert parse_pairs("3/res:7/res, 1/mlp:2/mlp") == [(Site(3, "res"), Site(7, "res")),
                                                       (Site(1, "mlp"), Site(2, "mlp"))]
    with pytest.raises(ValueError, match="--pairs"):
        parse_pairs("3/res-7/res")
    assert parse_layers("1-3,7") == [1, 2, 3, 7]
    with pytest.raises(ValueError, match="--layers"):
        parse_layers("3-x")
    with pytest.raises(ValueError, match="objective"):
        PermutationConfig(objective="weights")


def test_matching_score_by_hand():
    fire_a = torch.tensor([[1, 0], [1, 1], [0, 1], [0, 0]], dtype=torch.bool)
    fire_b = torch.tensor([[1, 0], [0, 1], [0, 1], [0, 0]], dtype=torch.bool)
    s = matching_score(fire_a, fire_b, torch.tensor([0, 1]))
    assert s.tolist() == [0.5, 1.0]  # feature 0: both on row 0 of rows {0, 1}
    swapped = matching_score(fire_a, fire_b, torch.tensor([1, 0]))
    assert swapped.tolist() == [1 / 3, 0.0]  # a0 vs b1: row 1 of rows {0, 1, 2}; a1 vs b0: none


def test_persistence_distance_rules():
    from saeflow.persistence import PersistenceRow
    rows = [PersistenceRow(0, d, "coactivation", m, 0.1, 0.01, 50)
            for d, m in [(1, 0.9), (2, 0.6), (3, 0.45), (4, 0.11)]]
    # excess 0.8, 0.5, 0.35, 0.01 (1.96 se = 0.0196): half of 0.8 is 0.4, last met at d=2;
    # above chance by 1.96 se up to d=3
    assert persistence_distance(rows, 0.5) == {"half": 2, "significant": 3}


# ---- a tiny model whose later blocks are the identity ------------------------------------------
def identity_sae(d: int) -> SAE:
    """ReLU SAE with features +e_i and -e_i: relu(x) - relu(-x) reconstructs x exactly."""
    eye = torch.eye(d)
    return SAE(W_enc=torch.cat([eye, -eye], 1), b_enc=torch.zeros(2 * d),
               W_dec=torch.cat([eye, -eye], 0), b_dec=torch.zeros(d))


@pytest.fixture(scope="module")
def identity_setup():
    """Tiny llama whose blocks 2 and 3 add nothing (attention and MLP out-projections zeroed),
    exact SAEs at 0-3/res, each a permuted copy of the one before."""
    from conftest import build_tiny
    lm = build_tiny("llama", seed=3)
    with torch.no_grad():
        for layer in (2, 3):
            lm.blocks[layer].self_attn.o_proj.weight.zero_()
            lm.blocks[layer].mlp.down_proj.weight.zero_()
    saes = [identity_sae(lm.d_model)]
    for layer in range(1, 4):
        saes.append(permuted_copy(saes[-1], seed=layer, noise=0.0, rescale=False)[0])
    suite = Suite.from_saes({Site(i, "res"): s for i, s in enumerate(saes)}, name="identity")
    batches = [torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(i))
               for i in range(2)]
    data = collect_states(lm, [0, 1, 2, 3], batches, full=[0, 1, 2, 3], progress=False)
    return lm, suite, data


def test_identity_block_gives_full_ev_and_no_loss_change(identity_setup, tmp_path):
    lm, suite, data = identity_setup
    store = PermutationStore(suite, PermutationConfig(), tmp_path)
    assert prunable_layers(suite) == [1, 2, 3]
    rows = run_pruning(lm, suite, store, [1, 2], data, out=tmp_path, progress=False)
    by = {(r.layer, r.method): r for r in rows}
    for m in ("permutation", "cosine", "reconstruction", "skip"):
        assert by[(2, m)].explained_variance == pytest.approx(1.0, abs=1e-5)
        assert abs(by[(2, m)].delta_loss) < 1e-4
    # block 1 does work: skipping it loses variance and changes the loss
    assert by[(1, "skip")].explained_variance < 1 - 1e-3
    assert abs(by[(1, "skip")].delta_loss) > 1e-4
    # exact SAEs and their permutation turn the estimate of h_1 into h_0 itself: a skip
    assert by[(1, "permutation")].explained_variance == pytest.approx(
        by[(1, "skip")].explained_variance, abs=1e-5)
    # resumed from prune.json without recomputing
    again = run_pruning(lm, suite, store, [1, 2], data, out=tmp_path, progress=False)
    assert again == rows


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_tail_rerun_reproduces_the_model(tiny_lm, arch):
    lm = tiny_lm(arch)  # gemma2: final logit soft-capping, norms with 1 + weight
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(4))
    data = collect_states(lm, [1], [ids], full=[1], progress=False)
    assert check_tail(lm, data, 1, Tail(lm, 1), tol=1e-4) < 1e-4


def test_wrong_permutation_loses_variance(identity_setup):
    _, suite, data = identity_setup
    a, b = suite[Site(1, "res")], suite[Site(2, "res")]
    ests = estimators(a, b, torch.randperm(a.d_sae, generator=torch.Generator().manual_seed(0)),
                      methods=["permutation"])
    assert explained_variance(data.states[1], data.states[2], ests["permutation"]) < 0.5


def bag_of_tokens(texts):
    """Embedding for the tests: counts of each token id ("t12 t5 ...")."""
    out = torch.zeros(len(texts), 256)
    for i, t in enumerate(texts):
        for w in t.split():
            out[i, int(w[1:])] += 1
    return out


def test_features_persist_through_identity_blocks(identity_setup, tmp_path):
    lm, suite, data = identity_setup
    store = PermutationStore(suite, PermutationConfig(), tmp_path)
    cfg = PersistenceConfig(starts=(1,), max_distance=2, n_features=64, min_fires=2, top_k=3)
    rows, dist = run_persistence(lm, suite, store, data, cfg, embed=bag_of_tokens,
                                 progress=False)
    own = [r for r in rows if r.start == 1]
    assert {(r.distance, r.measure) for r in own} == {(d, m) for d in (1, 2)
                                                     for m in ("coactivation", "semantic")}
    for r in own:
        assert r.mean == pytest.approx(1.0, abs=1e-6)  # the same feature, the same contexts
        assert r.chance < 0.9
    assert dist["1"]["coactivation"] == {"half": 2, "significant": 2}
    # starting at layer 0, block 1 changes the states: persistence is weaker but measured
    rows0, _ = run_persistence(lm, suite, store, data,
                               PersistenceConfig(starts=(0,), max_distance=1, semantic=False),
                               progress=False)
    assert rows0[0].mean < 1.0 and not math.isnan(rows0[0].mean)


class _SameIfEqual(BaseHTTPRequestHandler):
    """A chat endpoint that says SAME when both features show the same contexts."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        text = body["messages"][0]["content"]
        a = text.split("Feature A:\n")[1].split("\n\nFeature B:")[0]
        b = text.split("Feature B:\n")[1].split("\n\nDo A and B")[0]
        verdict = "SAME" if a == b else "DIFFERENT"
        data = json.dumps({"choices": [{"message": {"content": f"{verdict}."}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a):
        pass


def test_llm_judge_of_persisting_pairs(identity_setup, tmp_path):
    lm, suite, data = identity_setup
    server = HTTPServer(("127.0.0.1", 0), _SameIfEqual)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        judge = make_pair_judge(f"http://127.0.0.1:{server.server_port}/v1", "m")
        cfg = PersistenceConfig(starts=(1,), max_distance=2, min_fires=2, semantic=False,
                                judge_pairs=6)
        rows, dist = run_persistence(lm, suite, PermutationStore(suite, PermutationConfig(),
                                                                 tmp_path),
                                     data, cfg, judge=judge, progress=False)
    finally:
        server.shutdown()
    judged = [r for r in rows if r.measure == "judge"]
    assert [r.distance for r in judged] == [1, 2] and all(r.n == 6 for r in judged)
    assert all(r.mean == 3.0 and r.chance < 3.0 for r in judged)  # SAME vs mostly DIFFERENT
    assert parse_verdict("I'd say maybe.") == 2.0
    with pytest.raises(ValueError, match="neither"):
        parse_verdict("no idea")
    with pytest.raises(ValueError, match="both"):
        make_pair_judge("http://127.0.0.1:1/v1", None)


def test_ablation_grid(identity_setup, tmp_path):
    _, suite, data = identity_setup
    rows = run_ablation(suite, tmp_path, PermutationConfig(), [2, 3], data, progress=False)
    assert len(rows) == 3 * 2 * 2
    for r in rows:  # ReLU SAEs: folding changes nothing, every objective finds the permutation
        assert r.mse < 1e-12 and r.explained_variance == pytest.approx(1.0, abs=1e-5)
        assert r.matching_score == pytest.approx(1.0)


def test_permute_command(tmp_path, capsys):
    from saeflow.cli import main
    suite, _ = planted_chain(4)
    folder = suite.save(tmp_path / "suite")
    out = tmp_path / "perms"
    assert main(["permute", str(folder), "--out", str(out), "--spans", "0",
                 "--max-distance", "3", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "composition" in text and (out / "both-folded" / "composition.json").exists()
    assert len(list((out / "both-folded" / "pairs").glob("*.npy"))) == 5  # 3 consecutive + 2
    assert main(["permute", str(folder), "--out", str(out), "--pairs", "0/res-1/res"]) == 2
    assert "--pairs" in capsys.readouterr().err
