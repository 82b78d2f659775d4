"""Fast TopK SAE kernels for the CPU: loss and exact gradients with sparse backward passes.

The model is the TopK SAE of Gao et al. 2024 ("Scaling and evaluating sparse autoencoders",
sec. 2.3 and appendix A.2), with ``x`` already scaled to the training space:
    pre = (x - b_dec) @ W_enc^T + b_enc,   z = relu(topk_k(pre)),   x_hat = z @ W_dec + b_dec
    loss = ||x_hat - x||^2 / ||x - mean(x)||^2        (normalised MSE, batch means)
    aux  = ||e_hat - e||^2 / ||e - mean(e)||^2  with e = x - x_hat (a constant) and e_hat the
           decoding (without b_dec) of the top ``k_aux`` pre-activations among dead latents.
Both encoder and decoder weights are stored as ``[F, D]`` (one latent per row) so every sparse
operation is a row gather or a row scatter.

Where the cost goes and what is done about it (see ``bench/bench_train.py``):
  - encoder forward: the ``[B, F]`` pre-activation matmul runs in bf16 when that is measurably
    faster here (AMX/AVX512-BF16), then top-k; values are the bf16 pre-activations (0.4%
    relative precision), ranking ties at that precision are broken arbitrarily;
  - decoder: ``embedding_bag`` with per-sample weights sums the k chosen rows; its gradient with
    respect to the weights ``z`` is a k-row gather-dot;
  - weight gradients are sparse products: ``grad_W[f] = sum over (b, j) with idx[b, j] = f of
    g[b, j] * v[b]``, computed as a COO sparse ``[F, B] @ [B, D]`` product (``rows_grad``),
    which is k/F of the dense cost. No ``[B, F]`` gradient is ever formed.
The gradients are exact for the loss above given the selected indices (tests compare them with
autograd on the dense formulation).
"""

from __future__ import annotations

import time
from functools import lru_cache
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class TopKParams(NamedTuple):
    W_enc_FD: Tensor  # encoder, one latent per row (the transpose of SAE.W_enc)
    b_enc_F: Tensor
    W_dec_FD: Tensor
    b_dec_D: Tensor


class StepOut(NamedTuple):
    loss: float  # normalised MSE of the reconstruction (the batch FVU)
    aux_loss: float  # AuxK loss before its coefficient (0 when no latent is dead)
    idx_BK: Tensor  # chosen latents
    acts_BK: Tensor  # their activations (>= 0)


def rows_grad(idx_BK: Tensor, w_BK: Tensor, v_BD: Tensor, n_rows: int) -> Tensor:
    """``out[f] = sum_{b,j: idx[b,j]=f} w[b,j] * v[b]``, ``[n_rows, D]``, a sparse product."""
    B, K = idx_BK.shape
    cols = torch.arange(B, device=idx_BK.device).repeat_interleave(K)
    M = torch.sparse_coo_tensor(torch.stack([idx_BK.reshape(-1), cols]), w_BK.reshape(-1),
                                (n_rows, B), check_invariants=False)
    return torch.sparse.mm(M, v_BD)


def gather_sum(idx_BK: Tensor, W_FD: Tensor, w_BK: Tensor) -> Tensor:
    """``out[b] = sum_j w[b,j] * W[idx[b,j]]``, shape ``[B, D]``."""
    return F.embedding_bag(idx_BK, W_FD, per_sample_weights=w_BK, mode="sum")


def gather_sum_and_dot(idx_BK: Tensor, W_FD: Tensor, w_BK: Tensor):
    """``gather_sum`` plus a function giving its gradient w.r.t. ``w``:
    ``dot(g_BD)[b, j] = W[idx[b,j]] . g[b]`` (the backward of ``embedding_bag``)."""
    w_leaf = w_BK.detach().requires_grad_(True)
    with torch.enable_grad():
        out = F.embedding_bag(idx_BK, W_FD.detach(), per_sample_weights=w_leaf, mode="sum")

    def dot(g_BD: Tensor) -> Tensor:
        return torch.autograd.grad(out, w_leaf, g_BD)[0]
    return out.detach(), dot


@lru_cache(maxsize=None)
def bf16_matmul_is_fast(d: int = 576, n: int = 2304, threshold: float = 1.5) -> bool:
    """True when a bf16 ``[1024, d] @ [d, n]`` runs ``threshold`` times faster than fp32 here."""
    a, b = torch.randn(1024, d), torch.randn(n, d)
    ab, bb = a.bfloat16(), b.bfloat16()

    def best(x, y):
        x @ y.T
        t = []
        for _ in range(3):
            t0 = time.perf_counter()
            x @ y.T
            t.append(time.perf_counter() - t0)
        return min(t)
    return best(a, b) / best(ab, bb) >= threshold


def encode_pre(xc_BD: Tensor, W_enc_FD: Tensor, b_enc_F: Tensor,
               matmul_dtype: torch.dtype) -> Tensor:
    """Pre-activations ``[B, F]`` in ``matmul_dtype`` (``W_enc_FD`` may already be in it)."""
    W = W_enc_FD.to(matmul_dtype)
    return torch.addmm(b_enc_F.to(matmul_dtype), xc_BD.to(matmul_dtype), W.T)


def topk_step(x_BD: Tensor, p: TopKParams, k: int, dead_F: Tensor | None = None,
              k_aux: int = 0, aux_coef: float = 1 / 32,
              matmul_dtype: torch.dtype = torch.bfloat16,
              W_enc_lowp: Tensor | None = None) -> tuple[StepOut, TopKParams]:
    """Loss and gradients of one batch (module docstring); returns ``(StepOut, grads)``.

    ``dead_F`` is a boolean mask of dead latents for the AuxK loss (weighted by ``aux_coef``);
    ``W_enc_lowp`` is an optional ``matmul_dtype`` copy of the encoder to avoid a cast per step.
    """
    B, D = x_BD.shape
    n_lat = p.W_enc_FD.shape[0]
    xc_BD = x_BD - p.b_dec_D
    pre_BF = encode_pre(xc_BD, p.W_enc_FD if W_enc_lowp is None else W_enc_lowp, p.b_enc_F,
                        matmul_dtype)
    vals_BK, idx_BK = pre_BF.topk(k, dim=-1, sorted=False)
    vals_BK = vals_BK.float()
    acts_BK = vals_BK.clamp_min(0)

    x_hat_BD, dot_dec = gather_sum_and_dot(idx_BK, p.W_dec_FD, acts_BK)
    x_hat_BD = x_hat_BD + p.b_dec_D
    err_BD = x_hat_BD - x_BD
    denom = (x_BD - x_BD.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12)
    loss = err_BD.pow(2).sum(-1).mean() / denom
    g_out_BD = err_BD * (2.0 / (B * denom))

    g_W_dec = rows_grad(idx_BK, acts_BK, g_out_BD, n_lat)
    g_b_dec = g_out_BD.sum(0)
    g_BK = dot_dec(g_out_BD) * (vals_BK > 0)
    enc_idx, enc_g = idx_BK, g_BK

    aux = torch.zeros(())
    n_dead = 0 if dead_F is None else int(dead_F.sum())
    if n_dead and k_aux > 0 and aux_coef > 0:
        dead_idx = dead_F.nonzero().squeeze(1)
        ka = min(k_aux, n_dead)
        a_vals, a_pos = pre_BF.index_select(1, dead_idx).topk(ka, dim=-1, sorted=False)
        a_idx = dead_idx[a_pos]
        a_vals = a_vals.float()
        a_acts = a_vals.clamp_min(0)
        e_BD = -err_BD  # x - x_hat, a constant target
        e_hat, dot_aux = gather_sum_and_dot(a_idx, p.W_dec_FD, a_acts)
        e_denom = (e_BD - e_BD.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12)
        a_err = e_hat - e_BD
        aux = a_err.pow(2).sum(-1).mean() / e_denom
        g_aux_BD = a_err * (2.0 * aux_coef / (B * e_denom))
        g_W_dec = g_W_dec + rows_grad(a_idx, a_acts, g_aux_BD, n_lat)
        g_a = dot_aux(g_aux_BD) * (a_vals > 0)
        enc_idx, enc_g = torch.cat([idx_BK, a_idx], 1), torch.cat([g_BK, g_a], 1)

    g_W_enc = rows_grad(enc_idx, enc_g, xc_BD, n_lat)
    g_b_enc = torch.zeros(n_lat).index_add_(0, enc_idx.reshape(-1), enc_g.reshape(-1))
    g_b_dec = g_b_dec - g_b_enc @ p.W_enc_FD  # b_dec also enters through x - b_dec
    out = StepOut(float(loss), float(aux), idx_BK, acts_BK)
    return out, TopKParams(g_W_enc, g_b_enc, g_W_dec, g_b_dec)


def dense_topk_loss(x_BD: Tensor, p: TopKParams, k: int, dead_F: Tensor | None = None,
                    k_aux: int = 0, aux_coef: float = 1 / 32) -> Tensor:
    """The textbook dense formulation, differentiable by autograd: the reference for the tests
    and the baseline of the benchmark. Returns ``loss + aux_coef * aux``."""
    pre_BF = (x_BD - p.b_dec_D) @ p.W_enc_FD.T + p.b_enc_F
    vals, idx = pre_BF.topk(k, dim=-1)
    z_BF = torch.zeros_like(pre_BF).scatter(-1, idx, vals.clamp_min(0))
    x_hat = z_BF @ p.W_dec_FD + p.b_dec_D
    denom = (x_BD - x_BD.mean(0)).pow(2).sum(-1).mean()
    loss = (x_hat - x_BD).pow(2).sum(-1).mean() / denom
    if dead_F is not None and int(dead_F.sum()) and k_aux > 0:
        e = (x_BD - x_hat).detach()
        masked = pre_BF.masked_fill(~dead_F, float("-inf"))
        a_vals, a_idx = masked.topk(min(k_aux, int(dead_F.sum())), dim=-1)
        z_aux = torch.zeros_like(pre_BF).scatter(-1, a_idx, a_vals.clamp_min(0))
        e_hat = z_aux @ p.W_dec_FD
        aux = (e_hat - e).pow(2).sum(-1).mean() / (e - e.mean(0)).pow(2).sum(-1).mean()
        loss = loss + aux_coef * aux
    return loss


def project_decoder_grad(W_dec_FD: Tensor, g_W_dec_FD: Tensor) -> Tensor:
    """Remove the part of the decoder gradient that would change the (unit) row norms."""
    return g_W_dec_FD - (g_W_dec_FD * W_dec_FD).sum(-1, keepdim=True) * W_dec_FD


def normalize_rows_(W_FD: Tensor) -> Tensor:
    W_FD.div_(W_FD.norm(dim=-1, keepdim=True).clamp_min(1e-8))
    return W_FD


def init_params(d: int, n_latents: int, generator: torch.Generator) -> TopKParams:
    """Gao et al. init: random unit decoder rows, encoder = decoder transposed, zero biases
    (``b_dec`` is set to the data mean by the trainer)."""
    W_dec = normalize_rows_(torch.randn(n_latents, d, generator=generator))
    return TopKParams(W_dec.clone(), torch.zeros(n_latents), W_dec, torch.zeros(d))


class TopKTrainer:
    """Training state of one TopK SAE: weights, Adam, input scale, dead-latent counters.

    ``prepare`` turns a site's hidden states into training rows: position 0 is dropped, tokens
    whose norm exceeds ``outlier_factor`` times the median norm (measured on the first batch)
    are dropped, and the rest are multiplied by one scale chosen on the first batch so that
    ``E||x||^2 = d``. The first batch also sets ``b_dec`` to the mean of the scaled rows.
    A latent is dead when it has not fired for ``dead_tokens`` training tokens.
    """

    def __init__(self, d: int, width: int, k: int, *, k_aux: int = 64, aux_coef: float = 1 / 32,
                 dead_tokens: int = 20_000, outlier_factor: float = 10.0, seed: int = 0,
                 matmul_dtype: torch.dtype = torch.bfloat16):
        if not 0 < k <= width:
            raise ValueError(f"need 0 < k <= width, got k={k}, width={width}")
        self.d, self.width, self.k, self.k_aux, self.aux_coef = d, width, k, k_aux, aux_coef
        self.dead_tokens, self.outlier_factor = dead_tokens, outlier_factor
        self.matmul_dtype = matmul_dtype
        init = init_params(d, width, torch.Generator().manual_seed(seed))
        self.params = TopKParams(*[t.requires_grad_(True) for t in init])
        self.opt = torch.optim.Adam(self.params, lr=1e-3, fused=True)
        self.scale: float | None = None
        self.max_norm: float | None = None
        self.since_fired_F = torch.zeros(width, dtype=torch.long)
        self.tokens = 0
        self.steps = 0

    @torch.no_grad()
    def prepare(self, h_BTD: Tensor) -> Tensor:
        x = h_BTD[:, 1:].reshape(-1, self.d).float()
        norms = x.norm(dim=-1)
        if self.max_norm is None:
            self.max_norm = float(self.outlier_factor * norms.median())
        x = x[norms <= self.max_norm]
        if self.scale is None:
            if x.shape[0] == 0:
                raise ValueError("the first batch has no usable tokens to set the input scale")
            self.scale = float((self.d / x.pow(2).sum(-1).mean().clamp_min(1e-12)) ** 0.5)
            self.params.b_dec_D.copy_((x * self.scale).mean(0))
        return x * self.scale

    def dead_mask(self) -> Tensor:
        return self.since_fired_F >= self.dead_tokens

    @torch.no_grad()
    def step(self, x_ND: Tensor, lr: float) -> StepOut:
        p = self.params
        W_low = p.W_enc_FD.to(self.matmul_dtype) if self.matmul_dtype != torch.float32 else None
        out, grads = topk_step(x_ND, p, self.k, self.dead_mask(), self.k_aux, self.aux_coef,
                               self.matmul_dtype, W_low)
        for t, g in zip(p, grads):
            t.grad = g
        p.W_dec_FD.grad = project_decoder_grad(p.W_dec_FD, p.W_dec_FD.grad)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()
        for t in p:
            t.grad = None
        normalize_rows_(p.W_dec_FD)
        self.since_fired_F += x_ND.shape[0]
        self.since_fired_F.index_fill_(0, out.idx_BK[out.acts_BK > 0], 0)
        self.tokens += x_ND.shape[0]
        self.steps += 1
        return out

    def state_dict(self) -> dict:
        return {"params": [t.detach().clone() for t in self.params], "opt": self.opt.state_dict(),
                "scale": self.scale, "max_norm": self.max_norm,
                "since_fired": self.since_fired_F.clone(), "tokens": self.tokens,
                "steps": self.steps}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        for t, v in zip(self.params, state["params"]):
            if t.shape != v.shape:
                raise ValueError(f"checkpoint tensor has shape {tuple(v.shape)}, expected "
                                 f"{tuple(t.shape)}")
            t.copy_(v)
        self.opt.load_state_dict(state["opt"])
        self.scale, self.max_norm = state["scale"], state["max_norm"]
        self.since_fired_F = state["since_fired"].clone()
        self.tokens, self.steps = state["tokens"], state["steps"]

    def sae(self, site=None, metadata: dict | None = None):
        """The trained SAE on raw activations: weights of the scaled space plus
        ``input_scale``/``output_scale`` (``save_saelens`` folds them into the files)."""
        from saeflow.sae import SAE
        p = self.params
        scale = 1.0 if self.scale is None else self.scale
        return SAE(W_enc=p.W_enc_FD.detach().T.contiguous(), b_enc=p.b_enc_F.detach().clone(),
                   W_dec=p.W_dec_FD.detach().clone(), b_dec=p.b_dec_D.detach().clone(),
                   activation="topk", k=self.k, site=site, apply_b_dec_to_input=True,
                   input_scale=scale, output_scale=1.0 / scale, metadata=dict(metadata or {}))
