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
    faster here (``compute.bf16_is_fast``: AMX/AVX512-BF16), then top-k; values are the bf16
    pre-activations (0.4% relative precision), ranking ties at that precision are broken
    arbitrarily;
  - decoder: ``embedding_bag`` with per-sample weights sums the k chosen rows; its gradient with
    respect to the weights ``z`` is a k-row gather-dot;
  - weight gradients are sparse products: ``grad_W[f] = sum over (b, j) with idx[b, j] = f of
    g[b, j] * v[b]``, computed as a COO sparse ``[F, B] @ [B, D]`` product (``rows_grad``),
    which is k/F of the dense cost. No ``[B, F]`` gradient is ever formed.
The gradients are exact for the loss above given the selected indices (tests compare them with
autograd on the dense formulation).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from saeflow import kernels as compiled
from saeflow.compute import bf16_is_fast as bf16_matmul_is_fast  # noqa: F401  (train uses it)
from saeflow.tokens import norm_limit, usable_tokens


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
    return rows_grad_sum([(idx_BK, w_BK, v_BD)], n_rows)


def rows_grad_sum(terms: list[tuple[Tensor, Tensor, Tensor]], n_rows: int,
                  out: Tensor | None = None) -> Tensor:
    """The sum of several ``rows_grad`` terms as one sparse ``[n_rows, sum B] @ [sum B, D]``
    product (one output, one pass), written into ``out`` when given (a reused buffer skips the
    allocation and page faults of a fresh weight-sized result)."""
    rows, cols, vals, off = [], [], [], 0
    for idx_BK, w_BK, v_BD in terms:
        B, K = idx_BK.shape
        rows.append(idx_BK.reshape(-1))
        cols.append(torch.arange(off, off + B, device=idx_BK.device).repeat_interleave(K))
        vals.append(w_BK.reshape(-1))
        off += B
    M = torch.sparse_coo_tensor(torch.stack([torch.cat(rows), torch.cat(cols)]), torch.cat(vals),
                                (n_rows, off), check_invariants=False)
    v = terms[0][2] if len(terms) == 1 else torch.cat([t[2] for t in terms])
    if out is None:
        return torch.sparse.mm(M, v)
    return torch.mm(M, v, out=out)


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


def encode_pre(xc_BD: Tensor, W_enc_FD: Tensor, b_enc_F: Tensor,
               matmul_dtype: torch.dtype) -> Tensor:
    """Pre-activations ``[B, F]`` in ``matmul_dtype`` (``W_enc_FD`` may already be in it)."""
    W = W_enc_FD.to(matmul_dtype)
    return torch.addmm(b_enc_F.to(matmul_dtype), xc_BD.to(matmul_dtype), W.T)


def topk_step(x_BD: Tensor, p: TopKParams, k: int, dead_F: Tensor | None = None,
              k_aux: int = 0, aux_coef: float = 1 / 32,
              matmul_dtype: torch.dtype = torch.bfloat16,
              W_enc_lowp: Tensor | None = None,
              grad_bufs: tuple[Tensor, Tensor] | None = None) -> tuple[StepOut, TopKParams]:
    """Loss and gradients of one batch (module docstring); returns ``(StepOut, grads)``.

    ``dead_F`` is a boolean mask of dead latents for the AuxK loss (weighted by ``aux_coef``);
    ``W_enc_lowp`` is an optional ``matmul_dtype`` copy of the encoder to avoid a cast per step;
    ``grad_bufs`` optional ``(W_enc, W_dec)``-shaped buffers the weight gradients are written to.
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

    dec_terms = [(idx_BK, acts_BK, g_out_BD)]  # decoder gradient terms, summed in one product
    g_b_dec = g_out_BD.sum(0)
    g_BK = dot_dec(g_out_BD) * (vals_BK > 0)
    enc_idx, enc_g = idx_BK, g_BK

    aux = x_BD.new_zeros(())
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
        dec_terms.append((a_idx, a_acts, g_aux_BD))
        g_a = dot_aux(g_aux_BD) * (a_vals > 0)
        enc_idx, enc_g = torch.cat([idx_BK, a_idx], 1), torch.cat([g_BK, g_a], 1)

    enc_buf, dec_buf = grad_bufs if grad_bufs is not None else (None, None)
    g_W_dec = rows_grad_sum(dec_terms, n_lat, out=dec_buf)
    g_W_enc = rows_grad_sum([(enc_idx, enc_g, xc_BD)], n_lat, out=enc_buf)
    g_b_enc = x_BD.new_zeros(n_lat).index_add_(0, enc_idx.reshape(-1), enc_g.reshape(-1))
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
    """Remove the part of the decoder gradient that would change the (unit) row norms
    (in place: two passes over the matrix, no temporary of its size)."""
    radial_F = torch.bmm(g_W_dec_FD.unsqueeze(1), W_dec_FD.unsqueeze(2)).reshape(-1)
    return g_W_dec_FD.addcmul_(W_dec_FD, radial_F.unsqueeze(1), value=-1)


def normalize_rows_(W_FD: Tensor) -> Tensor:
    W_FD.div_(W_FD.norm(dim=-1, keepdim=True).clamp_min(1e-8))
    return W_FD


def init_params(d: int, n_latents: int, generator: torch.Generator) -> TopKParams:
    """Gao et al. init: random unit decoder rows, encoder = decoder transposed, zero biases
    (``b_dec`` is set to the data mean by the trainer)."""
    W_dec = normalize_rows_(torch.randn(n_latents, d, generator=generator))
    return TopKParams(W_dec.clone(), torch.zeros(n_latents), W_dec, torch.zeros(d))


class RowBuffer:
    """A bounded shuffle buffer of training rows for one site: new rows overwrite the oldest,
    minibatches are drawn uniformly (with replacement) from what it holds. When every ``n`` rows
    added are followed by ``reuse * n`` draws, a row is drawn about ``reuse`` times while it is
    held. Rows are kept in the dtype they arrive in (the model's, bf16 by default)."""

    def __init__(self, capacity: int, d: int, seed: int = 0):
        if capacity < 1:
            raise ValueError(f"buffer capacity must be >= 1 row, got {capacity}")
        self.capacity, self.d = capacity, d
        self.rows: Tensor | None = None
        self.n = 0  # rows held
        self.pos = 0  # next row to overwrite
        self.rng = torch.Generator().manual_seed(seed)

    def add(self, x_ND: Tensor) -> None:
        if self.rows is None:
            self.rows = x_ND.new_empty(self.capacity, self.d)
        x_ND = x_ND[-self.capacity:]
        n = x_ND.shape[0]
        first = min(n, self.capacity - self.pos)
        self.rows[self.pos:self.pos + first] = x_ND[:first]
        self.rows[:n - first] = x_ND[first:]
        self.pos = (self.pos + n) % self.capacity
        self.n = min(self.capacity, self.n + n)

    def sample(self, n: int) -> Tensor:
        if self.n == 0:
            raise ValueError("the buffer holds no rows yet")
        idx = torch.randint(0, self.n, (n,), generator=self.rng)
        return self.rows[idx.to(self.rows.device)]

    def state_dict(self) -> dict:
        rows = None if self.rows is None else self.rows[:self.n].clone()
        return {"rows": rows, "n": self.n, "pos": self.pos, "capacity": self.capacity,
                "rng": self.rng.get_state()}

    def load_state_dict(self, state: dict) -> None:
        if state["capacity"] != self.capacity:
            raise ValueError(f"checkpoint buffer holds {state['capacity']} rows, expected "
                             f"{self.capacity}")
        self.n, self.pos = state["n"], state["pos"]
        self.rows = None
        if state["rows"] is not None:
            self.rows = state["rows"].new_empty(self.capacity, self.d)
            self.rows[:self.n] = state["rows"]
        self.rng.set_state(state["rng"])


class TopKTrainer:
    """Training state of one TopK SAE: weights, Adam, input scale, dead-latent counters, and
    (when ``buffer_rows`` > 0) a shuffle buffer of training rows.

    ``rows`` turns a site's hidden states into training rows: position 0 is dropped, and so are
    tokens whose norm exceeds ``outlier_factor`` times the median norm (measured on the first
    batch). One scale, chosen on the first batch so that ``E||x||^2 = d``, maps rows to the
    training space; the first batch also sets ``b_dec`` to the mean of the scaled rows.
    ``prepare`` returns the scaled rows of a batch; ``add`` puts the raw rows into the buffer
    and ``sample(n)`` draws a scaled minibatch from it.
    A latent is dead when it has not fired for ``dead_tokens`` training rows.
    Parameters live on ``device``; they are initialised on the CPU from ``seed``, so a run
    starts from the same weights on every device.
    """

    def __init__(self, d: int, width: int, k: int, *, k_aux: int = 64, aux_coef: float = 1 / 32,
                 dead_tokens: int = 20_000, outlier_factor: float = 10.0, seed: int = 0,
                 matmul_dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
                 buffer_rows: int = 0, kernels: str = "auto"):
        if not 0 < k <= width:
            raise ValueError(f"need 0 < k <= width, got k={k}, width={width}")
        self.compiled = compiled.use_compiled(kernels, device)
        self.d, self.width, self.k, self.k_aux, self.aux_coef = d, width, k, k_aux, aux_coef
        self.dead_tokens, self.outlier_factor = dead_tokens, outlier_factor
        self.matmul_dtype, self.seed = matmul_dtype, seed
        self.device = torch.device(device)
        init = init_params(d, width, torch.Generator().manual_seed(seed))
        self.params = TopKParams(*[t.to(self.device).requires_grad_(True) for t in init])
        self.opt = torch.optim.Adam(self.params, lr=1e-3, fused=True)
        self.scale: float | None = None
        self.max_norm: float | None = None
        self.since_fired_F = torch.zeros(width, dtype=torch.long, device=self.device)
        self.buffer = RowBuffer(buffer_rows, d, seed=seed + 1) if buffer_rows > 0 else None
        self._grad_bufs: tuple[Tensor, Tensor] | None = None  # reused gradient storage
        self._W_low: Tensor | None = None  # the compiled path's bf16 copy of the encoder
        self._W_low_version = -1
        self.tokens = 0  # rows trained on, counted once per use
        self.steps = 0

    @torch.no_grad()
    def rows(self, h_BTD: Tensor) -> Tensor:
        """Raw training rows of a batch (module docstring); fixes scale and ``b_dec`` on the
        first call."""
        h_BTD = h_BTD.to(self.device)
        if self.max_norm is None:
            self.max_norm = norm_limit(h_BTD, self.outlier_factor)
        x = h_BTD[usable_tokens(h_BTD, self.max_norm)]  # saeflow.tokens: the shared rule
        if self.scale is None:
            if x.shape[0] == 0:
                raise ValueError("the first batch has no usable tokens to set the input scale")
            xf = x.float()
            self.scale = float((self.d / xf.pow(2).sum(-1).mean().clamp_min(1e-12)) ** 0.5)
            self.params.b_dec_D.copy_((xf * self.scale).mean(0))
        return x

    def prepare(self, h_BTD: Tensor) -> Tensor:
        return self.rows(h_BTD).float() * self.scale

    def add(self, h_BTD: Tensor) -> int:
        """Put a batch's training rows into the buffer; returns how many were kept."""
        if self.buffer is None:
            raise ValueError("this trainer has no buffer (buffer_rows=0)")
        x = self.rows(h_BTD)
        self.buffer.add(x)
        return x.shape[0]

    def sample(self, n: int) -> Tensor:
        return self.buffer.sample(n).float() * self.scale

    def dead_mask(self) -> Tensor:
        return self.since_fired_F >= self.dead_tokens

    @torch.no_grad()
    def step(self, x_ND: Tensor, lr: float) -> StepOut:
        if self.compiled:
            return self._compiled_step(x_ND, lr)
        p = self.params
        W_low = p.W_enc_FD.to(self.matmul_dtype) if self.matmul_dtype != torch.float32 else None
        if self._grad_bufs is None:
            self._grad_bufs = (torch.empty_like(p.W_enc_FD), torch.empty_like(p.W_dec_FD))
        out, grads = topk_step(x_ND, p, self.k, self.dead_mask(), self.k_aux, self.aux_coef,
                               self.matmul_dtype, W_low, self._grad_bufs)
        project_decoder_grad(p.W_dec_FD, grads.W_dec_FD)
        self._adam(lr, grads)
        return self._count(x_ND, out)

    def _compiled_step(self, x_ND: Tensor, lr: float) -> StepOut:
        """``step`` on ``saeflow.kernels``: the Adam step, the decoder's renormalisation and the
        encoder's bf16 copy for the next step are fused into the backward (the copy is rebuilt
        whenever the encoder was changed from outside, e.g. by loading a checkpoint)."""
        p = self.params
        low = self.matmul_dtype == torch.bfloat16
        if low and (self._W_low is None or self._W_low_version != p.W_enc_FD._version):
            self._W_low = p.W_enc_FD.detach().to(torch.bfloat16)
        W = self._W_low if low else p.W_enc_FD
        pre = encode_pre(x_ND - p.b_dec_D, W, p.b_enc_F, self.matmul_dtype)
        loss, aux, idx, acts = compiled.train_step(
            x_ND, p, pre, self.k, self.dead_mask(), self.k_aux, self.aux_coef, opt=self.opt,
            lr=lr, W_low=self._W_low if low else None, since_F=self.since_fired_F)
        self._W_low_version = p.W_enc_FD._version
        return self._count(x_ND, StepOut(loss, aux, idx, acts), fired_counted=True)

    def _adam(self, lr: float, grads) -> None:
        p = self.params
        for t, g in zip(p, grads):
            t.grad = g
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()
        for t in p:
            t.grad = None
        normalize_rows_(p.W_dec_FD)

    def _count(self, x_ND: Tensor, out: StepOut, fired_counted: bool = False) -> StepOut:
        if not fired_counted:  # the compiled step counts in its pass over the latents
            self.since_fired_F += x_ND.shape[0]
            self.since_fired_F.index_fill_(0, out.idx_BK[out.acts_BK > 0], 0)
        self.tokens += x_ND.shape[0]
        self.steps += 1
        return out

    def state_dict(self) -> dict:
        return {"params": [t.detach().clone() for t in self.params], "opt": self.opt.state_dict(),
                "scale": self.scale, "max_norm": self.max_norm,
                "since_fired": self.since_fired_F.clone(), "tokens": self.tokens,
                "steps": self.steps,
                "buffer": None if self.buffer is None else self.buffer.state_dict()}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        for t, v in zip(self.params, state["params"]):
            if t.shape != v.shape:
                raise ValueError(f"checkpoint tensor has shape {tuple(v.shape)}, expected "
                                 f"{tuple(t.shape)}")
            t.copy_(v)
        self.opt.load_state_dict(state["opt"])
        self.scale, self.max_norm = state["scale"], state["max_norm"]
        self.since_fired_F = state["since_fired"].clone().to(self.device)
        self.tokens, self.steps = state["tokens"], state["steps"]
        if (state.get("buffer") is None) != (self.buffer is None):
            raise ValueError("checkpoint and trainer disagree on whether a row buffer is used")
        if self.buffer is not None:
            self.buffer.load_state_dict(state["buffer"])

    def sae(self, site=None, metadata: dict | None = None):
        """The trained SAE on raw activations: weights of the scaled space plus
        ``input_scale``/``output_scale`` (``save_saelens`` folds them into the files)."""
        from saeflow.sae import SAE
        p = self.params
        scale = 1.0 if self.scale is None else self.scale
        return SAE(W_enc=p.W_enc_FD.detach().T.contiguous().cpu(),
                   b_enc=p.b_enc_F.detach().clone().cpu(),
                   W_dec=p.W_dec_FD.detach().clone().cpu(), b_dec=p.b_dec_D.detach().clone().cpu(),
                   activation="topk", k=self.k, site=site, apply_b_dec_to_input=True,
                   input_scale=scale, output_scale=1.0 / scale, metadata=dict(metadata or {}))


def tune_malloc() -> bool:
    """Make glibc keep freed blocks of up to 32 MiB in the heap instead of returning them to
    the system (its default for blocks over 128 KiB-32 MiB is mmap/munmap per allocation, so
    every weight-sized temporary of a training step costs fresh page faults: measured ~30% of
    a width-2304 step). Process-wide; returns False where it does not apply (not glibc)."""
    import ctypes
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and \
        bool(libc.mallopt(m_trim_threshold, 1 << 30))
