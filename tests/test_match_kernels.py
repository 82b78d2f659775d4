"""The compiled shortlists and re-scoring (saeflow.match_kernels) against exact top-k and torch."""

from __future__ import annotations

import pytest
import torch

from saeflow import match_kernels as mk
from saeflow.match import cosine_topk, cosine_topk_pair

needs_numba = pytest.mark.skipif(not mk.available(), reason="numba is not installed")


def _feed(a, b, keep_rows, keep_cols, block, dtype, kernels):
    """Shortlists fed tile by tile, and the tiles assembled (fp32 products of other shapes
    may round differently, so the reference is made of the same tiles)."""
    lists = mk.Shortlists(len(a), len(b), keep_rows, keep_cols, None, None, block, kernels)
    full = torch.empty(len(a), len(b))
    for i in range(0, len(a), block):
        for j in range(0, len(b), block):
            tile = (a[i:i + block].to(dtype) @ b[j:j + block].to(dtype).T).contiguous()
            lists.add(tile, i, j)
            full[i:i + block, j:j + block] = tile.float()
    return lists, full


def _check(vals, idx, full):
    """``vals`` are the exact top-S of each row of ``full`` (best first), ``idx`` their columns."""
    S = vals.shape[1]
    assert torch.equal(vals, full.topk(S, dim=1).values)
    assert torch.equal(full.gather(1, idx), vals)
    assert all(len(set(r.tolist())) == S for r in idx)  # distinct columns


@needs_numba
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("block,keep", [(256, 7), (77, 21), (1000, 40), (16, 30)])
def test_shortlists_are_the_exact_top(dtype, block, keep):
    g = torch.Generator().manual_seed(block + keep)
    a, b = torch.randn(700, 48, generator=g), torch.randn(900, 48, generator=g)
    a[:50] = -a[:50].abs()  # rows of mostly negative scores
    b[:40] = b[:40].round()  # and some exact ties
    got, full = _feed(a, b, keep, keep + 3, block, dtype, "numba")
    _check(*got.rows(), full)
    _check(*got.cols(), full.T)
    ref, _ = _feed(a, b, keep, keep + 3, block, dtype, "torch")  # the plain path, same values
    assert torch.equal(got.rows()[0], ref.rows()[0])
    assert torch.equal(got.cols()[0], ref.cols()[0])


@needs_numba
def test_shortlists_with_many_ties_and_negative_zero():
    a = torch.zeros(64, 8)
    a[:, 0] = 1.0
    b = torch.zeros(300, 8)
    b[::3, 0] = 0.5  # a third of the keys tie at 0.5, the rest at +0.0 or -0.0
    b[1::3, 0] = -0.0
    lists, full = _feed(a, b, 10, 5, 64, torch.bfloat16, "numba")
    vals, idx = lists.rows()
    assert (vals == 0.5).all() and torch.equal(full.gather(1, idx), vals)
    assert all(len(set(r.tolist())) == 10 for r in idx)
    _check(*lists.cols(), full.T)


def test_shortlists_torch_path_and_errors():
    a, b = torch.randn(30, 8), torch.randn(20, 8)
    lists, full = _feed(a, b, 4, None, 7, torch.float32, "torch")
    _check(*lists.rows(), full)
    with pytest.raises(ValueError, match="keep_cols=None"):
        lists.cols()
    with pytest.raises(ValueError, match="kernels must be"):
        mk.resolve("cuda")


@needs_numba
def test_rescore_is_the_fp32_dot_product():
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(200, 300, generator=g), torch.randn(500, 300, generator=g)
    q, k = q / q.norm(dim=1, keepdim=True), k / k.norm(dim=1, keepdim=True)  # cosines
    cols = torch.randint(0, 500, (130, 6), generator=g)
    rows = torch.randint(0, 200, (130,), generator=g)
    want = (q.double()[rows, None, :] * k.double()[cols]).sum(-1).float()
    for kernels in ("numba", "torch"):
        got = mk.rescore(q, k, cols, rows, kernels)
        torch.testing.assert_close(got, want, rtol=0, atol=2e-6)
    torch.testing.assert_close(mk.rescore(q[:130], k, cols, None, "numba"),
                               (q.double()[:130, None, :] * k.double()[cols]).sum(-1).float(),
                               rtol=0, atol=2e-6)
    assert mk.rescore(q, k, cols[:0], rows[:0], "numba").shape == (0, 6)


@needs_numba
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_pair_compiled_equals_torch_and_exact(precision):
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(600, 96, generator=g), torch.randn(800, 96, generator=g)
    b[:250] = a[:250] + 0.5 * torch.randn(250, 96, generator=g)  # planted matches
    S = torch.nn.functional.normalize(a, dim=1) @ torch.nn.functional.normalize(b, dim=1).T
    out = {kern: cosine_topk_pair(a, b, k=4, block=128, precision=precision, kernels=kern)
           for kern in ("numba", "torch")}
    for fwd_back in out.values():
        for top, ref in zip(fwd_back, (S, S.T)):
            assert torch.equal(top.indices[:, 0], ref.argmax(1))
            torch.testing.assert_close(top.values, ref.gather(1, top.indices), rtol=0,
                                       atol=2e-6)
    for x, y in zip(out["numba"], out["torch"]):
        assert torch.equal(x.indices[:, 0], y.indices[:, 0])
        torch.testing.assert_close(x.values, y.values, rtol=0, atol=2e-6)


def test_without_numba_the_torch_path_runs(monkeypatch):
    g = torch.Generator().manual_seed(6)
    q, k = torch.randn(90, 64, generator=g), torch.randn(120, 64, generator=g)
    want = cosine_topk(q, k, k=3, block=32, precision="bf16", kernels="torch")
    monkeypatch.setattr(mk, "numba", None)
    assert not mk.available() and mk.resolve("auto") == "torch"
    with pytest.raises(ValueError, match="needs numba"):
        mk.resolve("numba")
    got = cosine_topk(q, k, k=3, block=32, precision="bf16")  # auto: the torch fallback
    assert torch.equal(got.indices, want.indices) and torch.equal(got.values, want.values)
