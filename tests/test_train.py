"""TopK SAE kernels and the streaming trainer: exact gradients, planted features, exact resume."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
import torch

from saeflow.formats import load_sae
from saeflow.models import lm_from_model
from saeflow.sites import Site
from saeflow.catalog import load_suite
from saeflow.topk import (TopKParams, TopKTrainer, dense_topk_loss, init_params, rows_grad,
                          topk_step)
from saeflow.train import CHECKPOINT, TrainConfig, train_suite
from tiny import tiny_llama


class CharTokenizer:
    """Bytes as tokens (ids 1..255), 0 separates documents."""
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
    """Intra-op threads stall on a shared CPU; the trainer itself runs single-threaded ops."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def tiny_lm(seed=0):
    """tests/tiny.py's Llama with a character tokenizer."""
    return lm_from_model(tiny_llama(seed), CharTokenizer(), name="tiny-llama")


def text_file(tmp_path, n=300):
    rng = random.Random(0)
    words = ("the river a city old new stone red music of and light quiet ship north war "
             "king paper field number small").split()
    paras = [" ".join(rng.choice(words) for _ in range(rng.randint(12, 40))) for _ in range(n)]
    path = tmp_path / "text.txt"
    path.write_text("\n\n".join(paras))
    return str(path)


def random_params(d, F, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = init_params(d, F, g)
    return TopKParams(p.W_enc_FD + 0.1 * torch.randn(F, d, generator=g),
                      0.1 * torch.randn(F, generator=g), p.W_dec_FD,
                      0.1 * torch.randn(d, generator=g))


@pytest.mark.parametrize("with_aux", [False, True])
def test_sparse_gradients_equal_autograd(with_aux):
    d, F, B, k = 24, 96, 70, 5
    p = random_params(d, F)
    x = torch.randn(B, d, generator=torch.Generator().manual_seed(1))
    dead = torch.zeros(F, dtype=torch.bool)
    dead[::4] = True
    kw = dict(dead_F=dead, k_aux=12, aux_coef=0.25) if with_aux else {}
    out, grads = topk_step(x, p, k, matmul_dtype=torch.float32, **kw)
    leaves = TopKParams(*[t.clone().requires_grad_(True) for t in p])
    loss = dense_topk_loss(x, leaves, k, **kw)
    loss.backward()
    loss = loss.detach()
    for name, g, leaf in zip(TopKParams._fields, grads, leaves):
        torch.testing.assert_close(g, leaf.grad, rtol=1e-5, atol=1e-6, msg=name)
    total = out.loss + (0.25 * out.aux_loss if with_aux else 0)
    assert total == pytest.approx(loss.item(), rel=1e-5)
    assert (out.aux_loss > 0) == with_aux


def test_rows_grad_is_the_sparse_product():
    idx = torch.tensor([[0, 2], [2, 3]])
    w = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    v = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    out = rows_grad(idx, w, v, 5)
    expect = torch.tensor([[1.0, 0.0], [0.0, 0.0], [2.0, 3.0], [0.0, -1.0], [0.0, 0.0]])
    torch.testing.assert_close(out, expect)


def test_bf16_step_close_to_fp32():
    p = random_params(64, 256)
    x = torch.randn(200, 64, generator=torch.Generator().manual_seed(2))
    a, _ = topk_step(x, p, 8, matmul_dtype=torch.float32)
    b, _ = topk_step(x, p, 8, matmul_dtype=torch.bfloat16)
    assert b.loss == pytest.approx(a.loss, rel=0.02)


def test_planted_features_are_recovered():
    """Activations that are sparse non-negative sums of known unit directions: the decoder
    rows learn those directions (max cosine per true direction)."""
    g = torch.Generator().manual_seed(0)
    d, n_true, active, B = 32, 48, 3, 256
    true = torch.nn.functional.normalize(torch.randn(n_true, d, generator=g), dim=-1)
    trainer = TopKTrainer(d, 96, active, k_aux=16, dead_tokens=2000, outlier_factor=1e9,
                          seed=0, matmul_dtype=torch.float32)
    for step in range(600):
        idx = torch.rand(B, n_true, generator=g).argsort(-1)[:, :active]
        coef = 1 + torch.rand(B, active, generator=g)
        x = torch.einsum("bk,bkd->bd", coef, true[idx])
        h = torch.cat([torch.zeros(B, 1, d), x[:, None]], 1)  # position 0 is dropped
        lr = 3e-3 if step < 500 else 3e-4
        out = trainer.step(trainer.prepare(h), lr)
    W = torch.nn.functional.normalize(trainer.params.W_dec_FD.detach(), dim=-1)
    best = (true @ W.T).max(1).values
    assert out.loss < 0.05
    assert float(best.median()) > 0.95
    assert float((best > 0.9).float().mean()) > 0.9


def test_prepare_drops_position_0_and_outliers_and_sets_scale():
    t = TopKTrainer(8, 16, 2, outlier_factor=10.0)
    h = torch.randn(4, 10, 8)
    h[:, 0] *= 1000
    h[1, 5] *= 1000  # an outlier inside the sequence
    x = t.prepare(h)
    assert x.shape == (4 * 9 - 1, 8)
    assert float(x.pow(2).sum(-1).mean()) == pytest.approx(8, rel=1e-4)
    torch.testing.assert_close(t.params.b_dec_D.detach(), x.mean(0))


def _weights(folder):
    return {p.name: load_sae(p) for p in sorted(folder.iterdir()) if (p / "cfg.json").exists()}


def _assert_same_weights(a: dict, b: dict) -> None:
    """Two runs' SAEs (``_weights``) are the same sites with bitwise equal weights."""
    assert sorted(a) == sorted(b)
    for name in a:
        for key in ("W_enc", "b_enc", "W_dec", "b_dec"):
            assert torch.equal(getattr(a[name], key), getattr(b[name], key)), (name, key)


@pytest.mark.parametrize("buffered", [False, True])
def test_suite_training_resume_after_kill_is_bitwise_identical(tmp_path, buffered):
    source = text_file(tmp_path)
    extra = dict(buffer_tokens=300, sae_batch=48, reuse=2.0) if buffered else {}
    cfg = TrainConfig(width=64, k=4, tokens=8 * 128, batch_tokens=128, seq_len=32, lr=3e-3,
                      warmup_steps=2, k_aux=8, dead_tokens=64, source=source,
                      checkpoint_every=3, eval_tokens=128, eval_loss_tokens=64, workers=2,
                      **extra)
    if buffered:
        assert cfg.steps_per_forward == 5 and cfg.steps == 40
    sites = "0-1/res,1/mlp,2/att"
    full = train_suite(tiny_lm(), sites, cfg, tmp_path / "full", progress=False)

    class Killed(Exception):
        pass

    def kill_at_5(step):
        if step == 5:
            raise Killed

    cut = tmp_path / "cut"
    with pytest.raises(Killed):
        train_suite(tiny_lm(), sites, cfg, cut, progress=False, on_step=kill_at_5)
    assert (cut / CHECKPOINT).exists() and not (cut / "suite.json").exists()
    assert torch.load(cut / CHECKPOINT, weights_only=False)["step"] == 3
    train_suite(tiny_lm(), sites, cfg, cut, progress=False)
    assert not (cut / CHECKPOINT).exists()
    a, b = _weights(full), _weights(cut)
    assert sorted(a) == ["0-res", "1-mlp", "1-res", "2-att"]
    _assert_same_weights(a, b)

    # the folder is a suite: suite.json names the sites, quality rows exist, SAEs reopen
    info = json.loads((full / "suite.json").read_text())
    assert info["sites"] == ["0/res", "1/mlp", "1/res", "2/att"]
    assert len(info["quality"]) == 4 and (full / "quality.csv").exists()
    suite = load_suite(full)
    sae = suite["1/mlp"]
    assert sae.activation == "topk" and sae.k == 4 and sae.d_sae == 64
    assert sae.metadata["saeflow_training"]["width"] == 64


@pytest.mark.parametrize("signals", [1, 2])
def test_ctrl_c_writes_a_checkpoint_at_the_next_forward(tmp_path, signals):
    """One Ctrl-C (or SIGTERM) stops training at the next forward boundary with a checkpoint
    there, from which the run resumes bitwise; a second Ctrl-C stops at once, and the run then
    resumes from the last periodic checkpoint."""
    import os
    import signal
    source = text_file(tmp_path)
    cfg = TrainConfig(width=64, k=4, tokens=8 * 128, batch_tokens=128, seq_len=32, lr=3e-3,
                      warmup_steps=2, k_aux=8, dead_tokens=64, source=source,
                      checkpoint_every=3, eval_tokens=0, buffer_tokens=300, sae_batch=48,
                      reuse=2.0)
    sites = "0/res,2/att"
    full = train_suite(tiny_lm(), sites, cfg, tmp_path / "full", progress=False)
    before = signal.getsignal(signal.SIGINT)

    def interrupt(step):
        if step == 5:
            for sig in (signal.SIGTERM, signal.SIGINT)[:signals]:
                os.kill(os.getpid(), sig)

    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        train_suite(tiny_lm(), sites, cfg, cut, progress=False, on_step=interrupt)
    assert signal.getsignal(signal.SIGINT) is before  # the handlers are put back
    assert torch.load(cut / CHECKPOINT, weights_only=False)["step"] == (5 if signals == 1 else 3)
    train_suite(tiny_lm(), sites, cfg, cut, progress=False)
    _assert_same_weights(_weights(full), _weights(cut))


def test_saved_sae_works_on_raw_activations(tmp_path):
    """The input scale is folded into the files: the loaded SAE maps raw activations exactly as
    the trainer maps scaled ones (up to the scale)."""
    from saeflow.formats import save_saelens
    g = torch.Generator().manual_seed(0)
    t = TopKTrainer(16, 32, 4, outlier_factor=1e9, matmul_dtype=torch.float32)
    raw = 37.0 * torch.randn(8, 65, 16, generator=g)
    for _ in range(20):
        t.step(t.prepare(raw), 3e-3)
    assert t.scale == pytest.approx(1 / 37.0, rel=0.05)
    save_saelens(t.sae(Site(3, "mlp")), tmp_path / "sae", model_name="m")
    sae = load_sae(tmp_path / "sae")
    assert sae.site == Site(3, "mlp") and sae.input_scale == 1.0 and sae.output_scale == 1.0
    x = raw[:, 1:].reshape(-1, 16)
    xs = x * t.scale
    p = t.params
    pre = (xs - p.b_dec_D) @ p.W_enc_FD.T + p.b_enc_F
    vals, idx = pre.topk(4, dim=-1)
    z = torch.zeros_like(pre).scatter(-1, idx, vals.clamp_min(0))
    expect = (z @ p.W_dec_FD + p.b_dec_D) / t.scale
    torch.testing.assert_close(sae.reconstruct(x), expect.detach(), rtol=1e-4, atol=1e-3)
    fvu = float((sae.reconstruct(x) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert fvu < 1.0


def test_row_buffer_keeps_the_newest_rows_and_samples_only_held_rows():
    from saeflow.topk import RowBuffer
    buf = RowBuffer(5, 2, seed=0)
    buf.add(torch.arange(6.0).reshape(3, 2))  # rows 0, 1, 2
    assert buf.n == 3 and set(buf.sample(50)[:, 0].tolist()) <= {0.0, 2.0, 4.0}
    buf.add(torch.arange(6.0, 14.0).reshape(4, 2))  # rows 3..6: rows 0 and 1 are overwritten
    assert buf.n == 5
    assert sorted(buf.rows[:, 0].tolist()) == [4.0, 6.0, 8.0, 10.0, 12.0]
    assert set(buf.sample(200)[:, 0].tolist()) == {4.0, 6.0, 8.0, 10.0, 12.0}
    buf.add(torch.arange(100.0, 116.0).reshape(8, 2))  # more rows than it holds: the last 5
    assert sorted(buf.rows[:, 0].tolist()) == [106.0, 108.0, 110.0, 112.0, 114.0]
    again = RowBuffer(5, 2)
    again.load_state_dict(buf.state_dict())
    assert torch.equal(again.sample(20), buf.sample(20))


def test_buffered_training_takes_several_steps_per_forward(tmp_path):
    """reuse 3 with SAE minibatches of a quarter forward: 12 Adam steps per forward, and each
    token is used about 3 times (rows trained = reuse x rows kept)."""
    source = text_file(tmp_path)
    cfg = TrainConfig(width=32, k=4, tokens=4 * 128, batch_tokens=128, seq_len=32,
                      buffer_tokens=256, sae_batch=32, reuse=3.0, source=source, eval_tokens=0)
    assert cfg.steps_per_forward == 12 and cfg.steps == 48
    out = train_suite(tiny_lm(), "1/res", cfg, tmp_path / "b", progress=False)
    sae = load_sae(out / "1-res")
    meta = sae.metadata["saeflow_training"]
    assert meta["steps"] == 48 and meta["trained_tokens"] == 48 * 32
    info = json.loads((out / "suite.json").read_text())["training"]
    assert info["forwards"] == 4 and info["steps"] == 48 and info["rows_per_step"] == 32


def test_config_validation():
    with pytest.raises(ValueError, match="buffer"):
        TrainConfig(reuse=2.0)
    with pytest.raises(ValueError, match="buffer"):
        TrainConfig(sae_batch=256)
    with pytest.raises(ValueError, match="k=40"):
        TrainConfig(width=32, k=40)
    with pytest.raises(ValueError, match="matmul"):
        TrainConfig(matmul="int8")
    cfg = TrainConfig(tokens=10_000, batch_tokens=1000, seq_len=100, warmup_steps=2)
    assert cfg.steps == cfg.forwards == 10
    assert cfg.lr_at(0) == pytest.approx(cfg.lr / 2)
    assert cfg.lr_at(5) == pytest.approx(cfg.lr)
    assert cfg.lr_at(9) == pytest.approx(cfg.lr / 2)


def test_resume_refuses_other_settings(tmp_path):
    source = text_file(tmp_path)
    cfg = TrainConfig(width=32, k=4, tokens=6 * 64, batch_tokens=64, seq_len=32,
                      source=source, checkpoint_every=2, eval_tokens=0)

    def kill(step):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_suite(tiny_lm(), "0/res", cfg, tmp_path / "r", progress=False, on_step=kill)
    with pytest.raises(ValueError, match="width"):
        train_suite(tiny_lm(), "0/res", dataclasses.replace(cfg, width=48), tmp_path / "r",
                    progress=False)


def test_checkpoints_wait_for_their_minutes(tmp_path, monkeypatch):
    import saeflow.train
    source = text_file(tmp_path)
    written = []
    real = saeflow.train.save_checkpoint

    def save(path, state):
        written.append(state["step"])
        real(path, state)

    monkeypatch.setattr(saeflow.train, "save_checkpoint", save)
    cfg = TrainConfig(width=32, k=4, tokens=6 * 64, batch_tokens=64, seq_len=32, source=source,
                      checkpoint_every=1, checkpoint_minutes=60, eval_tokens=0)
    train_suite(tiny_lm(), "0/res", cfg, tmp_path / "hour", progress=False)
    assert written == []  # six forwards take less than an hour
    cfg = dataclasses.replace(cfg, checkpoint_every=2, checkpoint_minutes=1e-9)
    train_suite(tiny_lm(), "0/res", cfg, tmp_path / "often", progress=False)
    assert written == [2, 4]  # every second forward, never after the last
    with pytest.raises(ValueError, match="checkpoint_minutes"):
        TrainConfig(checkpoint_minutes=-1)


def test_kill_during_final_evaluation_does_not_retrain(tmp_path, monkeypatch):
    from saeflow import quality
    source = text_file(tmp_path)
    cfg = TrainConfig(width=32, k=4, tokens=4 * 64, batch_tokens=64, seq_len=32, source=source,
                      eval_tokens=128, eval_loss_tokens=64)
    real = quality.evaluate

    def broken(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(quality, "evaluate", broken)
    with pytest.raises(KeyboardInterrupt):
        train_suite(tiny_lm(), "1/att", cfg, tmp_path / "e", progress=False)
    assert (tmp_path / "e" / "1-att" / "cfg.json").exists()
    assert not (tmp_path / "e" / "suite.json").exists()
    monkeypatch.setattr(quality, "evaluate", real)
    steps = []
    train_suite(tiny_lm(), "1/att", cfg, tmp_path / "e", progress=False, on_step=steps.append)
    assert steps == []  # nothing retrained
    info = json.loads((tmp_path / "e" / "suite.json").read_text())
    assert info["sites"] == ["1/att"] and len(info["quality"]) == 1
    assert not (tmp_path / "e" / ".trained.json").exists()


@pytest.mark.slow
def test_cli_trains_a_small_real_suite(tmp_path, capsys):
    """``saeflow train`` on the embedded SmolLM2 with a CI-sized setting, then ``quality``."""
    from saeflow.cli import main
    out = tmp_path / "small"
    argv = ["train", "--sites", "0-1/res,1/mlp,1/att", "--tokens", "4096", "--eval-tokens",
            "512", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    info = json.loads((out / "suite.json").read_text())
    assert info["model"] == "smollm2" and len(info["sites"]) == 4
    assert info["training"]["tokens_trained"] == 4096
    assert all(0 < r["fvu"] < 1.5 for r in info["quality"])
    suite = load_suite(out)
    assert suite["1/mlp"].d_sae == 2304 and suite["1/mlp"].k == 32
    assert main(argv) == 0  # second call reuses the finished suite
    assert "already holds a trained suite" in capsys.readouterr().out
    assert main(["quality", str(out), "--cached"]) == 0
    assert "med FVU" in capsys.readouterr().out


@pytest.mark.parametrize("fast", [True, False])
def test_training_loads_the_model_in_the_machines_dtype(tmp_path, monkeypatch, fast):
    """``saeflow train``'s default dtype (auto) loads the model in bf16 only where bf16
    products are fast: without native bf16 (AVX2 alone) a bf16 model runs several times
    slower than in fp32. An explicit dtype is kept."""
    import saeflow.compute
    import saeflow.models
    from saeflow.recipes.training import train

    class Loaded(Exception):
        pass

    asked = []

    def fake_load(spec, device=None, dtype="float32"):
        asked.append(dtype)
        raise Loaded

    monkeypatch.setattr(saeflow.compute, "bf16_is_fast", lambda *a: fast)
    monkeypatch.setattr(saeflow.models, "load_model", fake_load)
    for dtype in ("auto", "float32"):
        with pytest.raises(Loaded):
            train("starter", "0/res", {"tokens": 1000}, dtype=dtype,
                  out=str(tmp_path / dtype), log=lambda *a: None)
    assert asked == ["bfloat16" if fast else "float32", "float32"]


def test_no_two_sites_start_from_correlated_weights():
    """Nothing couples the sites: every pair of trainers starts from weights no more alike
    than two independently drawn random dictionaries (the median top-1 |cosine| between their
    decoder rows, and the same-index cosine, stay within the spread of independent draws)."""
    from saeflow.train import make_trainers
    d, width = 24, 64
    cfg = TrainConfig(width=width, k=4, seed_sites="1/res,2/res")
    sites = [Site.parse(s) for s in ("0/res", "1/res", "1/mlp", "1/att", "2/res")]
    trainers = make_trainers(cfg, sites, d, n_layers=3)
    assert len(trainers) == 7  # five sites and two second-seed replicas
    assert len({t.seed for _, t in trainers.values()}) == 7

    def unit(W):
        return torch.nn.functional.normalize(W.detach(), dim=-1)

    def stats(A, B):
        c = unit(A) @ unit(B).T
        return float(c.abs().max(1).values.median()), float(c.diagonal().abs().mean())

    g = torch.Generator().manual_seed(123)
    null = [stats(torch.randn(width, d, generator=g), torch.randn(width, d, generator=g))
            for _ in range(200)]
    top_hi = sorted(x[0] for x in null)[-1]
    diag_hi = sorted(x[1] for x in null)[-1]
    ts = [t for _, t in trainers.values()]
    for i in range(len(ts)):
        for j in range(i + 1, len(ts)):
            for a, b in ((ts[i].params.W_dec_FD, ts[j].params.W_dec_FD),
                         (ts[i].params.W_enc_FD, ts[j].params.W_enc_FD)):
                top, diag = stats(a, b)
                assert top <= top_hi and diag <= diag_hi, (i, j, top, diag)
    # and the check can fail: a trainer built from another's seed is caught
    twin = TopKTrainer(d, width, 4, seed=ts[0].seed)
    top, diag = stats(ts[0].params.W_dec_FD, twin.params.W_dec_FD)
    assert top > top_hi and diag > diag_hi
