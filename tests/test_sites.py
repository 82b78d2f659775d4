"""Sites and features: one spelling, parsed and printed in one place."""

import pytest

from saeflow.sites import Feature, Site, parse_sites, site_from_hook_name


@pytest.mark.parametrize("text", ["0/res", "12/mlp", "3/att", "25/att_z"])
def test_site_round_trip(text):
    site = Site.parse(text)
    assert str(site) == text
    assert Site.parse(site.slug) == site  # 12-res form parses back
    assert Site.parse(site) is site


def test_site_fields_and_hook_names():
    s = Site.parse(" 12/res ")
    assert (s.layer, s.kind, s.slug) == (12, "res", "12-res")
    assert s.hook_name == "blocks.12.hook_resid_post"
    assert Site(4, "att_z").hook_name == "blocks.4.attn.hook_z"
    assert Site(4, "att").hook_name == "blocks.4.hook_attn_out"
    assert Site(4, "mlp").hook_name == "blocks.4.hook_mlp_out"
    assert s.residual_basis and not Site(1, "att_z").residual_basis


def test_sites_order_by_layer_then_kind():
    sites = [Site.parse(t) for t in ["2/res", "1/res", "1/mlp", "10/att"]]
    assert [str(s) for s in sorted(sites)] == ["1/mlp", "1/res", "2/res", "10/att"]


@pytest.mark.parametrize("bad", ["12", "12/resid", "x/res", "-1/res", "12/res/3", ""])
def test_bad_sites_raise_with_the_expected_form(bad):
    with pytest.raises(ValueError, match="LAYER/KIND"):
        Site.parse(bad)


def test_site_constructor_validates():
    with pytest.raises(ValueError, match="known kinds"):
        Site(1, "resid")
    with pytest.raises(ValueError, match="non-negative"):
        Site(-1, "res")


def test_feature_round_trip_and_fields():
    f = Feature.parse("12/res/4111")
    assert str(f) == "12/res/4111"
    assert (f.layer, f.kind, f.index) == (12, "res", 4111)
    assert f.site == Site(12, "res") and Site(12, "res").feature(4111) == f
    assert Feature.parse("12-res-4111") == f
    with pytest.raises(ValueError, match="LAYER/KIND/INDEX"):
        Feature.parse("12/res")
    with pytest.raises(ValueError, match="non-negative"):
        Feature(Site(1, "res"), -3)


@pytest.mark.parametrize("hook, site", [
    ("blocks.7.hook_resid_post", "7/res"), ("blocks.7.hook_mlp_out", "7/mlp"),
    ("blocks.7.hook_attn_out", "7/att"), ("blocks.7.attn.hook_z", "7/att_z"),
    ("model.layers.3", "3/res"), ("layers.3.mlp", "3/mlp"), ("layers.3.self_attn", "3/att"),
    ("model.layers.3.post_feedforward_layernorm", "3/mlp"),
    ("model.layers.3.post_attention_layernorm", "3/att"),
    ("model.layers.3.self_attn.o_proj.input", "3/att_z"), ("h.5", "5/res"),
    ("transformer.h.5.attn", "5/att"), ("gpt_neox.layers.2.attention", "2/att"),
])
def test_site_from_hook_name(hook, site):
    assert str(site_from_hook_name(hook)) == site


def test_unknown_hook_names_raise():
    with pytest.raises(ValueError, match="cannot tell the site"):
        site_from_hook_name("blocks.3.hook_resid_pre")


def test_parse_sites_lists_ranges_and_patterns():
    assert [str(s) for s in parse_sites("3/res, 1/mlp,3/res")] == ["1/mlp", "3/res"]
    assert [str(s) for s in parse_sites("2-4/res")] == ["2/res", "3/res", "4/res"]
    assert [str(s) for s in parse_sites("*/att", n_layers=2)] == ["0/att", "1/att"]
    assert len(parse_sites("all", n_layers=3)) == 9
    assert {s.kind for s in parse_sites("all", n_layers=3)} == {"res", "mlp", "att"}
    with pytest.raises(ValueError, match="layer count"):
        parse_sites("*/res")
