"""Labels: the prepared promoted-token path equals the plain one, the fires-on labels read the
contexts they were built from, Neuronpedia explanations become labels, and the label API."""

from __future__ import annotations

import json

import pytest
import torch

from saeflow.atlas import compute_atlas
from saeflow.labels import FeatureLabels, choose, fires_on, join_tokens
from saeflow.lens import Unembedding, bounded_topk
from saeflow.match import Operand
from saeflow.sites import Site


def _exact(q, W, k):
    return (q @ W.T).topk(k, dim=1)


def test_bounded_topk_is_the_exact_topk():
    """Every one of the k ranks equals the exact fp32 top-k, with bf16 and fp32 keys, through
    near-ties (rows recomputed exactly), a zero query (every key ties: the row cap) and key
    counts that are not a multiple of the tile or of the group width."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(5003, 48, generator=g) * (1 + torch.rand(5003, 1, generator=g))
    q = torch.randn(700, 48, generator=g)
    q[:40] = W[:40] * 3 + 1e-3 * torch.randn(40, 48, generator=g)  # strongly aligned rows
    W[5000:] = W[:3] + 1e-4 * torch.randn(3, 48, generator=g)  # near-duplicate keys: near-ties
    q[40] = 0  # a zero direction: all 5003 scores tie
    ref = _exact(q, W, 6)
    for precision in ("bf16", "fp32"):
        stats = {}
        top = bounded_topk(q, Operand(W, None, precision), 6, block=1024, stats=stats)
        assert torch.allclose(top.values, ref.values, atol=1e-5)
        distinct = (ref.values[:, :-1] - ref.values[:, 1:]).abs().min(1).values > 1e-5
        distinct[40] = False
        assert torch.equal(top.indices[distinct], ref.indices[distinct])
        if precision == "bf16":
            assert stats["exact_rows"] >= 1  # the zero row at least
            assert stats["rows"] == 700


def test_unembedding_equals_promoted_tokens(tiny_llama):
    """The prepared unembedding gives the plain path's tokens (the labels atlases stored before)
    for every direction, also for several sites in one pass."""
    from saeflow.models import LM

    class Tok:
        def decode(self, ids):
            return f"<{ids[0]}>"

    lm = LM(tiny_llama.model, Tok(), "tiny", tiny_llama.arch)
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(300, lm.d_model, generator=g), torch.randn(77, lm.d_model, generator=g)
    U = Unembedding(lm, precision="bf16", block=128)
    assert U.promoted(a, k=6) == lm.promoted_tokens(a, k=6)
    many = U.promoted_many([a, b], k=4)
    assert many == [lm.promoted_tokens(a, k=4), lm.promoted_tokens(b, k=4)]
    assert Unembedding(lm, precision="fp32").promoted(b, k=5) == lm.promoted_tokens(b, k=5)


def _write_contexts(path, site: Site, seq, pos, act, tokens, vocab):
    from saeflow.contexts import FORMAT, _save
    _save(path, {"tokens": torch.tensor(tokens, dtype=torch.int32),
                 f"{site.slug}/seq": torch.tensor(seq, dtype=torch.int32),
                 f"{site.slug}/pos": torch.tensor(pos, dtype=torch.int32),
                 f"{site.slug}/act": torch.tensor(act, dtype=torch.float32)},
          {"format": FORMAT, "settings": {}, "sites": [str(site)], "model": "m",
           "batches_done": "1", "complete": "true",
           "vocab": {str(i): s for i, s in enumerate(vocab)}})


def test_fires_on_reads_the_peak_tokens(tmp_path):
    """Planted contexts: feature 0 peaks on ' church' twice and ' bride' once, feature 1 never
    fires, feature 2 peaks on a whitespace token."""
    from saeflow.contexts import Contexts
    vocab = ["<s>", " the", " old", " church", " bride", " rang", " bells", "\n"]
    tokens = [[0, 1, 2, 3, 5, 6], [0, 6, 5, 1, 4, 2], [0, 1, 3, 7, 2, 1]]
    site = Site(1, "res")
    path = tmp_path / "contexts.safetensors"
    _write_contexts(path, site, seq=[[0, 1, 2], [-1, -1, -1], [2, -1, -1]],
                    pos=[[3, 4, 2], [-1, -1, -1], [3, -1, -1]],
                    act=[[5.0, 4.0, 3.0], [0, 0, 0], [2.0, 0, 0]], tokens=tokens, vocab=vocab)
    got = fires_on(Contexts(path), site)
    assert got[0][0] == "church · bride"  # most frequent first
    assert got[0][1] == "…<s> the old «church» rang bells…"
    assert got[1] == ("", "")
    assert got[2][0] == repr("\n") and "«»" in got[2][1]
    assert fires_on(Contexts(path), Site(2, "res")) == []


def test_label_api_and_lines():
    lab = FeatureLabels(choose("", "church · bride", "atmosp · icide"), "church · bride",
                        "…the «church» rang…", "atmosp · icide", "")
    assert lab.label == "church · bride"
    assert lab.lines() == ("church · bride — …the «church» rang…", "promotes atmosp · icide")
    only = FeatureLabels(choose("", "", "a · b"), "", "", "a · b", "")
    assert only.lines() == ("a · b", "")
    expl = FeatureLabels(choose("weddings", "church", "a"), "church", "…", "a", "weddings")
    assert expl.label == "weddings" and expl.lines()[1] == "promotes a"
    assert join_tokens([" x", " ", "y"]) == "x · ' ' · y"


TEXTS = ["Wedding bells rang in the old church as the bride and groom arrived.",
         "Quantum physics describes particles, waves and the forces between them.",
         "The market closed higher today as technology shares rallied strongly."] * 4


def test_atlas_labels_from_contexts_and_explanations(tmp_path):
    """An atlas computed with contexts labels each feature with what it fires on (the peak
    tokens of the contexts stored beside it), keeps the promoted tokens as the second reading,
    and with Neuronpedia's explanation files uses their descriptions first."""
    from saeflow.contexts import ContextSettings, Contexts
    from saeflow.neuronpedia import explanation_dir
    from saeflow.suite import read_suite
    from saeflow.synthetic import planted_suite
    from tests.tiny import tiny_llama_lm

    lm = tiny_llama_lm(max_position_embeddings=512, bos_token_id=None, eos_token_id=None,
                       pad_token_id=None)
    suite, _ = planted_suite(n_layers=3, width=64, d_model=lm.d_model, seed=2)
    suite.info = {"neuronpedia": {"model": "tiny-model", "source": "{layer}-flow-{kind}"}}
    suite.save(tmp_path / "suite")
    suite = read_suite(tmp_path / "suite")
    folder = explanation_dir(tmp_path / "exports", "tiny-model", "1-flow-res")
    folder.mkdir(parents=True)
    (folder / "batch-0.jsonl").write_text(
        json.dumps({"index": "5", "description": "weddings and churches"}) + "\n")
    settings = ContextSettings(n_tokens=1024, seq_len=32, batch_size=4)
    atlas = compute_atlas(suite, tmp_path / "atlas", lm, null_samples=64, progress=False,
                          contexts=settings, context_texts=TEXTS,
                          explanations=tmp_path / "exports")
    ctx = Contexts.find(atlas.root)
    assert ctx is not None and ctx.complete and atlas.has_contexts and atlas.has_explanations
    fired = 0
    for f in [Site(1, "res").feature(i) for i in range(64)]:
        labels = atlas.labels(f)
        assert labels.promotes == join_tokens(atlas.tokens(f)) and labels.promotes
        top = ctx.top(f, 8)
        if f.index == 5:
            assert atlas.label(f) == "weddings and churches" == atlas.explanation(f)
            continue
        assert atlas.explanation(f) == ""
        if not top:
            assert labels.fires_on == "" and atlas.label(f) == labels.promotes
            continue
        fired += 1
        peaks = {c.token.strip().lower() or repr(c.token) for c in top}
        shown = labels.fires_on.split(" · ")
        assert atlas.label(f) == labels.fires_on and 1 <= len(shown) <= 3
        assert {t.lower() for t in shown} <= peaks
        assert f"«{top[0].token.strip()}»" in labels.context.replace("« ", "«")
    assert fired > 10
    # `saeflow graph` exports carry the same readings: the explanation as the seed's label,
    # what every node fires on and the promoted tokens as GraphML attributes
    import networkx as nx

    from saeflow.recipes.graph import export_graph
    g = export_graph(str(tmp_path / "atlas"), "1/res/5", fmt="graphml")
    assert isinstance(g.data, str)
    read = nx.parse_graphml(g.data)
    assert read.nodes["1/res/5"]["label"] == "weddings and churches"
    def shown(text):  # GraphML cannot hold control characters: they are shown as U+FFFD
        return "".join(ch if ch.isprintable() else "\ufffd" for ch in text)
    for n in g.graph.nodes:
        lab, got = atlas.labels(n.feature), read.nodes[str(n.feature)]
        assert got.get("fires_on", "") == shown(lab.fires_on)
        assert got["promotes"] == shown(lab.promotes)
    assert any(atlas.labels(n.feature).fires_on for n in g.graph.nodes)
    # a second run keeps the stored contexts (complete) and recomputes nothing
    again = compute_atlas(suite, tmp_path / "atlas", lm, null_samples=64, progress=False,
                          contexts=ContextSettings(n_tokens=2048), context_texts=TEXTS)
    kept = Contexts.find(again.root)
    assert kept is not None and kept.meta["settings"]["n_tokens"] == 1024
    with pytest.raises(ValueError, match="is not a folder"):
        compute_atlas(suite, tmp_path / "atlas", lm, null_samples=64, progress=False,
                      explanations=tmp_path / "missing")


def test_ensure_atlas_adds_contexts_when_missing(tmp_path, monkeypatch):
    """A cached atlas without contexts gets them (and its fires-on labels) when asked with a
    model; one whose model has no tokenizer keeps the promoted tokens."""
    from saeflow.atlas import ensure_atlas
    from saeflow.contexts import ContextSettings
    from saeflow.synthetic import planted_suite
    from tests.tiny import tiny_llama_lm

    monkeypatch.setenv("SAEFLOW_CACHE", str(tmp_path / "cache"))
    lm = tiny_llama_lm(max_position_embeddings=512, bos_token_id=None, eos_token_id=None,
                       pad_token_id=None)
    suite, _ = planted_suite(n_layers=2, width=48, d_model=lm.d_model, seed=3, name="ctx")
    bare = ensure_atlas(suite, lm, null_samples=64, contexts=None, progress=False)
    assert bare.has_labels and not bare.has_contexts
    f = "1/res/0"
    assert bare.label(f) == bare.promoted(f)
    no_tok = tiny_llama_lm(tokenizer=False)
    assert not ensure_atlas(suite, no_tok, null_samples=64, progress=False).has_contexts
    settings = ContextSettings(n_tokens=512, seq_len=32, batch_size=4)
    full = ensure_atlas(suite, lm, null_samples=64, contexts=settings, context_texts=TEXTS,
                        progress=False)
    assert full.has_contexts
    assert full.root == bare.root
    fired = [g for g in (f"1/res/{i}" for i in range(48)) if full.fires_on(g)[0]]
    assert fired and all(full.label(g) == full.fires_on(g)[0] for g in fired)
