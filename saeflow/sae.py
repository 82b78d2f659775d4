"""The SAE value type: weights, encode/decode, threshold folding, unit decoder directions.

Convention (used everywhere in saeflow): ``W_enc`` is ``[d_in, d_sae]``, ``W_dec`` is
``[d_sae, d_in]`` (one feature per row), ``b_enc`` is ``[d_sae]``, ``b_dec`` is ``[d_in]``.

Encoding, for an input ``x`` of shape ``[..., d_in]``:
  1. input normalisation: ``x <- x * input_scale``; before it, a per-token normalisation that
     ``reconstruct`` undoes: ``input_norm == "layer_norm"`` standardises each token (OpenAI v5,
     SAELens ``layer_norm``), ``"constant_norm"`` rescales each token to norm ``sqrt(d_in)``
     (SAELens ``constant_norm_rescale``);
  2. ``pre = (x - b_dec * apply_b_dec_to_input) @ W_enc + b_enc``;
  3. activation: ``relu``; ``jumprelu`` (``relu(pre) * (pre > threshold)``, per-feature
     threshold); ``topk`` (the ``k`` largest of ``relu(pre)``).
Decoding: ``x_hat = (acts @ W_dec + b_dec) * output_scale`` (then the per-token normalisation
undone, in ``reconstruct``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor

from saeflow.sites import Site

ACTIVATIONS = ("relu", "jumprelu", "topk")
INPUT_NORMS = ("none", "layer_norm", "constant_norm")


class SAEFileError(ValueError):
    """A file that should hold an SAE is missing, malformed or inconsistent."""


@dataclass
class SAE:
    W_enc: Tensor  # [d_in, d_sae]
    b_enc: Tensor  # [d_sae]
    W_dec: Tensor  # [d_sae, d_in]
    b_dec: Tensor  # [d_in]
    activation: str = "relu"
    threshold: Tensor | None = None  # [d_sae], jumprelu only
    k: int | None = None  # topk only
    site: Site | None = None
    apply_b_dec_to_input: bool = False
    input_norm: str = "none"
    input_scale: float = 1.0
    output_scale: float = 1.0
    metadata: dict = field(default_factory=dict)
    source: str = "<memory>"  # where it was read from, for error messages

    def __post_init__(self):
        where = self.source
        if self.activation not in ACTIVATIONS:
            raise SAEFileError(f"{where}: unknown activation {self.activation!r}; "
                               f"known: {', '.join(ACTIVATIONS)}")
        if self.input_norm not in INPUT_NORMS:
            raise SAEFileError(f"{where}: unknown input_norm {self.input_norm!r}; "
                               f"known: {', '.join(INPUT_NORMS)}")
        if self.W_enc.ndim != 2 or self.W_dec.ndim != 2:
            raise SAEFileError(f"{where}: W_enc and W_dec must be 2-d, got shapes "
                               f"{tuple(self.W_enc.shape)} and {tuple(self.W_dec.shape)}")
        d, F = self.W_enc.shape
        expect = {"W_dec": (F, d), "b_enc": (F,), "b_dec": (d,)}
        for name, shape in expect.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise SAEFileError(f"{where}: {name} has shape {got}, expected {shape} "
                                   f"(W_enc is [d_in={d}, d_sae={F}])")
        if self.activation == "jumprelu":
            if self.threshold is None:
                raise SAEFileError(f"{where}: a jumprelu SAE needs a threshold")
            if self.threshold.ndim == 0:
                self.threshold = self.threshold.expand(F).clone()
            if tuple(self.threshold.shape) != (F,):
                raise SAEFileError(f"{where}: threshold has shape {tuple(self.threshold.shape)}, "
                                   f"expected ({F},) or a scalar")
        if self.activation == "topk":
            if self.k is None or not 0 < int(self.k) <= F:
                raise SAEFileError(f"{where}: a topk SAE needs 0 < k <= d_sae={F}, got k={self.k}")
            self.k = int(self.k)
        for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
            t = getattr(self, name)
            if t is not None and not torch.isfinite(t).all():
                raise SAEFileError(f"{where}: {name} contains NaN or infinite values")

    # ---- shape -------------------------------------------------------------------------
    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    def replace(self, **changes) -> SAE:
        return dataclasses.replace(self, **changes)

    def to(self, device=None, dtype=None) -> SAE:
        def mv(t):
            return None if t is None else t.to(device=device, dtype=dtype)
        return self.replace(W_enc=mv(self.W_enc), b_enc=mv(self.b_enc), W_dec=mv(self.W_dec),
                            b_dec=mv(self.b_dec), threshold=mv(self.threshold))

    # ---- function ----------------------------------------------------------------------
    def _standardise(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(x_normalised, shift, scale)`` with ``x = x_normalised * scale + shift``, per token,
        for the SAE's ``input_norm`` (identity for ``"none"``)."""
        if self.input_norm == "constant_norm":
            scale = x.norm(dim=-1, keepdim=True) / x.shape[-1] ** 0.5
            return x / scale, torch.zeros_like(scale), scale
        if self.input_norm != "layer_norm":
            one = torch.ones_like(x[..., :1])
            return x, one * 0, one
        mu = x.mean(-1, keepdim=True)
        xc = x - mu
        std = xc.std(dim=-1, keepdim=True) + 1e-5  # unbiased, as OpenAI's and SAELens' LN
        return xc / std, mu, std

    def pre_acts(self, x: Tensor) -> Tensor:
        x = x.to(self.W_enc.dtype)
        if self.input_norm != "none":
            x = self._standardise(x)[0]
        x = x * self.input_scale
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def encode(self, x: Tensor) -> Tensor:  # [..., d_in] -> [..., d_sae]
        return self.activate(self.pre_acts(x))

    def activate(self, pre: Tensor) -> Tensor:
        if self.activation == "relu":
            return torch.relu(pre)
        if self.activation == "jumprelu":
            return torch.relu(pre) * (pre > self.threshold.to(pre.dtype))
        vals, idx = torch.relu(pre).topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter_(-1, idx, vals)

    def decode(self, acts: Tensor) -> Tensor:  # [..., d_sae] -> [..., d_in]
        return (acts.to(self.W_dec.dtype) @ self.W_dec + self.b_dec) * self.output_scale

    def reconstruct(self, x: Tensor) -> Tensor:
        """The SAE's estimate of ``x`` in the input's own space."""
        out = self.decode(self.encode(x))
        if self.input_norm != "none":
            _, mu, std = self._standardise(x.to(self.W_enc.dtype))
            out = out * std + mu
        return out

    # ---- weights-only views ------------------------------------------------------------
    def fold(self) -> SAE:
        """Fold JumpReLU thresholds into the weights (Mechanistic Permutability, sec. 3):
        divide encoder column i and b_enc[i] by theta_i, multiply decoder row i by theta_i and
        set the threshold to 1. The SAE computes the same function. Features with
        theta_i <= 0 are left as they are (their threshold stays theta_i)."""
        if self.activation != "jumprelu":
            return self
        theta = self.threshold
        ok = theta > 0
        scale = torch.where(ok, theta, torch.ones_like(theta))
        return self.replace(W_enc=self.W_enc / scale, b_enc=self.b_enc / scale,
                            W_dec=self.W_dec * scale[:, None],
                            threshold=torch.where(ok, torch.ones_like(theta), theta),
                            metadata={**self.metadata, "folded": True})

    def steering_vectors(self) -> Tensor:
        """Decoder rows as they add to the hidden state (``output_scale`` applied), [F, d]."""
        return self.W_dec * self.output_scale

    def unit_decoder(self, dtype=torch.float32) -> Tensor:
        """Decoder rows normalised to unit length, [F, d] (zero rows stay zero)."""
        W = self.W_dec.to(dtype)
        return W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def __repr__(self) -> str:
        extra = f", k={self.k}" if self.activation == "topk" else ""
        return (f"SAE(site={self.site}, d_in={self.d_in}, d_sae={self.d_sae}, "
                f"activation={self.activation}{extra}, source={self.source!r})")
