"""Deactivation (saeflow.deactivate) on tiny Llama models with planted SAEs.

The planted model: an orthonormal basis e_0..e_63 of the residual stream; blocks 0 and 1 write
nothing (R_1 = the embeddings); the embeddings have no component along S_m = e_8..e_15 or
S_a = e_16..e_23; block 2's attention cannot write S_r = e_0..e_7 or S_m, its MLP cannot write
S_r or S_a. So along e_j, R_2 = R_1 (j in S_r), = M_2 (j in S_m), = A_2 (j in S_a), exactly.
Every SAE has the 128 features +-e_i (in a different random order per site); the target SAE at
2/res fires above a small threshold. The true predecessor of target +e_j is +e_j at R_1, M_2
or A_2 by construction, and removing it must turn the target off.
"""

from __future__ import annotations

import math

import pytest
import torch

from saeflow.deactivate import (DeactivationConfig, Edit, edit_delta, edited_target_acts,
                                naive_target_acts, pearson_top1, run_deactivation, summarize)
from saeflow.hooks import hook_count
from saeflow.models import lm_from_model
from saeflow.sae import SAE
from saeflow.sites import Feature, Site
from saeflow.suite import Suite
from tiny import tiny_llama

D, L, C = 64, 2, 1e-3  # width, target layer, target threshold
S_R, S_M, S_A = range(0, 8), range(8, 16), range(16, 24)


def make_llama(seed=0, attn="sdpa"):
    return tiny_llama(seed, hidden_size=D, attn_implementation=attn)


def proj_out(Q, idx):
    """Projector onto the complement of the basis vectors ``idx`` (columns of Q)."""
    E = Q[:, list(idx)]
    return torch.eye(D) - E @ E.T


def plus_minus_sae(Q, seed, b=0.0):
    g = torch.Generator().manual_seed(seed)
    dirs = torch.cat([Q.T, -Q.T])  # [128, D]: feature i is +e_i, feature 64 + i is -e_i
    perm = torch.randperm(2 * D, generator=g)
    W_dec = dirs[perm]
    sae = SAE(W_enc=W_dec.T.clone(), b_enc=torch.full((2 * D,), -b), W_dec=W_dec.clone(),
              b_dec=torch.zeros(D))
    index_of_plus = torch.argsort(perm)[:D]  # where +e_i landed
    return sae, index_of_plus


@pytest.fixture(scope="module")
def planted():
    torch.manual_seed(1)
    Q = torch.linalg.qr(torch.randn(D, D))[0]
    model = make_llama(seed=2)
    with torch.no_grad():
        for i in range(L):  # blocks before the target write nothing
            model.model.layers[i].self_attn.o_proj.weight.zero_()
            model.model.layers[i].mlp.down_proj.weight.zero_()
        emb = model.model.embed_tokens.weight
        emb.copy_(emb @ proj_out(Q, [*S_M, *S_A]))
        blk = model.model.layers[L]
        o, down = blk.self_attn.o_proj.weight, blk.mlp.down_proj.weight
        o.copy_(3 * proj_out(Q, [*S_R, *S_M]) @ o)
        down.copy_(3 * proj_out(Q, [*S_R, *S_A]) @ down)
    lm = lm_from_model(model)
    saes, plus = {}, {}
    for n, site in enumerate(["1/res", "2/res", "2/mlp", "2/att"]):
        saes[site], plus[site] = plus_minus_sae(Q, seed=10 + n, b=C if site == "2/res" else 1e-7)
    suite = Suite.from_saes(saes, name="planted")
    g = torch.Generator().manual_seed(3)
    ids = [torch.randint(0, 256, (16,), generator=g) for _ in range(24)]
    corr = [torch.randint(0, 256, (32,), generator=g) for _ in range(48)]
    return lm, suite, plus, ids, corr


def planted_kind(target: Feature, plus) -> tuple[str, int] | None:
    """(kind, j) when the target is +e_j for a planted j, else None."""
    j = int((plus["2/res"] == target.index).nonzero()[0, 0]) if target.index in plus["2/res"] \
        else None
    for kind, rng in (("res", S_R), ("mlp", S_M), ("att", S_A)):
        if j is not None and j in rng:
            return kind, j
    return None


def expected_pred(kind, j, plus):
    site = {"res": "1/res", "mlp": "2/mlp", "att": "2/att"}[kind]
    return str(Feature(Site.parse(site), int(plus[site][j])))


def test_planted_predecessor_found_and_kills_target(planted):
    lm, suite, plus, ids, corr = planted
    cfg = DeactivationConfig(layers=(L,), tokens_per_text=2, corr_tokens=1500, max_pairs=3000)
    res = run_deactivation(lm, suite, ids, corr, cfg, progress=False)
    assert hook_count(lm.model) == 0
    assert res.info["layers"][str(L)]["recompute_error"] < 1e-4
    by_strategy: dict[str, list] = {}
    for p in res.pairs:
        pk = planted_kind(Feature.parse(p.target), plus)
        if pk and pk[0] == p.kind:
            by_strategy.setdefault(p.strategy, []).append((p, pk))
    for strat in ("top1", "top5", "permutation", "exhaustive"):
        got = by_strategy[strat]
        assert len(got) >= 30 and {pk[0] for _, pk in got} == {"res", "mlp", "att"}
        for p, (kind, j) in got:
            assert p.success and p.z_new == 0 and p.change == pytest.approx(1.0)
            if strat in ("top1", "permutation"):
                assert p.predecessors == expected_pred(kind, j, plus)
                assert p.cos == pytest.approx(1.0, abs=1e-5)
    # the data baseline finds the planted predecessor on separate texts
    pe = by_strategy["pearson"]
    assert sum(p.success for p, _ in pe) >= 0.9 * len(pe)
    # one of the top five at random works exactly when it draws the planted predecessor
    rnd = by_strategy["random5"]
    hits = [p.predecessors == expected_pred(kind, j, plus) for p, (kind, j) in rnd]
    assert [p.success for p, _ in rnd] == hits and 0 < sum(hits) < len(hits)
    # the chance level: one active feature of the site at random, right only when it draws
    # the planted predecessor (1 in ~32 active features), far below top-1
    ra = by_strategy["random_active"]
    hits = [p.predecessors == expected_pred(kind, j, plus) for p, (kind, j) in ra]
    assert [p.success for p, _ in ra] == hits and len(ra) >= len(by_strategy["top1"])
    assert 0 < sum(hits) < 0.2 * len(hits)
    assert len({p.predecessors for p, _ in ra}) > 10  # not one fixed pick
    # pre-activation drop: the target's pre-activation x - C goes to 1e-7 - C (the planted
    # predecessor carried the whole projection x up to its own 1e-7 threshold)
    for p, _ in by_strategy["top1"]:
        if p.z_old > 0.05:
            assert p.pre_drop == pytest.approx(1 - (1e-7 - C) / p.z_old, rel=1e-3)
    rows = {(s.strategy, s.layer, s.kind): s for s in res.summary}
    assert rows[("top1", "all", "all")].n == sum(p.strategy == "top1" for p in res.pairs)
    assert rows[("top1", "all", "all")].mean_pre_drop == pytest.approx(
        sum(p.pre_drop for p in res.pairs if p.strategy == "top1") / rows[("top1", "all", "all")].n)
    assert rows[("random_active", "all", "all")].success_rate < \
        0.5 * rows[("top1", "all", "all")].success_rate
    # 1,500 correlation tokens are fewer than the 100k the baseline needs: labelled so
    power = res.info["layers"][str(L)]["pearson"]
    assert power["tokens"] == min(1500, sum(len(x) - 1 for x in corr)) and power["underpowered"]
    assert any("underpowered" in n for n in res.info["layers"][str(L)]["notes"])
    from saeflow.recipes.deactivation import format_table
    table = format_table(res.summary, [L], res.info)
    assert "top-1 Pearson (underpowered)" in table and "random active (chance)" in table
    assert "random of top-5 (weak match)" in table and f"{power['tokens']:,} correlation" in table
    for s in res.summary:  # the oracle tries every single active feature, these among them
        if s.strategy in ("top1", "random5", "random_active", "permutation", "pearson"):
            assert s.oracle_success_rate >= s.success_rate
            assert s.oracle_mean_change >= s.mean_change - 1e-6


def test_unrelated_feature_leaves_target_unchanged(planted):
    lm, suite, plus, ids, _ = planted
    site = Site.parse("1/res")
    sae_t, V = suite["2/res"], suite[site].steering_vectors()
    pre = suite[site].encode(torch.stack([lm.model.model.embed_tokens.weight[x] for x in ids]))
    # a token where target +e_0 is active, and +e_0 and +e_1 are active at R_1
    text, pos = next((i, t) for i in range(len(ids)) for t in range(1, 16)
                     if pre[i, t, plus["1/res"][0]] > 2 * C and pre[i, t, plus["1/res"][1]] > 0)
    tgt = int(plus["2/res"][0])

    def edit(j, r):
        f = int(plus["1/res"][j])
        return Edit(text, pos, site, edit_delta(pre[text, pos, [f]], V[[f]], r))

    edits = [edit(1, 0.0), edit(0, 0.0), edit(0, 1.0)]
    fast = edited_target_acts(lm, ids, edits, L, sae_t)
    naive = torch.stack([naive_target_acts(lm, ids, e, L, sae_t) for e in edits])
    torch.testing.assert_close(fast, naive, atol=1e-6, rtol=1e-4)
    clean = naive_target_acts(lm, ids, Edit(text, pos, site, torch.zeros(D)), L, sae_t)[tgt]
    assert clean > 0
    assert fast[0, tgt] == pytest.approx(float(clean), rel=1e-5)  # unrelated: unchanged
    assert fast[1, tgt] == 0  # the true predecessor: off
    assert fast[2, tgt] == pytest.approx(float(clean), rel=1e-5)  # r = 1: nothing changes


def test_r_sweep_known_answers(planted):
    lm, suite, plus, ids, corr = planted
    cfg = DeactivationConfig(layers=(L,), strategies=("top1",), rs=(1.0, 0.5, -1.0),
                             tokens_per_text=1, max_pairs=1500)
    res = run_deactivation(lm, suite, ids, None, cfg, progress=False)
    n = 0
    for p in res.pairs:
        pk = planted_kind(Feature.parse(p.target), plus)
        if not (pk and pk[0] == p.kind):
            continue
        n += 1
        x = p.z_old + C  # the target's projection; the predecessor's activation is x - 1e-7
        if p.r == 1.0:
            assert abs(p.z_new - p.z_old) < 1e-7 and not p.success
        elif p.r == 0.5:
            expect = 1 - (x - 0.5 * (x - 1e-7) - C) / p.z_old
            if x - 0.5 * (x - 1e-7) > C:
                assert p.change == pytest.approx(expect, abs=1e-4)
        else:
            assert p.success and p.change == pytest.approx(1.0)
    assert n >= 30


def _random_sae(d_in, seed):
    g = torch.Generator().manual_seed(seed)
    return SAE(W_enc=torch.randn(d_in, 96, generator=g), b_enc=torch.zeros(96),
               W_dec=torch.randn(96, d_in, generator=g), b_dec=torch.zeros(d_in))


def _check_batched_equals_naive(lm, att_kind="att"):
    g = torch.Generator().manual_seed(6)
    sae = _random_sae(lm.d_model, 7)
    ids = [torch.randint(0, 256, (n,), generator=g) for n in (9, 14, 5)]
    plan = [(0, 3, "1/res"), (1, 13, "2/mlp"), (2, 4, f"2/{att_kind}"), (1, 1, "1/res"),
            (0, 8, f"2/{att_kind}"), (2, 1, "2/mlp")]
    edits = [Edit(i, t, Site.parse(s), torch.randn(lm.site_width(Site.parse(s)), generator=g))
             for i, t, s in plan]
    fast = edited_target_acts(lm, ids, edits, L, sae, batch_tokens=20)  # several batches
    naive = torch.stack([naive_target_acts(lm, ids, e, L, sae) for e in edits])
    torch.testing.assert_close(fast, naive, atol=1e-5, rtol=1e-4)
    assert hook_count(lm.model) == 0


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_batched_path_equals_full_forward(attn):
    """On a generic random model, rerunning only block L from edited prefixes gives exactly
    what a full forward pass with the edit hooked in gives, at every kind of site."""
    lm = lm_from_model(make_llama(seed=5, attn=attn))
    _check_batched_equals_naive(lm)
    with pytest.raises(ValueError, match="cannot feed"):
        edited_target_acts(lm, [torch.arange(4)], [Edit(0, 1, Site.parse("0/res"),
                                                        torch.zeros(D))], L, _random_sae(D, 0))


@pytest.mark.parametrize("model_type,att_kind", [("qwen2", "att"), ("gemma2", "att_z"),
                                                 ("gemma3_text", "att"), ("gpt2", "att"),
                                                 ("gpt_neox", "att")])
def test_batched_path_other_architectures(tiny_lm, model_type, att_kind):
    _check_batched_equals_naive(tiny_lm(model_type), att_kind)


def test_pearson_top1_known_answer():
    g = torch.Generator().manual_seed(0)
    y = torch.randn(200, 6, generator=g)
    y[:, 5] = 0  # constant column is never picked
    x = torch.stack([2 * y[:, 3] + 1, -y[:, 1] + 0.01 * y[:, 0], torch.ones(200)], dim=1)
    v, i = pearson_top1(x, y, block=2)
    assert i[0] == 3 and v[0] == pytest.approx(1.0)
    assert i[1] != 1  # anti-correlated is not correlated
    assert i[2] == -1 and torch.isnan(v[2])


def test_streaming_pearson_equals_the_in_memory_correlation():
    from saeflow.correlate import StreamingPearson
    g = torch.Generator().manual_seed(1)
    y = torch.relu(torch.randn(3000, 40, generator=g) - 1.5)  # sparse, like SAE activations
    y[:, 7] = 0  # a source that never fires is never picked
    x = torch.stack([y[:, 3] * 2 + 0.1 * torch.relu(torch.randn(3000, generator=g)),
                     torch.relu(y[:, 11] - 0.2), torch.zeros(3000), y[:, 30]], dim=1)
    acc = StreamingPearson(4, 40)
    for i in range(0, 3000, 700):  # uneven chunks
        acc.update(x[i:i + 700], y[i:i + 700])
    v, j = acc.top1()
    v0, j0 = pearson_top1(x, y)
    assert j.tolist() == j0.tolist() == [3, 11, -1, 30]
    torch.testing.assert_close(v[[0, 1, 3]], v0[[0, 1, 3]], atol=1e-4, rtol=1e-4)
    ref = torch.corrcoef(torch.cat([x, y], 1).double().T)[:4, 4:]  # float64 reference
    ref[:, 7] = -2
    torch.testing.assert_close(v[[0, 1, 3]].double(), ref.max(1).values[[0, 1, 3]], atol=1e-6,
                               rtol=1e-6)
    assert torch.isnan(v[2]) and acc.n == 3000
    assert acc.fires.tolist() == (x > 0).sum(0).tolist()
    with pytest.raises(ValueError, match="do not fit"):
        acc.update(x[:5, :3], y[:5])


def test_random_active_draws_uniformly_among_active_features():
    import numpy as np

    from saeflow.deactivate import _pair_specs
    a = np.zeros((1, 50))
    on = [2, 5, 9, 17, 30, 44]
    a[0, on] = 1.0
    occ = [(0, j) for j in range(3000)]  # many targets at one token
    cands = {"res": {"random_active": "draw", "top1": np.full((3000, 1), 9)}}
    specs, n = _pair_specs(occ, {j: j for j in range(3000)}, cands, {"res": a}, None,
                           np.random.default_rng(0), [], 6, np.random.default_rng(1))
    drawn = [act for _, _, _, strat, act in specs if strat == "random_active"]
    assert n == 3000 and len(drawn) == 3000 and all(len(d) == 1 for d in drawn)
    counts = np.bincount([d[0] for d in drawn], minlength=50)
    assert set(np.flatnonzero(counts)) == set(on)
    chi2 = float(((counts[on] - 500) ** 2 / 500).sum())
    assert chi2 < 20.5  # chi-square, 5 degrees of freedom, p = 0.001


def test_summary_counts_and_config_errors():
    from saeflow.deactivate import PairOutcome
    def pair(strategy, kind, pos, z):
        return PairOutcome(6, kind, strategy, 0.0, 0, pos, "6/res/1", "5/res/2", 0.9, 1.0, z,
                           1 - z, z == 0)
    ps = [pair("top1", k, pos, z) for k, pos, z in [("res", 1, 0.0), ("res", 2, 0.5),
                                                    ("mlp", 1, 0.0)]]
    rows = {(s.layer, s.kind): s for s in summarize(ps)}
    assert rows[("6", "res")].n == 2 and rows[("6", "res")].success_rate == 0.5
    assert rows[("all", "all")].n == 3 and rows[("all", "all")].mean_change == pytest.approx(5 / 6)
    assert math.isnan(rows[("all", "all")].oracle_success_rate)  # no oracle was run
    ps += [pair("exhaustive", k, pos, 0.0) for k, pos in [("res", 1), ("res", 2), ("mlp", 1)]]
    rows = {(s.strategy, s.layer, s.kind): s for s in summarize(ps)}
    assert rows[("top1", "6", "res")].oracle_success_rate == 1.0
    assert rows[("top1", "all", "all")].oracle_mean_change == 1.0
    with pytest.raises(ValueError, match="unknown strategies"):
        DeactivationConfig(strategies=("top2",))
    with pytest.raises(ValueError, match="layers must be >= 1"):
        DeactivationConfig(layers=(0,))


def test_checkpoint_resumes_without_recomputing(planted, tmp_path, monkeypatch):
    import saeflow.deactivate as d
    lm, suite, _, ids, _ = planted
    cfg = DeactivationConfig(layers=(L,), strategies=("top1", "random5"), tokens_per_text=2,
                             max_pairs=40)
    first = run_deactivation(lm, suite, ids, None, cfg, checkpoint_dir=tmp_path, progress=False)
    assert (tmp_path / f"layer-{L}.json").exists() and 0 < len(first.pairs) <= 40

    def boom(*a, **k):
        raise AssertionError("recomputed a finished layer")
    monkeypatch.setattr(d, "_run_layer", boom)
    again = run_deactivation(lm, suite, ids, None, cfg, checkpoint_dir=tmp_path, progress=False)
    assert again.pairs == first.pairs
    assert d._fingerprint(cfg, L, suite, ids, None, torch.float32) != \
        d._fingerprint(cfg, L, suite, ids, None, torch.bfloat16)  # another dtype is redone


def test_command_writes_tables_and_plots(tmp_path, capsys):
    """`saeflow deactivate` end to end: a tiny model with a word-level tokenizer saved as a
    folder, a suite folder naming it, a text file of the user's own."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from saeflow.cli import main
    words = [f"w{i}" for i in range(200)]
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}},
                                     unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    model = make_llama(seed=3)
    model.save_pretrained(tmp_path / "model")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(
        tmp_path / "model")
    g = torch.Generator().manual_seed(0)
    saes = {}
    for i, site in enumerate(["1/res", "2/res", "2/mlp", "2/att"]):
        sae = _random_sae(D, 20 + i)
        saes[site] = sae.replace(activation="topk", k=8)
    Suite.from_saes(saes, model=str(tmp_path / "model"), name="tiny").save(tmp_path / "suite")
    paras = [" ".join(words[j] for j in torch.randint(0, 200, (20,), generator=g).tolist())
             for _ in range(40)]
    (tmp_path / "texts.txt").write_text("\n\n".join(paras))
    out = tmp_path / "out"
    argv = ["deactivate", str(tmp_path / "suite"), "--texts", str(tmp_path / "texts.txt"),
            "--layers", "2", "--n-texts", "10", "--tokens-per-text", "2", "--max-pairs", "300",
            "--r", "0,0.5", "--corr-tokens", "400", "--strategies", "top1,top5,pearson",
            "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "top-1 cosine" in printed and "r = 0.5" in printed
    import csv
    import json
    text = (out / "summary.json").read_text()
    assert "NaN" not in text  # strict JSON: the absent oracle is null
    summary = json.loads(text)
    pairs = list(csv.DictReader(open(out / "pairs.csv")))
    top = [r for r in summary["summary"] if r["layer"] == "all" and r["kind"] == "all"]
    assert sum(r["n"] for r in top) == len(pairs) > 0
    assert {float(p["r"]) for p in pairs} == {0.0, 0.5}
    for name in ("summary.csv", "success_by_layer.png", "change_vs_r.png",
                 "checkpoints/layer-2.json"):
        assert (out / name).stat().st_size > 0
    assert main(argv[:-2] + ["--strategies", "top3", "--out", str(out)]) == 2  # clear error


@pytest.mark.slow
def test_smollm2_batched_path_equals_full_forward():
    """The embedded model: rerunning block 12 alone gives what the whole model gives."""
    from saeflow.models import load_model
    lm = load_model("smollm2")
    g = torch.Generator().manual_seed(0)
    W = torch.randn(2048, lm.d_model, generator=g)
    W /= W.norm(dim=1, keepdim=True)
    sae = SAE(W_enc=W.T.clone(), b_enc=torch.zeros(2048), W_dec=W, b_dec=torch.zeros(lm.d_model),
              activation="topk", k=32)
    ids = [lm.tokenizer(t, return_tensors="pt")["input_ids"][0] for t in
           ["The cat sat on the mat because it was warm and quiet.",
            "Physicists measured the mass of the particle with a new detector."]]
    plan = [(0, 5, "11/res"), (1, 9, "12/mlp"), (0, 8, "12/att"), (1, 2, "11/res")]
    edits = [Edit(i, t, Site.parse(s), 3 * torch.randn(lm.d_model, generator=g))
             for i, t, s in plan]
    fast = edited_target_acts(lm, ids, edits, 12, sae)
    naive = torch.stack([naive_target_acts(lm, ids, e, 12, sae) for e in edits])
    torch.testing.assert_close(fast, naive, atol=1e-4, rtol=1e-4)
    assert hook_count(lm.model) == 0
