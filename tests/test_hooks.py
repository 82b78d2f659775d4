"""Reading and editing sites on tiny random models of every supported architecture."""

import pytest
import torch

from saeflow.hooks import SiteTaps, editing, hook_count, recording, run_sites
from saeflow.models import ARCHITECTURES, arch_spec, lm_from_model
from saeflow.sites import Site

ARCHS = ["llama", "qwen2", "gemma2", "gemma3_text", "gpt2", "gpt_neox"]
KINDS = ["res", "att", "mlp", "att_z"]


def forward(lm, ids, **kw):
    with torch.no_grad():
        return lm.model(input_ids=ids, use_cache=False, **kw)


@pytest.mark.parametrize("arch", ARCHS)
def test_recording_shapes(tiny_lm, ids, arch):
    lm = tiny_lm(arch)
    sites = [Site(L, k) for L in range(lm.n_layers) for k in KINDS]
    with recording(lm, sites) as store:
        forward(lm, ids)
    z_width = 96 if arch.startswith("gemma") else 64  # gemma: 4 heads x head_dim 24
    for s in sites:
        width = z_width if s.kind == "att_z" else lm.d_model
        assert store[s].shape == (2, 12, width), s
        assert lm.site_width(s) == width
    assert hook_count(lm.model) == 0


@pytest.mark.parametrize("arch", ARCHS)
def test_residual_identity(tiny_lm, ids, arch):
    """res(L) = res(L-1) + att(L) + mlp(L), with res(-1) the input of block 0 (also for
    GPT-NeoX, whose attention and MLP run in parallel from the same input)."""
    lm = tiny_lm(arch)
    sites = [Site(L, k) for L in range(lm.n_layers) for k in ("res", "att", "mlp")]
    with recording(lm, sites) as h:
        out = forward(lm, ids, output_hidden_states=True)
    hs = out.hidden_states  # hs[L] is the input of block L (the last one is final-normed)
    for L in range(lm.n_layers):
        res, att, mlp = h[Site(L, "res")], h[Site(L, "att")], h[Site(L, "mlp")]
        assert torch.allclose(res, hs[L] + att + mlp, atol=1e-5), (arch, L)
        if L < lm.n_layers - 1:
            assert torch.equal(res, hs[L + 1])


@pytest.mark.parametrize("arch", ARCHS)
def test_identity_and_zero_edits_change_nothing(tiny_lm, ids, arch):
    lm = tiny_lm(arch)
    base = forward(lm, ids).logits
    edits = {Site(1, k): [lambda h: h, lambda h: h + 0.0] for k in KINDS}
    with editing(lm, edits):
        assert torch.equal(forward(lm, ids).logits, base)
    assert hook_count(lm.model) == 0


@pytest.mark.parametrize("arch", ARCHS)
def test_edits_change_downstream_only(tiny_lm, ids, arch):
    lm = tiny_lm(arch)
    watch = [Site(0, "res"), Site(1, "res"), Site(2, "res")]
    with recording(lm, watch) as before:
        base = forward(lm, ids).logits
    v = torch.randn(lm.d_model, generator=torch.Generator().manual_seed(3))
    with editing(lm, {"1/res": lambda h: h + v}), recording(lm, watch) as after:
        logits = forward(lm, ids).logits
    assert torch.equal(after[Site(0, "res")], before[Site(0, "res")])  # upstream untouched
    assert torch.allclose(after[Site(1, "res")], before[Site(1, "res")] + v)  # the edit is seen
    assert not torch.allclose(after[Site(2, "res")], before[Site(2, "res")])
    assert not torch.allclose(logits, base)
    assert hook_count(lm.model) == 0


def test_edits_at_att_z_reach_the_residual(tiny_lm, ids):
    lm = tiny_lm("llama")
    with recording(lm, ["1/att"]) as before:
        forward(lm, ids)
    with editing(lm, {"1/att_z": lambda z: z * 2}), recording(lm, ["1/att"]) as after:
        forward(lm, ids)
    assert torch.allclose(after[Site(1, "att")], 2 * before[Site(1, "att")], atol=1e-6)


def test_no_hook_leaks_when_forward_raises(tiny_llama, ids):
    def boom(h):
        raise RuntimeError("edit failed")
    with pytest.raises(RuntimeError, match="edit failed"):
        with recording(tiny_llama, ["0/res", "2/att_z"]), editing(tiny_llama, {"1/mlp": boom}):
            forward(tiny_llama, ids)
    assert hook_count(tiny_llama.model) == 0
    with pytest.raises(ValueError, match="outside the model"):
        with recording(tiny_llama, ["0/res", "9/res"]):
            pass
    assert hook_count(tiny_llama.model) == 0


@pytest.mark.parametrize("arch", ARCHS)
def test_loss_from_a_block_equals_the_full_patched_pass(tiny_lm, arch):
    """Quality reruns only the blocks from the patched layer on: the loss must be the full
    pass's, for every architecture (Gemma's sliding windows and logit soft-capping included)."""
    lm = tiny_lm(arch)
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(3))
    sites = [Site(layer, kind) for layer in range(lm.n_layers) for kind in ("res", "att", "mlp")]
    taps = SiteTaps(lm, sites)

    def scaled(h):
        return h * 3.0 + 0.5

    with taps.installed():
        inputs: list = []
        clean = taps.loss(ids, block_inputs=inputs)
        assert len(inputs) == lm.n_layers
        assert taps.loss_from(0, inputs, ids) == pytest.approx(clean, rel=1e-6)
        for s in sites:
            full = taps.loss(ids, {s: scaled})
            assert abs(full[0] - clean[0]) > 1e-3  # the patch matters
            assert taps.loss_from(s.layer, inputs, ids, {s: scaled}) == \
                pytest.approx(full, rel=1e-6)
        with pytest.raises(ValueError, match="before block 2"):
            taps.loss_from(2, inputs, ids, {Site(1, "mlp"): scaled})
    assert hook_count(lm.model) == 0


def test_run_sites_matches_a_full_forward_and_stops_early(tiny_llama, ids):
    sites = [Site(0, "mlp"), Site(1, "res"), Site(1, "att_z")]
    with recording(tiny_llama, sites) as full:
        forward(tiny_llama, ids)
    calls = []
    handle = tiny_llama.blocks[2].register_forward_hook(lambda *a: calls.append(1))
    try:
        got = run_sites(tiny_llama, ids, sites)
    finally:
        handle.remove()
    assert not calls  # blocks after the last needed layer never ran
    for s in sites:
        assert torch.equal(got[s], full[s])
    assert hook_count(tiny_llama.model) == 0


def test_unknown_architecture_lists_the_known_ones():
    with pytest.raises(ValueError) as e:
        arch_spec("mamba")
    for name in ARCHITECTURES:
        assert name in str(e.value)

    class Fake(torch.nn.Module):
        config = type("Cfg", (), {"model_type": "rwkv"})()
    with pytest.raises(ValueError, match="unsupported architecture 'rwkv'.*llama"):
        lm_from_model(Fake())


@pytest.mark.slow
def test_smollm2_residual_identity_all_layers_and_cached_reload(monkeypatch):
    from saeflow import models
    from saeflow.models import load_model
    lm = load_model("smollm2")

    def no_conversion(*args):
        raise AssertionError("the second load converted the GGUF again")
    monkeypatch.setattr(models, "_convert_gguf", no_conversion)
    monkeypatch.setattr(models, "_preset_gguf", no_conversion)
    lm = load_model("smollm2")  # the converted weights are cached: no conversion
    assert lm.n_layers == 30 and lm.d_model == 576
    ids = lm.tokenizer("The quick brown fox jumps over the lazy dog. Paris is the capital of",
                       return_tensors="pt").input_ids
    sites = [Site(L, k) for L in range(30) for k in ("res", "att", "mlp")]
    with recording(lm, sites) as h:
        out = forward(lm, ids, output_hidden_states=True)
    for L in range(30):
        prev = out.hidden_states[L]
        want = prev + h[Site(L, "att")] + h[Site(L, "mlp")]
        scale = want.abs().max()
        assert (h[Site(L, "res")] - want).abs().max() <= 1e-5 * scale, L
    assert hook_count(lm.model) == 0
