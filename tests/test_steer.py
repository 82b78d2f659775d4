"""Steering plans: exact no-op cases, locality in depth, planted suppression, hook hygiene,
KV-cache generation, JSON round trips, graph modes and schedules. Tiny models, synthetic SAEs."""

from __future__ import annotations

import json
import math

import pytest
import torch

from saeflow.hooks import editing, hook_count, recording
from saeflow.models import lm_from_model
from saeflow.sae import SAE
from saeflow.sites import Feature, Site
from saeflow.steer import (SteeringPlan, feature_magnitudes, generate, plan_from_features,
                           plan_from_graph, schedule_coefficients, site_edits)
from saeflow.suite import Suite
from tiny import LLAMA, tiny_llama

D, F, LAYERS = LLAMA["hidden_size"], 32, LLAMA["num_hidden_layers"]


def byte_tokenizer():
    """A character-level fast tokenizer built in memory (ids 32..126 are printable ASCII)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {chr(i): i for i in range(32, 127)}
    vocab.update({"<unk>": 0, "<eos>": 1, "<pad>": 2})
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<eos>",
                                   pad_token="<pad>")


def char_lm(seed: int = 0):
    """tests/tiny.py's Llama (width D, LAYERS layers) over the character vocabulary."""
    model = tiny_llama(seed, vocab_size=128, eos_token_id=1, pad_token_id=2, bos_token_id=None)
    return lm_from_model(model, byte_tokenizer(), name="tiny")


def planted_sae(site: Site, activation: str = "relu", seed: int = 0) -> SAE:
    """Orthonormal decoder rows, encoder = decoder transpose, no biases: removing a * v at the
    site removes the feature exactly."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(D, F, generator=g))  # [D, F] orthonormal columns
    return SAE(W_enc=Q.clone(), b_enc=torch.zeros(F), W_dec=Q.T.contiguous(), b_dec=torch.zeros(D),
               activation=activation, k=8 if activation == "topk" else None, site=site)


def tiny_suite(activation: str = "relu") -> Suite:
    sites = [Site(layer, kind) for layer in range(LAYERS) for kind in ("res", "mlp", "att")]
    return Suite.from_saes({s: planted_sae(s, activation, seed=i) for i, s in enumerate(sites)})


class Node:  # the FlowNode fields plan_from_graph reads
    def __init__(self, feature):
        self.feature = Feature.parse(feature)


class Graph:
    def __init__(self, seed, features):
        self.seed = Feature.parse(seed)
        self.nodes = [Node(f) for f in features]


GRAPH = Graph("2/res/5", ["0/res/1", "1/res/3", "1/mlp/4", "2/res/5", "2/att/6", "3/res/7"])


def flow_graph():
    """The same graph as a real ``saeflow.flow.FlowGraph`` (skips while flow is unavailable)."""
    flow = pytest.importorskip("saeflow.flow")
    nodes = [flow.FlowNode(n.feature, "translated", "", 1.0) for n in GRAPH.nodes]
    return flow.FlowGraph(GRAPH.seed, nodes, [])


IDS = torch.tensor([[40, 32, 116, 104, 105, 110, 107, 32, 119, 101]])


@pytest.fixture(scope="module")
def lm():
    return char_lm()


@pytest.fixture(scope="module")
def suite():
    return tiny_suite()


def logits(lm, ids=IDS):
    return lm.model(input_ids=ids, use_cache=False).logits


# ---- no-op cases --------------------------------------------------------------------------------
def test_zero_coefficient_plan_changes_nothing(lm, suite):
    plan = plan_from_graph(GRAPH, "cumulative", 3, coefficient=0.0, magnitudes={GRAPH.seed: 5.0})
    assert len(plan.terms) == 6
    base = logits(lm)
    with plan.apply(lm, suite):
        steered = logits(lm)
    assert torch.equal(base, steered)


def test_suppress_with_r_equal_one_changes_nothing(lm, suite):
    plan = plan_from_graph(GRAPH, "cumulative", 3, coefficient=1.0, action="suppress")
    base = logits(lm)
    with plan.apply(lm, suite):
        # the suppressors are in place, and the position tracker
        assert hook_count(lm.model) == len(plan.sites) + 1 == 7
        steered = logits(lm)
    assert torch.equal(base, steered)


def test_plan_at_layer_l_leaves_earlier_sites_alone(lm, suite):
    plan = plan_from_graph(GRAPH, "single", 2, coefficient=3.0)
    assert plan.layers == [2] and {str(f) for f in plan.features} == {"2/res/5", "2/att/6"}
    earlier = [Site(layer, k) for layer in (0, 1) for k in ("res", "mlp", "att")]
    watch = earlier + [Site(2, "res"), Site(3, "res")]
    with recording(lm, watch) as base:
        logits(lm)
        base = dict(base)
    with plan.apply(lm, suite), recording(lm, watch) as steered:
        logits(lm)
    for s in earlier:
        assert torch.equal(base[s], steered[s]), s
    assert not torch.allclose(base[Site(2, "res")], steered[Site(2, "res")])
    assert not torch.allclose(base[Site(3, "res")], steered[Site(3, "res")])


def test_activation_adds_the_summed_vector_at_its_site(lm, suite):
    plan = SteeringPlan([("1/res/3", 2.0), ("1/res/4", -0.5)], magnitudes={"1/res/3": 1.5})
    V = suite["1/res"].steering_vectors()
    expect = 2.0 * 1.5 * V[3] - 0.5 * V[4]
    with recording(lm, ["1/res"]) as base:
        logits(lm)
        base = dict(base)
    with plan.apply(lm, suite), recording(lm, ["1/res"]) as steered:  # recorder runs after the edit
        logits(lm)
    diff = steered[Site(1, "res")] - base[Site(1, "res")]
    assert torch.allclose(diff, expect.expand_as(diff), atol=1e-5)


@pytest.mark.parametrize("activation", ["relu", "topk"])
def test_suppression_with_r_zero_removes_a_planted_feature(lm, activation):
    suite = tiny_suite(activation)
    sae = suite["1/res"]
    with recording(lm, ["1/res"]) as rec:
        logits(lm)
    acts = sae.encode(rec[Site(1, "res")])
    j = int(acts.sum((0, 1)).argmax())  # the feature most active on this text
    assert acts[..., j].max() > 0
    plan = SteeringPlan([(Feature(Site(1, "res"), j), 0.0)], action="suppress")
    with plan.apply(lm, suite), recording(lm, ["1/res"]) as rec:
        logits(lm)
    after = sae.encode(rec[Site(1, "res")])[..., j]
    assert after[:, 1:].abs().max() < 1e-4  # removed at every usable token
    assert torch.equal(after[:, 0], acts[:, 0, j])  # position 0 is never edited


def _passes(lm, site):
    """A hook that keeps the hidden state of every forward pass at ``site``."""
    store = []
    module, where = lm.site_module(site)
    assert where == "output"
    handle = module.register_forward_hook(
        lambda m, a, out: store.append((out[0] if isinstance(out, tuple) else out).clone()))
    return store, handle


def _batched_passes(lm, suite, plan):
    """The layer-2 residual of every forward pass of a left-padded two-prompt greedy generation,
    unsteered and with ``plan``."""
    runs = []
    for p in (None, plan):
        store, handle = _passes(lm, Site(2, "res"))
        try:
            generate(lm, ["I think", "The weather today"], p, 3, suite=suite, greedy=True)
        finally:
            handle.remove()
        runs.append(store)
    return runs


def test_suppression_leaves_position_0_and_outlier_tokens_alone(lm, suite):
    """One usable-token rule: the first token and a planted huge-norm token are not edited,
    every other token is."""
    site = Site(1, "res")
    sae = suite[site]
    plan = SteeringPlan([(Feature(site, j), -4.0) for j in range(F)], action="suppress")
    blow_up = {site: lambda h: torch.cat([h[:, :5], 200.0 * h[:, 5:6], h[:, 6:]], dim=1)}
    with editing(lm, blow_up), recording(lm, [site]) as rec:  # the outlier, unsuppressed
        logits(lm)
        base = rec[site].clone()
    with editing(lm, blow_up), plan.apply(lm, suite), recording(lm, [site]) as rec:
        logits(lm)
        steered = rec[site]
    norms = base[0].norm(dim=-1)
    assert norms[5] > 10 * norms[1:].median()  # the planted outlier is one by the rule
    same = (steered[0] == base[0]).all(dim=-1)
    assert same[0] and same[5]  # position 0 and the outlier are untouched
    active = (sae.encode(base[0]) > 0).any(dim=-1)
    assert (~same[[t for t in range(1, IDS.shape[1]) if t != 5 and active[t]]]).all()


def test_suppression_in_generation_skips_each_rows_first_token(lm, suite):
    """Left-padded batched generation: a row's first real token sits at index > 0, and it is
    still not edited (positions come from the model's position ids). Recorded one layer
    later: a token's state there depends on the edit of itself and earlier tokens only."""
    site = Site(1, "res")
    plan = SteeringPlan([(Feature(site, j), 0.0) for j in range(F)], action="suppress")
    runs = _batched_passes(lm, suite, plan)
    (base, steered) = (r[0] for r in runs)  # the prompt passes [2, T, D]
    first = len("The weather today") - len("I think")  # row 0's first real token (left padding)
    assert torch.equal(base[0, first], steered[0, first])
    assert torch.equal(base[1, 0], steered[1, 0])
    assert not torch.equal(base[0, first + 1], steered[0, first + 1])
    assert not torch.equal(base[1, 1], steered[1, 1])
    assert all(s.shape[1] == 1 for s in runs[1][1:])  # the cached one-token steps ran too


# ---- steering from a token position on ----------------------------------------------------------
def _from_position(vec, start):
    """A plain hook's edit: add ``vec`` at the positions >= ``start`` of an unpadded batch."""
    def fn(h):
        keep = (torch.arange(h.shape[1]) >= start)[None, :, None]
        return torch.where(keep, h + vec, h)
    return fn


def test_from_token_steers_only_later_positions_like_a_plain_hook(lm, suite):
    site = Site(1, "res")
    plan = SteeringPlan([("1/res/3", 2.0), ("1/res/4", -1.0)], from_token=4)
    sae = suite[site]
    vec = torch.tensor([2.0, -1.0]) @ (sae.W_dec[[3, 4]].float() * sae.output_scale)
    base = logits(lm)
    with recording(lm, [site]) as rec:
        logits(lm)
        before = rec[site].clone()
    with plan.apply(lm, suite), recording(lm, [site]) as rec:
        steered = logits(lm)
        after = rec[site].clone()
    with editing(lm, {site: _from_position(vec, 4)}):
        reference = logits(lm)
    assert torch.equal(steered, reference)
    assert torch.equal(after[:, :4], before[:, :4]) and torch.equal(steered[:, :4], base[:, :4])
    assert torch.allclose(after[:, 4:] - before[:, 4:], vec.expand(1, 6, D), atol=1e-5)
    everywhere = SteeringPlan(plan.terms)  # the default edits position 0 on
    with everywhere.apply(lm, suite):
        assert not torch.equal(logits(lm)[:, :4], base[:, :4])


def test_from_token_suppresses_only_later_positions(lm, suite):
    site = Site(1, "res")
    plan = SteeringPlan([(Feature(site, j), 0.0) for j in range(F)], action="suppress",
                        from_token=5)
    with recording(lm, [site]) as rec:
        logits(lm)
        before = rec[site].clone()
    with plan.apply(lm, suite), recording(lm, [site]) as rec:
        logits(lm)
        after = rec[site].clone()
    assert torch.equal(after[:, :5], before[:, :5])
    assert suite[site].encode(after[0, 5:]).abs().max() < 1e-4  # removed from position 5 on


def test_generated_only_leaves_the_prompt_alone_and_steers_new_tokens(lm, suite):
    """Against a cache-free loop with a plain hook that edits the positions >= the prompt's
    length; in a left-padded batch the prompt pass is untouched in every row."""
    site = Site(1, "res")
    plan = SteeringPlan([("1/res/3", 12.0), ("1/res/7", 8.0)], generated_only=True)
    sae = suite[site]
    vec = torch.tensor([12.0, 8.0]) @ (sae.W_dec[[3, 7]].float() * sae.output_scale)
    gen = generate(lm, "I think", plan, 10, suite=suite, greedy=True)[0]
    ids, n = list(gen.prompt_ids), len(gen.prompt_ids)
    with editing(lm, {site: _from_position(vec, n)}):
        for _ in range(len(gen.new_ids)):
            ids.append(int(logits(lm, torch.tensor([ids]))[0, -1].argmax()))
    assert tuple(ids[n:]) == gen.new_ids
    unsteered = generate(lm, "I think", None, 10, greedy=True)[0]
    assert unsteered.new_ids != gen.new_ids
    assert unsteered.new_ids[0] == gen.new_ids[0]  # drawn from the unsteered prompt states
    runs = _batched_passes(lm, suite, plan)
    assert torch.equal(runs[0][0], runs[1][0])  # the prompt pass [2, T, D]
    assert not torch.equal(runs[0][2], runs[1][2])  # the second new token's pass is steered
    late = SteeringPlan(plan.terms, from_token=100, generated_only=True)  # beyond every token
    assert generate(lm, "I think", late, 10, suite=suite, greedy=True)[0] == unsteered
    assert hook_count(lm.model) == 0
    with pytest.raises(ValueError, match="prompt_lengths"):
        with plan.apply(lm, suite):
            pass
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="from_token must be an integer >= 0"):
            SteeringPlan(plan.terms, from_token=bad)


def test_padded_batches_left_for_generation_right_for_scoring():
    from saeflow.compute import pad_batch, pad_id
    ids, mask = pad_batch([[5, 6, 7], [8]], pad=2, left=True)
    assert ids.tolist() == [[5, 6, 7], [2, 2, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = pad_batch([[5, 6, 7], [8]])
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert pad_batch([[]])[0].shape == (1, 1)
    assert pad_id(byte_tokenizer()) == 2


# ---- hook hygiene -------------------------------------------------------------------------------
def test_hooks_never_leak(lm, suite, monkeypatch):
    plan = plan_from_graph(GRAPH, "cumulative", 3, coefficient=1.0)
    suppress = plan_from_graph(GRAPH, "cumulative", 3, coefficient=0.0, action="suppress")
    assert hook_count(lm.model) == 0
    with plan.apply(lm, suite):
        assert hook_count(lm.model) == len(plan.sites)
    assert hook_count(lm.model) == 0
    with pytest.raises(RuntimeError, match="boom"):
        with suppress.apply(lm, suite):
            logits(lm)
            raise RuntimeError("boom")
    assert hook_count(lm.model) == 0

    real = lm.model.forward
    calls = []

    def failing_forward(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("generation failed")
        return real(*a, **k)
    monkeypatch.setattr(lm.model, "forward", failing_forward)
    with pytest.raises(RuntimeError, match="generation failed"):
        generate(lm, "I think", plan, 8, suite=suite)
    monkeypatch.undo()
    assert calls and hook_count(lm.model) == 0


def test_bad_feature_index_is_a_clear_error(lm, suite):
    plan = SteeringPlan([("1/res/999", 1.0)])
    with pytest.raises(ValueError, match="1/res/999 is out of range.*32 features"):
        with plan.apply(lm, suite):
            pass
    assert hook_count(lm.model) == 0


# ---- generation ---------------------------------------------------------------------------------
def test_generation_is_seeded_and_zero_plan_is_identical(lm, suite):
    a = generate(lm, ["I think", "The"], None, 12, samples=2, seed=3)
    b = generate(lm, ["I think", "The"], None, 12, samples=2, seed=3)
    zero = generate(lm, ["I think", "The"], plan_from_features(["1/res/3"], 0.0), 12, suite=suite,
                    samples=2, seed=3)
    assert len(a) == 4 and [g.prompt for g in a] == ["I think", "I think", "The", "The"]
    assert [g.new_ids for g in a] == [g.new_ids for g in b] == [g.new_ids for g in zero]
    strong = plan_from_graph(GRAPH, "cumulative", 3, coefficient=50.0)
    steered = generate(lm, ["I think", "The"], strong, 12, suite=suite, samples=2, seed=3)
    assert [g.new_ids for g in steered] != [g.new_ids for g in a]
    with pytest.raises(ValueError, match="suite"):
        generate(lm, "I think", strong, 4)


def test_steering_applies_to_generated_tokens_with_the_kv_cache(lm, suite):
    """Greedy generation with the cache equals a cache-free loop under the same plan."""
    plan = plan_from_graph(GRAPH, "cumulative", 2, coefficient=8.0)
    gen = generate(lm, "I think", plan, 10, suite=suite, greedy=True)[0]
    ids = list(gen.prompt_ids)
    with plan.apply(lm, suite):
        for _ in range(len(gen.new_ids)):
            ids.append(int(logits(lm, torch.tensor([ids]))[0, -1].argmax()))
    assert tuple(ids[len(gen.prompt_ids):]) == gen.new_ids
    unsteered = generate(lm, "I think", None, 10, greedy=True)[0]
    assert unsteered.new_ids != gen.new_ids


# ---- building plans -----------------------------------------------------------------------------
def test_schedules():
    assert schedule_coefficients([3, 5], "constant", 2.0) == [2.0, 2.0]
    exp = schedule_coefficients([0, 10], "exponential", 2.0)
    assert exp[0] == 2.0 and math.isclose(exp[1], 2.0 * math.exp(-0.5))
    assert schedule_coefficients([4, 6, 8], "linear", 1.0, end_coefficient=3.0) == [1.0, 2.0, 3.0]
    assert schedule_coefficients([4, 4], "linear", 1.0, end_coefficient=3.0) == [1.0, 1.0]
    with pytest.raises(ValueError, match="end coefficient"):
        schedule_coefficients([1, 2], "linear", 1.0)
    with pytest.raises(ValueError, match="unknown schedule"):
        schedule_coefficients([1], "cosine", 1.0)


@pytest.mark.parametrize("graph", [GRAPH, "flow"])
def test_plan_from_graph_modes(graph):
    graph = flow_graph() if graph == "flow" else graph
    single = plan_from_graph(graph, "single", 1, coefficient=0.5)
    assert {str(f) for f in single.features} == {"1/res/3", "1/mlp/4"}
    cum = plan_from_graph(graph, "cumulative", coefficient=0.5, schedule="linear",
                          end_coefficient=2.5)  # layer defaults to the seed's (2)
    coef = {str(f): c for f, c in cum.terms}
    assert set(coef) == {"0/res/1", "1/res/3", "1/mlp/4", "2/res/5", "2/att/6"}
    assert coef["0/res/1"] == 0.5 and coef["1/mlp/4"] == 1.5 and coef["2/att/6"] == 2.5
    assert cum.info["mode"] == "cumulative" and cum.info["seed"] == "2/res/5"
    res_only = plan_from_graph(graph, "cumulative", 3, kinds=["res"])
    assert all(f.kind == "res" for f in res_only.features) and len(res_only.terms) == 4
    with pytest.raises(ValueError, match=r"no features at layer 7; its layers: \[0, 1, 2, 3\]"):
        plan_from_graph(graph, "single", 7)
    with pytest.raises(ValueError, match="unknown steering mode"):
        plan_from_graph(graph, "all", 1)


def test_plan_json_round_trip(tmp_path):
    plan = plan_from_graph(GRAPH, "cumulative", 3, schedule="exponential", coefficient=0.7,
                           magnitudes={Feature.parse("3/res/7"): 12.5}, action="activate")
    path = plan.save(tmp_path / "plans" / "p.json")
    back = SteeringPlan.load(path)
    assert back.to_json() == plan.to_json() and back.from_token == 0 and not back.generated_only
    window = SteeringPlan(plan.terms, from_token=3, generated_only=True)
    again = SteeringPlan.from_json(json.loads(json.dumps(window.to_json())))
    assert (again.from_token, again.generated_only) == (3, True)
    assert back.terms == plan.terms and back.magnitude(Feature.parse("3/res/7")) == 12.5
    assert [p.name for p in path.parent.iterdir()] == ["p.json"]  # no temp file left
    assert json.loads(path.read_text())["terms"][0]["feature"] == "0/res/1"
    (tmp_path / "bad.json").write_text('{"terms": [{"feature": "1/res/x"}]}')
    with pytest.raises(ValueError, match="bad.json: bad steering plan"):
        SteeringPlan.load(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SteeringPlan.load(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="unknown steering action"):
        SteeringPlan([("1/res/2", 1.0)], action="amplify")
    with pytest.raises(ValueError, match="at least one"):
        SteeringPlan.from_json({"terms": []})


def test_res_norm_magnitude_matches_the_residual_norm(lm, suite):
    texts = ["I think weddings are lovely.", "The match ended in a draw after extra time."]
    feats = [Feature.parse("1/res/3"), Feature.parse("1/mlp/2"), Feature.parse("2/res/0")]
    mags = feature_magnitudes(lm, suite, feats, "res_norm", texts)
    norms = {1: [], 2: []}
    for t in texts:
        ids = torch.tensor([lm.tokenizer(t)["input_ids"]])
        with recording(lm, ["1/res", "2/res"]) as rec:
            logits(lm, ids)
        for s, h in rec.items():
            norms[s.layer].append(h[0, 1:].norm(dim=-1))  # first token excluded
    for f in feats:
        v = suite[f.site].steering_vectors()[f.index]
        assert math.isclose(mags[f] * float(v.norm()), float(torch.cat(norms[f.layer]).median()),
                            rel_tol=1e-4)
    act = feature_magnitudes(lm, suite, feats, "activation", texts)
    assert all(a > 0 for a in act.values())
    with pytest.raises(ValueError, match="JumpReLU"):
        feature_magnitudes(lm, suite, feats, "theta")
    assert site_edits(plan_from_features(feats, 0.0), lm, suite).keys() == {f.site for f in feats}


def test_cli_steer_features_and_plan_file(lm, tmp_path, capsys):
    from saeflow.cli import main
    model_dir = tmp_path / "tiny-model"
    lm.model.save_pretrained(model_dir)
    lm.tokenizer.save_pretrained(model_dir)
    suite = tiny_suite()
    suite.model = str(model_dir)
    suite.save(tmp_path / "suite")
    plan_path = tmp_path / "plan.json"
    args = ["steer", str(tmp_path / "suite"), "--prompt", "I think", "--max-new-tokens", "6",
            "--greedy"]
    assert main(args + ["--feature", "1/res/3", "--feature", "2/mlp/4", "--mode", "features",
                        "--magnitude", "none", "--coefficient", "40", "--save-plan",
                        str(plan_path)]) == 0
    out = capsys.readouterr().out
    assert "plan: activate 2 features at 2 sites" in out and "unsteered" in out
    terms = json.loads(plan_path.read_text())["terms"]
    assert {t["feature"] for t in terms} == {"1/res/3", "2/mlp/4"}
    assert main(args + ["--plan", str(plan_path)]) == 0
    assert out.split("prompt:")[1] == capsys.readouterr().out.split("prompt:")[1]  # same seed
    assert main(args + ["--plan", str(plan_path), "--generated-only", "--from-token", "2",
                        "--save-plan", str(tmp_path / "late.json")]) == 0
    assert "tokens from position 2, generated tokens only" in capsys.readouterr().out
    late = json.loads((tmp_path / "late.json").read_text())
    assert (late["from_token"], late["generated_only"]) == (2, True)
    assert main(args + ["--plan", str(plan_path), "--from-token", "-1"]) == 2
    assert "--from-token must be >= 0" in capsys.readouterr().err
    assert main(args + ["--plan", str(tmp_path / "nope.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert hook_count(lm.model) == 0
