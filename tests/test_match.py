"""Matching: blocked bf16 top-k equals the exact fp32 answer, permutations are recovered."""

from __future__ import annotations

import pytest
import torch

from saeflow.match import (Operand, _bound, cosine_topk, cosine_topk_pair, permutation_match,
                           residual_decoder)
from saeflow.synthetic import jumprelu_sae, permuted_copy


def _unit(x):
    return x / x.norm(dim=1, keepdim=True)


def _exact(q, k):
    return _unit(q) @ _unit(k).T


def _data(Q=700, K=900, D=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(Q, D, generator=g), torch.randn(K, D, generator=g) * 3
    k[:300] = q[:300] * 2 + 0.4 * torch.randn(300, D, generator=g)  # planted matches
    return q, k


def _same_top1(top, S):
    """Top-1 equals the exact argmax (a different index only at an exact tie of values)."""
    best = S.max(1)
    got = S.gather(1, top.indices[:, :1])[:, 0]
    assert (got == best.values).all(), "top-1 is not the exact fp32 maximum"
    unique = (S == best.values[:, None]).sum(1) == 1
    assert (top.indices[unique, 0] == best.indices[unique]).all()
    assert torch.allclose(top.values[:, 0], best.values, atol=2e-6)


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
@pytest.mark.parametrize("block", [128, 4096, 77])
def test_top1_is_exact(precision, block):
    q, k = _data()
    top = cosine_topk(q, k, k=3, block=block, precision=precision)
    S = _exact(q, k)
    assert top.values.shape == (700, 3) and top.indices.dtype == torch.int64
    _same_top1(top, S)
    assert (top.values[:, :-1] >= top.values[:, 1:]).all()  # best first
    # every reported value is the exact cosine of the reported pair
    assert torch.allclose(top.values, S.gather(1, top.indices), atol=2e-6)
    assert (top.indices[:300, 0] == torch.arange(300)).all()  # the planted matches


def test_pair_gives_both_directions():
    q, k = _data(seed=1)
    stats = {}
    fwd, back = cosine_topk_pair(q, k, k=2, block=256, precision="bf16", stats=stats)
    S = _exact(q, k)
    _same_top1(fwd, S)
    _same_top1(back, S.T)
    assert stats["precision"] == "bf16" and stats["rows"] == len(q) + len(k)


def test_near_ties_fall_back_to_exact():
    """Keys closer together than bf16 can tell apart: certification must fail and the rows be
    recomputed exactly, and the answer must still be the exact argmax."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(40, 256, generator=g)
    base = q.repeat_interleave(40, 0)  # 40 near-copies of each query among the keys
    k = base + 2e-2 * torch.randn(base.shape, generator=g)
    stats = {}
    top = cosine_topk_pair(q, k, k=1, block=512, precision="bf16", shortlist=4, stats=stats)[0]
    assert stats["rescored"] > 0 and stats.get("exact_rows", 0) > 0
    _same_top1(top, _exact(q, k))


def test_error_bound_holds():
    """The certification bound really bounds |exact - bf16| of every pair (unit and biased)."""
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(300, 200, generator=g), torch.randn(500, 200, generator=g)
    for bias in (None, -torch.rand(500, generator=g)):
        sa = Operand(_unit(a) if bias is None else a, None, "bf16")
        sb = Operand(_unit(b) if bias is None else b, bias, "bf16")
        approx = (sa.low @ sb.low.T).float() + (0 if bias is None else bias)
        exact = sa.x @ sb.x.T + (0 if bias is None else bias)
        t = approx.max(1).values
        err = (exact - approx).max(1).values
        assert (err <= _bound(sa, torch.arange(300), sb, t)).all()


def test_bad_inputs():
    with pytest.raises(ValueError, match="same width"):
        cosine_topk(torch.randn(3, 4), torch.randn(5, 6))
    with pytest.raises(ValueError, match="k must be"):
        cosine_topk(torch.randn(3, 4), torch.randn(5, 4), k=0)
    with pytest.raises(ValueError, match="precision"):
        cosine_topk(torch.randn(3, 4), torch.randn(5, 4), precision="fp8")
    top = cosine_topk(torch.randn(3, 4), torch.randn(2, 4), k=5)  # k clipped to the key count
    assert top.indices.shape == (3, 2)


def test_residual_decoder_and_att_z(tiny_llama):
    from saeflow.sae import SAE
    from saeflow.sites import Site
    from saeflow.suite import Suite

    W = torch.randn(10, 64)
    sae = SAE(W_enc=W.T.clone(), b_enc=torch.zeros(10), W_dec=W, b_dec=torch.zeros(64),
              site=Site(1, "att_z"))
    suite = Suite.from_saes({"1/att_z": sae, "1/res": sae.replace(site=Site(1, "res"))})
    assert torch.allclose(residual_decoder(suite, "1/res").norm(dim=1), torch.ones(10))
    with pytest.raises(ValueError, match="att_z"):
        residual_decoder(suite, "1/att_z")
    got = residual_decoder(suite, "1/att_z", tiny_llama)
    want = _unit(tiny_llama.att_z_to_residual(1, W))
    assert torch.allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("solver", ["dense", "sparse"])
def test_permutation_recovers_planted(solver):
    a = jumprelu_sae(600, 48, seed=0)
    b, perm = permuted_copy(a, seed=1, noise=0.05, rescale=True)
    res = permutation_match(a, b, solver=solver, knn=8)
    assert res.solver.startswith(solver)
    assert torch.equal(res.perm, perm)
    assert res.mean_cos > 0.9 and res.cost >= 0
    assert sorted(res.perm.tolist()) == list(range(600))  # one-to-one


def test_permutation_uses_folded_rows():
    """Rescaled features (same function) are matched through folding: without it, raw rows of
    very different norms would mislead a squared-distance matcher."""
    a = jumprelu_sae(300, 32, seed=2)
    b, perm = permuted_copy(a, seed=3, noise=0.0, rescale=True)
    res = permutation_match(a, b, use_encoder=True)
    assert torch.equal(res.perm, perm) and res.cost < 1e-6


def test_sparse_completion_when_knn_graph_has_no_perfect_matching():
    """Many features of a crowd around one direction: their 1-NN graph misses a perfect
    matching, so the completion step runs and the result is still a permutation."""
    g = torch.Generator().manual_seed(5)
    a = jumprelu_sae(200, 32, seed=4)
    W = a.W_dec.clone()
    W[:100] = W[0] + 0.01 * torch.randn(100, 32, generator=g)  # a crowd
    a = a.replace(W_dec=W)
    b, perm = permuted_copy(a, seed=6, noise=0.2, rescale=False)
    res = permutation_match(a, b, solver="sparse", knn=1)
    assert res.solver == "sparse+completion"
    assert sorted(res.perm.tolist()) == list(range(200))
    dense = permutation_match(a, b, solver="dense")
    assert res.cost >= dense.cost - 1e-3
    assert (res.perm[100:] == perm[100:]).float().mean() > 0.9  # the distinct features


def test_fold_keeps_function():
    a = jumprelu_sae(64, 16, seed=7)
    x = torch.randn(50, 16, generator=torch.Generator().manual_seed(8)) * 2
    f = a.fold()
    assert not torch.equal(f.W_dec, a.W_dec)
    assert torch.allclose(f.reconstruct(x), a.reconstruct(x), atol=1e-5)
    assert torch.equal(f.encode(x) > 0, a.encode(x) > 0)
    from saeflow.match import _perm_vectors  # the matcher's rows are the folded decoder
    assert torch.allclose(_perm_vectors(a, False), f.W_dec)
    assert torch.allclose(_perm_vectors(a, True), torch.cat([f.W_dec, f.W_enc.T], 1))


def test_permutation_errors():
    a, b = jumprelu_sae(10, 8), jumprelu_sae(12, 8)
    with pytest.raises(ValueError, match="equal width"):
        permutation_match(a, b)
    with pytest.raises(ValueError, match="solver"):
        permutation_match(a, a, solver="magic")
