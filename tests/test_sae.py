"""The SAE value type with hand-set tiny weights and exact expected outputs."""

import pytest
import torch

from saeflow.formats import load_sae, save_saelens
from saeflow.sae import SAE, SAEFileError
from saeflow.sites import Site

T = torch.tensor
W_ENC = T([[1., 0., 0., 1.], [0., 1., 0., -1.], [0., 0., 1., 0.]])  # [d=3, F=4]
B_ENC = T([0., -0.5, 0., 0.])
W_DEC = T([[1., 0., 0.], [0., 1., 0.], [0., 0., 1.], [1., 1., 1.]])  # [F=4, d=3]
B_DEC = T([0.1, 0.2, 0.3])
X = T([[2., 1., -1.]])  # pre-activations: [2, 0.5, -1, 1]


def tiny(**kw) -> SAE:
    base = dict(W_enc=W_ENC.clone(), b_enc=B_ENC.clone(), W_dec=W_DEC.clone(), b_dec=B_DEC.clone(),
                site=Site(2, "res"))
    return SAE(**{**base, **kw})


def test_relu_encode_decode_exact():
    sae = tiny()
    assert torch.equal(sae.pre_acts(X), T([[2., 0.5, -1., 1.]]))
    assert torch.equal(sae.encode(X), T([[2., 0.5, 0., 1.]]))
    # 2*e0 + 0.5*e1 + 1*(1,1,1) + b_dec
    assert torch.allclose(sae.reconstruct(X), T([[3.1, 1.7, 1.3]]))
    assert (sae.d_in, sae.d_sae) == (3, 4)


def test_jumprelu_is_strict_per_feature():
    sae = tiny(activation="jumprelu", threshold=T([1., 0.4, 0., 1.]))
    # feature 3 has pre == threshold == 1: inactive; feature 1 (0.5 > 0.4): active
    assert torch.equal(sae.encode(X), T([[2., 0.5, 0., 0.]]))
    scalar = tiny(activation="jumprelu", threshold=T(1.5))
    assert scalar.threshold.shape == (4,)
    assert torch.equal(scalar.encode(X), T([[2., 0., 0., 0.]]))


def test_topk_keeps_the_k_largest_positive():
    assert torch.equal(tiny(activation="topk", k=2).encode(X), T([[2., 0., 0., 1.]]))
    # k larger than the number of positive pre-activations: negatives stay zero
    assert torch.equal(tiny(activation="topk", k=4).encode(X), T([[2., 0.5, 0., 1.]]))


def test_b_dec_subtraction_and_scales():
    sae = tiny(apply_b_dec_to_input=True)
    assert torch.allclose(sae.pre_acts(X), T([[1.9, 0.3, -1.3, 1.1]]))
    scaled = tiny(input_scale=2.0, output_scale=0.5)
    assert torch.allclose(scaled.pre_acts(X), T([[4., 1.5, -2., 2.]]))
    acts = scaled.encode(X)  # [4, 1.5, 0, 2]
    assert torch.allclose(scaled.decode(acts), 0.5 * (acts @ W_DEC + B_DEC))
    assert torch.allclose(scaled.steering_vectors(), 0.5 * W_DEC)


def test_layer_norm_input_is_standardised_and_undone():
    sae = tiny(input_norm="layer_norm")
    x = T([[1., 2., 6.]])
    mu, std = x.mean(), x.std()  # unbiased, as OpenAI's and SAELens' LN
    xn = (x - mu) / (std + 1e-5)
    assert torch.allclose(sae.pre_acts(x), xn @ W_ENC + B_ENC)
    expect = (torch.relu(xn @ W_ENC + B_ENC) @ W_DEC + B_DEC) * (std + 1e-5) + mu
    assert torch.allclose(sae.reconstruct(x), expect)


def test_fold_keeps_the_function_and_unit_threshold():
    torch.manual_seed(0)
    theta = T([0.5, 2.0, 0.25, 0.0])  # the last one is not positive: left as it is
    sae = tiny(activation="jumprelu", threshold=theta, b_enc=T([0.1, 0.3, 0.2, 0.1]))
    folded = sae.fold()
    x = torch.randn(64, 3) * 2
    assert torch.allclose(folded.reconstruct(x), sae.reconstruct(x), atol=1e-6)
    assert torch.equal(folded.threshold, T([1., 1., 1., 0.]))
    assert torch.allclose(folded.W_dec, W_DEC * T([0.5, 2.0, 0.25, 1.0])[:, None])
    a, b = sae.encode(x), folded.encode(x)
    assert torch.allclose(b[:, :3], a[:, :3] / theta[:3], atol=1e-6)
    assert folded.metadata["folded"]
    relu = tiny()
    same = relu.fold()  # relu has no threshold: folding changes no weight
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(same, name), getattr(relu, name)), name


def test_unit_decoder_rows():
    sae = tiny(W_dec=torch.cat([W_DEC[:3], torch.zeros(1, 3)]))
    U = sae.unit_decoder()
    assert torch.allclose(U[:3].norm(dim=1), torch.ones(3))
    assert torch.equal(U[3], torch.zeros(3))
    assert torch.allclose(tiny().unit_decoder()[3], torch.ones(3) / 3 ** 0.5)


def test_to_changes_dtype_and_encode_casts_input():
    sae = tiny().to(dtype=torch.float64)
    assert sae.W_enc.dtype == torch.float64
    assert sae.encode(X.float()).dtype == torch.float64


@pytest.mark.parametrize("change, message", [
    (dict(W_dec=torch.zeros(3, 4)), "W_dec has shape"),
    (dict(b_enc=torch.zeros(3)), "b_enc has shape"),
    (dict(b_dec=torch.zeros(4)), "b_dec has shape"),
    (dict(W_enc=torch.zeros(3)), "must be 2-d"),
    (dict(activation="gelu"), "unknown activation"),
    (dict(input_norm="rms"), "unknown input_norm"),
    (dict(activation="jumprelu"), "needs a threshold"),
    (dict(activation="jumprelu", threshold=torch.ones(5)), "threshold has shape"),
    (dict(activation="topk"), "needs 0 < k"),
    (dict(activation="topk", k=9), "needs 0 < k"),
    (dict(W_enc=W_ENC * float("nan")), "NaN"),
])
def test_bad_weights_raise_clear_errors(change, message):
    with pytest.raises(SAEFileError, match=message):
        tiny(source="some/file", **change)
    with pytest.raises(SAEFileError, match="some/file"):
        tiny(source="some/file", **change)


@pytest.mark.parametrize("kw", [
    dict(),
    dict(activation="jumprelu", threshold=T([1., 0.4, 0.2, 0.5])),
    dict(activation="topk", k=2, apply_b_dec_to_input=True),
    dict(activation="jumprelu", threshold=T([1., 0.4, 0.2, 0.5]), apply_b_dec_to_input=True,
         input_scale=2.5, output_scale=0.4),  # s * o == 1: b_dec stays on the input
    dict(activation="topk", k=3, apply_b_dec_to_input=True, input_scale=3.0, output_scale=0.1),
    dict(input_norm="layer_norm", apply_b_dec_to_input=True, activation="topk", k=2),
])
def test_writer_reader_round_trip_folds_scales(tmp_path, kw):
    torch.manual_seed(1)
    sae = tiny(**kw)
    folder = save_saelens(sae, tmp_path / "sae", model_name="tiny")
    back = load_sae(folder)
    assert back.site == Site(2, "res") and back.metadata["model_name"] == "tiny"
    assert (back.input_scale, back.output_scale) == (1.0, 1.0)  # folded into the weights
    x = torch.randn(32, 3) * 3
    assert torch.allclose(back.encode(x), sae.encode(x), atol=1e-5)
    assert torch.allclose(back.reconstruct(x), sae.reconstruct(x), atol=1e-5)
    assert back.activation == sae.activation and back.k == sae.k


def test_writer_needs_a_site_and_is_atomic(tmp_path):
    with pytest.raises(ValueError, match="site"):
        save_saelens(tiny(site=None), tmp_path / "x")
    folder = save_saelens(tiny(), tmp_path / "x")
    save_saelens(tiny(b_enc=B_ENC + 1), folder)  # overwrite in place
    assert torch.allclose(load_sae(folder).b_enc, B_ENC + 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]  # no temp folders left
