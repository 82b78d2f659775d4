"""Activation-based lineage groups (appendix A.1): exact group codes on hand-set activations,
Mann-Whitney tests that find a planted difference and not a planted sameness, and the whole
experiment on a tiny model with planted predecessors, checked against the definition."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from saeflow.groups import (GROUPS, GroupsConfig, activation_groups, group_codes,
                            mann_whitney_tests)
from saeflow.sae import SAE
from saeflow.sites import Site
from saeflow.suite import Suite
from saeflow.tokens import usable_tokens


def test_group_codes_on_hand_set_activations():
    # 2 tokens, 3 target features; sources of width 4
    target = torch.tensor([[1.0, 0.0, 2.0], [0.5, 3.0, 0.0]])
    res = torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 0]])
    mlp = torch.tensor([[0, 0, 0, 0], [0, 0, 1.0, 1.0]])
    att = torch.tensor([[0, 0, 0, 1.0], [0, 1.0, 0, 0]])
    preds = {"res": torch.tensor([0, 1, 0]), "mlp": torch.tensor([2, 3, 2]),
             "att": torch.tensor([3, 1, 1])}
    tok, feat, code = group_codes(target, {"res": res, "mlp": mlp, "att": att}, preds)
    got = {(int(t), int(f)): GROUPS[int(c)] for t, f, c in zip(tok, feat, code)}
    assert got == {(0, 0): "R+A", (0, 2): "R", (1, 0): "M", (1, 1): "M+A"}
    # a missing source (layer 0 has no R_{-1}) never counts as active
    _, _, code = group_codes(target, {"mlp": mlp, "att": att}, preds)
    assert [GROUPS[int(c)] for c in code] == ["A", "from nowhere", "M", "M+A"]


def test_mann_whitney_finds_a_planted_difference_only():
    rng = np.random.default_rng(0)
    codes = np.repeat([GROUPS.index("R"), GROUPS.index("from nowhere"), GROUPS.index("M"),
                       GROUPS.index("A")], [200, 200, 200, 5])
    s_res = np.concatenate([rng.normal(0.8, 0.05, 200), rng.normal(0.3, 0.05, 400),
                            rng.normal(0.8, 0.05, 5)])
    s_mlp = np.concatenate([np.full(600, np.nan), np.zeros(5)])  # no usable score
    tests = mann_whitney_tests(codes, {"res": s_res, "mlp": s_mlp}, min_group=20, alpha=0.001)
    by = {(t["a"], t["b"]): t for t in tests}
    assert set(by) == {("from nowhere", "M"), ("from nowhere", "R"), ("M", "R")}  # A: 5 < 20
    assert by[("from nowhere", "R")]["significant"] and by[("M", "R")]["significant"]
    assert not by[("from nowhere", "M")]["significant"]  # the same distribution
    assert by[("M", "R")]["median_b"] == pytest.approx(0.8, abs=0.02)
    assert all(t["score"] == "res" for t in tests)


def tokenizer_lm():
    from test_steer import char_lm
    return char_lm()


def orthonormal(d, f, seed):
    Q, _ = torch.linalg.qr(torch.randn(d, f, generator=torch.Generator().manual_seed(seed)))
    return Q  # [d, f]


def planted_suite(d=64, f=32):
    """R_2's features are R_1's, shuffled (so each one's top-1 residual predecessor is known,
    with cosine 1); the MLP and attention SAEs of layer 2 are unrelated. ReLU, no biases:
    feature j is active iff its encoder row has a positive product with the hidden state."""
    Q = orthonormal(d, f, 1)
    perm = torch.randperm(f, generator=torch.Generator().manual_seed(2))

    def sae(W_dec, site):
        return SAE(W_enc=W_dec.T.contiguous(), b_enc=torch.zeros(len(W_dec)), W_dec=W_dec,
                   b_dec=torch.zeros(d), activation="relu", site=site)
    saes = {Site(1, "res"): sae(Q.T.contiguous(), Site(1, "res")),
            Site(2, "res"): sae(Q.T[perm].contiguous(), Site(2, "res")),
            Site(2, "mlp"): sae(orthonormal(d, f, 3).T.contiguous(), Site(2, "mlp")),
            Site(2, "att"): sae(orthonormal(d, f, 4).T.contiguous(), Site(2, "att"))}
    return Suite.from_saes(saes, name="planted-groups"), perm


TEXTS = ["I think that weddings are lovely in spring.", "The match ended in a draw.",
         "Physics asks why the constants take their values.", "A short one."]


def test_whole_experiment_matches_the_definition(tmp_path):
    from saeflow.hooks import recording
    lm = tokenizer_lm()
    suite, perm = planted_suite()
    cfg = GroupsConfig(layers=(2,), tokens_per_text=1000, min_group=5)  # every usable token
    res = activation_groups(lm, suite, TEXTS, cfg, progress=False)
    g = res.layers[2]
    assert g.sources == {"res": "1/res", "mlp": "2/mlp", "att": "2/att"}
    # the definition, directly: top-1 predecessors by a plain cosine argmax; record every
    # text, keep its usable tokens, encode, and read the bits
    unit = torch.nn.functional.normalize
    R2 = unit(suite["2/res"].W_dec, dim=1)
    pred = {k: (R2 @ unit(suite[s].W_dec, dim=1).T).argmax(1)
            for k, s in (("prev", "1/res"), ("mlp", "2/mlp"), ("att", "2/att"))}
    assert torch.equal(pred["prev"], perm)  # the planted predecessor
    want = dict.fromkeys(GROUPS, 0)
    for t in TEXTS:
        ids = torch.tensor([lm.tokenizer(t)["input_ids"]])
        with recording(lm, ["1/res", "2/res", "2/mlp", "2/att"]) as rec:
            lm.model(input_ids=ids)
        keep = usable_tokens(rec[Site(1, "res")][0]) & usable_tokens(rec[Site(2, "res")][0])
        a = {("prev" if s.layer == 1 else s.kind): suite[s].encode(h[0][keep])
             for s, h in rec.items()}
        for tok, j in (a["res"] > 0).nonzero().tolist():
            code = sum(bit * int(a[k][tok, pred[k][j]] > 0)
                       for bit, k in ((4, "prev"), (2, "mlp"), (1, "att")))
            want[GROUPS[code]] += 1
    assert g.occurrences == want and sum(want.values()) > 100
    assert min(want.values()) < max(want.values())  # not a degenerate split
    # s(R) is 1 for every feature (copies), so no s(R) test can be significant
    assert g.medians["R"]["res"] == pytest.approx(1.0, abs=1e-5)
    assert not any(t["significant"] for t in g.tests if t["score"] == "res")
    # an atlas's stored matches give the same groups
    from saeflow.atlas import compute_atlas
    atlas = compute_atlas(suite, tmp_path / "atlas", progress=False)
    again = activation_groups(lm, suite, TEXTS, cfg, atlas=atlas, progress=False)
    assert again.layers[2].occurrences == g.occurrences
    path = res.save(tmp_path / "out" / "groups.json")
    data = json.loads(path.read_text())
    assert data["schema"] == "saeflow.groups/1" and set(data["layers"]["2"]["occurrences"]) == set(
        GROUPS)
    assert "from nowhere" in res.table() and "p < 0.001" in res.table()
    with pytest.raises(ValueError, match="no SAE at 5/res"):
        activation_groups(lm, suite, TEXTS, GroupsConfig(layers=(5,)), progress=False)


def test_cli_groups(tmp_path, capsys):
    from saeflow.cli import main
    lm = tokenizer_lm()
    model_dir = tmp_path / "tiny-model"
    lm.model.save_pretrained(model_dir)
    lm.tokenizer.save_pretrained(model_dir)
    suite, _ = planted_suite()
    suite.model = str(model_dir)
    suite.save(tmp_path / "suite")
    texts = tmp_path / "texts.txt"
    texts.write_text("\n\n".join(TEXTS * 3))
    out = tmp_path / "groups"
    assert main(["groups", str(tmp_path / "suite"), "--texts", str(texts), "--layers", "2",
                 "--min-group", "5", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "from nowhere" in printed and "wrote" in printed
    data = json.loads((out / "groups.json").read_text())
    assert data["info"]["settings"]["layers"] == [2] and data["layers"]["2"]["tests"]
    assert main(["groups", str(tmp_path / "suite"), "--layers", "x"]) == 2
    assert "--layers" in capsys.readouterr().err
