"""Quality metrics on hand-checkable SAEs: exact reconstruction, ablation, dead latents."""

from __future__ import annotations

import csv
import random

import pytest
import torch
from tiny import tiny_llama

from saeflow import quality
from saeflow.hooks import hook_count
from saeflow.models import lm_from_model
from saeflow.sae import SAE
from saeflow.sites import Site


class CharTokenizer:
    name_or_path = "char"
    eos_token_id = 0

    def __len__(self):
        return 256

    def get_vocab(self):
        return {"<eos>": 0}

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[max(1, min(255, ord(c))) for c in t] for t in texts]}


@pytest.fixture(autouse=True)
def one_thread():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(scope="module")
def lm():
    return lm_from_model(tiny_llama(0, num_hidden_layers=3), CharTokenizer(), name="tiny-llama")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    rng = random.Random(0)
    words = "alpha beta gamma delta river stone light north quiet music".split()
    paras = [" ".join(rng.choice(words) for _ in range(rng.randint(10, 30))) for _ in range(600)]
    path = tmp_path_factory.mktemp("text") / "t.txt"
    path.write_text("\n\n".join(paras))
    return str(path)


def identity_sae(d=64, dead=0):
    """ReLU SAE with latents e_i and -e_i: relu(x) - relu(-x) = x exactly. ``dead`` extra
    latents have zero weights and b_enc = -1, so they never fire."""
    eye = torch.eye(d)
    W_enc = torch.cat([eye, -eye, torch.zeros(d, dead)], 1)
    W_dec = torch.cat([eye, -eye, torch.zeros(dead, d)], 0)
    b_enc = torch.cat([torch.zeros(2 * d), -torch.ones(dead)])
    return SAE(W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=torch.zeros(d))


def zero_sae(d=64, F=16):
    return SAE(W_enc=torch.randn(d, F), b_enc=torch.zeros(F), W_dec=torch.zeros(F, d),
               b_dec=torch.zeros(d))


def evaluate(lm, source, saes, **kw):
    return {r.site: r for r in quality.evaluate(lm, saes, source=source, tokens=512,
                                                 loss_tokens=256, seq_len=64,
                                                 progress=False, **kw)}


def test_perfect_reconstruction_and_zero_reconstruction(lm, source):
    saes = {Site(1, "res"): identity_sae(dead=16), Site(1, "mlp"): identity_sae(),
            Site(0, "att"): zero_sae(), Site(2, "res"): zero_sae()}
    rows = evaluate(lm, source, saes)
    assert hook_count(lm.model) == 0
    for site in ("1/res", "1/mlp"):
        r = rows[site]
        assert r.fvu == 0.0
        assert r.loss_sae == pytest.approx(r.loss_clean, abs=1e-6)
        assert r.loss_recovered == pytest.approx(1.0, abs=1e-4)
        assert r.l0 == pytest.approx(64, abs=0.01)  # one of e_i, -e_i per coordinate
    assert rows["1/res"].dead_frac == pytest.approx(16 / 144)
    assert rows["1/mlp"].dead_frac == 0.0
    # reconstructing zeros at an att site *is* the zero ablation: nothing recovered
    att = rows["0/att"]
    assert att.ablation == "zero" and att.loss_recovered == pytest.approx(0.0, abs=1e-6)
    assert att.fvu > 1.0 and att.dead_frac == 0.0 and att.l0 > 0
    # at a res site the baseline is the mean residual
    res = rows["2/res"]
    assert res.ablation == "mean" and res.loss_ablated != res.loss_sae
    assert res.loss_recovered == pytest.approx(
        (res.loss_ablated - res.loss_sae) / (res.loss_ablated - res.loss_clean))
    # all rows share the clean loss and token counts
    assert len({r.loss_clean for r in rows.values()}) == 1
    assert {r.tokens for r in rows.values()} == {8 * 63}


def test_zero_ablation_option_for_res(lm, source):
    rows = evaluate(lm, source, {Site(2, "res"): zero_sae()}, res_ablation="zero")
    r = rows["2/res"]
    assert r.ablation == "zero" and r.loss_recovered == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="res_ablation"):
        evaluate(lm, source, {Site(2, "res"): zero_sae()}, res_ablation="random")


def test_keep_mask_excludes_position_0_and_outliers():
    h = torch.ones(2, 6, 4)
    h[:, 0] = 1000
    h[1, 3] = 50
    keep = quality.keep_mask(h, outlier_factor=10.0)
    assert keep.tolist() == [[False, True, True, True, True, True],
                             [False, True, True, False, True, True]]


def test_reports_table_csv_and_plot(tmp_path):
    rows = [quality.QualityRow(site=f"{l}/{k}", kind=k, layer=l, fvu=0.1 * l, l0=32.0,
                               dead_frac=0.01, loss_clean=3.0, loss_sae=3.2, loss_ablated=5.0,
                               loss_recovered=0.9, ablation="zero", tokens=100, loss_tokens=50)
            for l in range(3) for k in ("res", "mlp", "att")]
    summary = quality.summarize(rows)
    assert list(summary) == ["att", "mlp", "res"]
    assert summary["res"]["fvu"] == pytest.approx(0.1) and summary["res"]["n"] == 3
    table = quality.format_table(rows)
    assert "2/att" in table and "med FVU" in table
    quality.write_reports(rows, tmp_path, title="t")
    with open(tmp_path / "quality.csv") as f:
        read = list(csv.DictReader(f))
    assert len(read) == 9 and read[0]["site"] == "0/res"
    assert (tmp_path / "quality.png").read_bytes()[:4] == b"\x89PNG"
    assert quality.rows_from_json(quality.rows_to_json(rows)) == rows
    assert quality.summarize([]) == {}
