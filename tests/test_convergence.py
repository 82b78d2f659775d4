"""Convergence diagnostics know their answers on planted dictionaries."""

from __future__ import annotations

import pytest
import torch

from saeflow import convergence
from saeflow.sae import SAE
from saeflow.sites import Site
from saeflow.suite import Suite
from saeflow.topk import init_params


def sae_from(W_dec: torch.Tensor, site: str, seed: int | None = None) -> SAE:
    F, d = W_dec.shape
    meta = {"saeflow_training": {"init_seed": seed}} if seed is not None else {}
    return SAE(W_enc=W_dec.T.clone(), b_enc=torch.zeros(F), W_dec=W_dec.clone(),
               b_dec=torch.zeros(d), activation="topk", k=2, site=Site.parse(site),
               metadata=meta)


def test_untrained_rows_have_cosine_one_with_their_init_and_moved_rows_less():
    init = init_params(16, 32, torch.Generator().manual_seed(5)).W_dec_FD
    assert convergence.init_cosines(sae_from(3.0 * init, "0/res", seed=5)) == \
        pytest.approx((1.0, 1.0))
    moved = sae_from(torch.randn(32, 16, generator=torch.Generator().manual_seed(9)), "0/res", 5)
    enc, dec = convergence.init_cosines(moved)
    assert abs(enc) < 0.5 and abs(dec) < 0.5
    assert convergence.init_cosines(sae_from(init, "0/res")) is None  # no recorded seed


def test_seed_stability_and_adjacent_matching_on_planted_suites():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(40, 24, generator=g)
    perm = torch.randperm(40, generator=g)
    other = torch.randn(40, 24, generator=g)
    a, same, unrelated = sae_from(W, "1/res"), sae_from(W[perm], "1/res"), sae_from(other, "1/res")
    assert convergence.seed_stability(a, same) == 1.0
    assert convergence.seed_stability(a, unrelated) == 0.0
    half = torch.cat([W[:20], other[20:]])  # layer 2 keeps half of layer 1's features
    suite = Suite.from_saes({"1/res": a, "2/res": sae_from(half[perm], "2/res"),
                             "2/mlp": sae_from(other, "2/mlp")})
    rows = convergence.adjacent_res(suite)
    assert [r.layer for r in rows] == [2]
    assert rows[0].share_ge_07 == pytest.approx(0.5)
    rep = convergence.report(suite, {Site.parse("1/res"): same})
    assert rep["stability"] == {"1/res": 1.0}
    assert "adjacent res top-1" in convergence.format_report(rep)
