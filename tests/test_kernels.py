"""The compiled training step (saeflow.kernels) against torch's top-k, autograd and the torch path."""

from __future__ import annotations

import copy

import pytest
import torch

from saeflow import kernels
from saeflow.kernels import use_compiled
from saeflow.topk import (TopKParams, TopKTrainer, dense_topk_loss, encode_pre,
                          project_decoder_grad)
from saeflow.trainconfig import TrainConfig
from test_train import random_params

pytestmark = pytest.mark.skipif(not kernels.available(), reason="numba is not installed")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("F,k", [(300, 8), (2304, 32), (40, 40), (100, 13), (17, 3)])
def test_select_is_an_exact_topk(dtype, F, k):
    g = torch.Generator().manual_seed(F + k)
    pre = (torch.randn(37, F, generator=g) * 3).to(dtype)
    pre[0] = 0.5  # a row of ties: any k of them are right
    pre[1, : F // 2] = -pre[1, : F // 2].abs()  # many negatives, and -0.0 below
    pre[1, 0] = -0.0
    dead = torch.randperm(F, generator=g)[: max(k, F // 3)].sort().values
    ka = min(k + 3, dead.numel())
    vals, idx, a_vals, a_idx = kernels.select(pre, k, dead, ka)
    ref = pre.float()
    torch.testing.assert_close(vals.sort(-1).values, ref.topk(k, -1).values.sort(-1).values,
                               rtol=0, atol=0)
    assert torch.equal(ref.gather(1, idx), vals)  # the values are those of their columns
    assert all(len(set(r.tolist())) == k for r in idx)  # k distinct columns per row
    sub = ref[:, dead]
    torch.testing.assert_close(a_vals.sort(-1).values,
                               sub.topk(ka, -1).values.sort(-1).values, rtol=0, atol=0)
    assert torch.isin(a_idx, dead).all()
    assert torch.equal(ref.gather(1, a_idx), a_vals)


def test_select_rejects_bad_input():
    with pytest.raises(ValueError, match="k=0"):
        kernels.select(torch.zeros(2, 5), 0)
    with pytest.raises(TypeError, match="float16"):
        kernels.select(torch.zeros(2, 5, dtype=torch.float16), 2)


@pytest.mark.parametrize("with_aux", [False, True])
def test_compiled_gradients_equal_autograd(with_aux):
    """As tests/test_train.py checks the torch path, with the decoder gradient projected."""
    d, F, B, k = 24, 96, 70, 5
    p = random_params(d, F)
    x = torch.randn(B, d, generator=torch.Generator().manual_seed(1))
    dead = torch.zeros(F, dtype=torch.bool)
    dead[::4] = True
    dead_F, k_aux = (dead, 12) if with_aux else (None, 0)
    grads = (torch.empty_like(p[0]), torch.empty_like(p[1]), torch.empty_like(p[2]),
             torch.empty_like(p[3]))
    pre = encode_pre(x - p.b_dec_D, p.W_enc_FD, p.b_enc_F, torch.float32)
    loss, aux, idx, acts = kernels.train_step(x, p, pre, k, dead_F, k_aux, 0.25, grads=grads)
    leaves = TopKParams(*[t.clone().requires_grad_(True) for t in p])
    ref = dense_topk_loss(x, leaves, k, dead_F, k_aux, 0.25)
    ref.backward()
    expect = [leaf.grad for leaf in leaves]
    assert all(e is not None for e in expect)
    expect[2] = project_decoder_grad(p.W_dec_FD, leaves.W_dec_FD.grad.clone())
    for name, g, e in zip(TopKParams._fields, grads, expect):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6, msg=name)
    assert loss + (0.25 * aux if with_aux else 0) == pytest.approx(ref.item(), rel=1e-5)
    assert (aux > 0) == with_aux
    assert (acts >= 0).all() and idx.shape == (B, k)


def test_compiled_trainer_follows_the_torch_trainer():
    """Same data, same seed, fp32 products: both paths take the same steps (to rounding), with
    AuxK active on dead latents and the bf16 path close behind."""
    g = torch.Generator().manual_seed(3)
    d, F, k = 32, 128, 4
    batches = [torch.randn(64, d, generator=g) for _ in range(30)]
    runs = {}
    for name, mm in (("torch", torch.float32), ("numba", torch.float32),
                     ("numba-bf16", torch.bfloat16)):
        t = TopKTrainer(d, F, k, k_aux=16, dead_tokens=300, outlier_factor=1e9, seed=5,
                        matmul_dtype=mm, kernels=name.split("-")[0])
        t.prepare(batches[0][None])
        runs[name] = (t, [t.step(x, 3e-3) for x in batches])
    ref_t, ref = runs["torch"]
    t, outs = runs["numba"]
    assert any(o.aux_loss > 0 for o in ref)  # AuxK took part
    for a, b in zip(ref, outs):
        assert b.loss == pytest.approx(a.loss, rel=1e-4)
        assert b.aux_loss == pytest.approx(a.aux_loss, rel=1e-4, abs=1e-7)
    for a, b in zip(ref_t.params, t.params):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    assert torch.equal(ref_t.since_fired_F, t.since_fired_F)
    bf_t, bf = runs["numba-bf16"]
    assert bf[-1].loss == pytest.approx(ref[-1].loss, rel=0.05)
    # the fused step's bf16 copy of the encoder is torch's rounding of the new weights
    assert bf_t._W_low is not None
    assert torch.equal(bf_t._W_low, bf_t.params.W_enc_FD.detach().to(torch.bfloat16))
    # its Adam state is torch's: a torch trainer resumes from it and takes the same next step
    twin = TopKTrainer(d, F, k, k_aux=16, dead_tokens=300, outlier_factor=1e9, seed=5,
                       matmul_dtype=torch.float32, kernels="torch")
    twin.load_state_dict(copy.deepcopy(t.state_dict()))  # as a checkpoint file would
    x = torch.randn(64, d, generator=g)
    a, b = twin.step(x, 1e-3), t.step(x, 1e-3)
    assert b.loss == pytest.approx(a.loss, rel=1e-5)
    for u, v in zip(twin.params, t.params):
        torch.testing.assert_close(v, u, rtol=1e-5, atol=1e-6)


def test_kernel_choice_is_checked():
    assert use_compiled("auto", "cpu") and not use_compiled("torch", "cpu")
    assert not use_compiled("auto", "meta")  # another device: the torch path
    with pytest.raises(ValueError, match="needs numba installed and device='cpu'"):
        use_compiled("numba", "meta")
    with pytest.raises(ValueError, match="kernels must be"):
        use_compiled("fast", "cpu")
    with pytest.raises(ValueError, match="kernels must be auto, numba or torch"):
        TrainConfig(kernels="cuda")
