"""Compiled CPU kernels (numba) for the TopK SAE training step of ``saeflow.topk``.

``topk.topk_step`` in plain torch spends most of a CPU step outside the encoder product: top-k
over the ``[B, F]`` pre-activations (more than the product itself at B = 1024), the decoder
gather and its backward, two COO sparse products for the weight gradients, and the radial
projection of the decoder gradient, each a separate pass over memory with its own dispatch.
Here the same arithmetic runs in two compiled functions:

  ``select``: an exact top-k per row of the bf16 (or fp32) pre-activations, and the same among
      the dead latents for AuxK. Floats are compared as integer order keys (a sign-magnitude
      bit pattern with the magnitude flipped when negative), so bf16 rows are never converted.
      The k-th largest of 16 group maxima bounds the answer from below, which leaves a few
      dozen candidates per row, and a radix selection over their keys gives the exact
      threshold (no sort, no heap: both were measured slower on 2,304 latents);
  ``sparse_step``: the (row, latent) pairs with a positive value are grouped by latent (a
      counting sort); one pass decodes, a second sums each latent's gradient terms in local
      buffers and writes its rows once: ``W_enc``, ``b_enc``, ``W_dec`` with its radial part
      removed, and ``b_dec``, into the trainer's reused buffers.

The loss and its gradients are those of the module docstring of ``saeflow.topk``: the same
formulas, given the same selected latents; only the order of floating-point sums differs
(tests compare both paths with autograd). Latents whose pre-activation is not positive are
skipped: ``relu`` makes their contribution exactly zero. Every loop is single-threaded and
fixed-order, so a step is deterministic (the resume test relies on it), and the kernels release
the GIL, so ``train``'s worker threads run them side by side. Without numba, and on other
devices, ``TopKTrainer`` runs the torch path (``kernels="torch"`` asks for it anywhere).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

try:
    import numba
except ImportError:  # pragma: no cover - exercised where numba is absent
    numba = None


def available() -> bool:
    return numba is not None


def use_compiled(kernels: str, device: str | torch.device) -> bool:
    """Whether a trainer runs these kernels (``kernels``: "auto" = when numba is
    installed and the device is the CPU, "numba" = required, "torch" = never)."""
    cpu = torch.device(device).type == "cpu"
    if kernels == "auto":
        return cpu and available()
    if kernels == "torch":
        return False
    if kernels != "numba":
        raise ValueError(f"kernels must be 'auto', 'numba' or 'torch', got {kernels!r}")
    if not (cpu and available()):
        raise ValueError("kernels='numba' needs numba installed and device='cpu'")
    return True


if numba is not None:
    # numpy's error model: no zero-division checks in float code, so divisions vectorise
    _jit = numba.njit(nogil=True, cache=True, fastmath=True, error_model="numpy")
    _jit_exact = numba.njit(nogil=True, cache=True)  # integer work and exact comparisons

    @numba.njit(nogil=True, cache=True, inline="always")
    def _key(s):
        """A float's int32 bits <-> its order key: the magnitude bits flipped when negative
        (an involution), so keys compare as int32 the way the floats do."""
        return s ^ ((s >> 31) & 0x7FFFFFFF)

    @_jit_exact
    def _kth_largest(keys, n, k, hist, buf):
        """The exact ``k``-th largest of ``keys[:n]`` (int32, ``k <= n``) by radix selection
        on byte digits of the unsigned order, most significant first; after each digit only
        the entries that share the answer's digits so far are kept (in ``buf``)."""
        for i in range(n):
            buf[i] = np.int64(keys[i]) + 2147483648
        m, need, prefix = n, k, np.int64(0)
        for shift in (24, 16, 8, 0):
            hist[:] = 0
            for i in range(m):
                hist[(buf[i] >> shift) & 255] += 1
            below = 0
            digit = 255
            while below + hist[digit] < need:
                below += hist[digit]
                digit -= 1
            need -= below
            prefix |= np.int64(digit) << shift
            kept = 0
            for i in range(m):
                if (buf[i] >> shift) & 255 == digit:
                    buf[kept] = buf[i]
                    kept += 1
            m = kept
        return np.int32(prefix - 2147483648)

    @_jit_exact
    def _row_topk(keys, k, out_keys, out_idx, work):
        """The ``k`` largest of ``keys`` (int32 order keys) into ``out_keys``/``out_idx``.
        Entries are split into 16 strided groups' worth of columns; the ``k``-th largest group
        maximum is a lower bound of the answer's minimum (``k`` different groups hold an entry
        that large), so a vectorised pass finds the maxima, the few entries at or above that
        bound become candidates, and the exact threshold is a radix selection among them."""
        gmax, cand_k, cand_i, hist, buf = work
        n = keys.shape[0]
        ng = (n + 15) // 16
        full = n // ng  # rows of the [16, ng] layout with no hole
        g = gmax[:ng]
        g[:] = keys[:ng]
        for t in range(1, full):
            seg = keys[t * ng:(t + 1) * ng]
            for j in range(ng):  # vectorised: contiguous, no dependence between j
                if seg[j] > g[j]:
                    g[j] = seg[j]
        tail = keys[full * ng:]
        for j in range(tail.shape[0]):
            if tail[j] > g[j]:
                g[j] = tail[j]
        bound = _kth_largest(g, ng, k, hist, buf) if ng >= k else np.int32(-2147483648)
        nc = 0
        for j in range(ng):
            if gmax[j] >= bound:
                for i in range(j, n, ng):
                    if keys[i] >= bound:
                        cand_k[nc], cand_i[nc] = keys[i], i
                        nc += 1
        thr = _kth_largest(cand_k, nc, k, hist, buf)
        m = 0
        for c in range(nc):  # all above the threshold, then ties with it up to k
            if cand_k[c] > thr:
                out_keys[m], out_idx[m] = cand_k[c], cand_i[c]
                m += 1
        for c in range(nc):
            if m < k and cand_k[c] == thr:
                out_keys[m], out_idx[m] = cand_k[c], cand_i[c]
                m += 1

    @_jit_exact
    def _select(pre, widen, k, dead, ka, out_bits, out_idx, aux_bits, aux_idx):
        """Both selections for every row of ``pre`` (int16 bf16 bit patterns when ``widen``,
        else fp32 bit patterns as int32), compared as ``_key``s and returned as float32
        bit patterns."""
        B, F = pre.shape
        keys = np.empty(F, np.int32)
        gath = np.empty(max(dead.shape[0], 1), np.int32)
        top_k, top_i = np.empty(max(k, ka), np.int32), np.empty(max(k, ka), np.int64)
        work = (np.empty(F // 16 + 1, np.int32), np.empty(F, np.int32), np.empty(F, np.int64),
                np.empty(256, np.int64), np.empty(F, np.int64))
        for b in range(B):
            row = pre[b]
            if widen:
                for f in range(F):
                    keys[f] = _key(np.int32(row[f]) << 16)
            else:
                for f in range(F):
                    keys[f] = _key(np.int32(row[f]))
            _row_topk(keys, k, top_k, top_i, work)
            for j in range(k):
                out_bits[b, j], out_idx[b, j] = _key(top_k[j]), top_i[j]
            if ka:
                for t in range(dead.shape[0]):
                    gath[t] = keys[dead[t]]
                _row_topk(gath[:dead.shape[0]], ka, top_k, top_i, work)
                for j in range(ka):
                    aux_bits[b, j], aux_idx[b, j] = _key(top_k[j]), dead[top_i[j]]

    @_jit_exact
    def _buckets(F, idx, vals):
        """The (row, selection) pairs with a positive value, grouped by latent (a stable
        counting sort): ``start[f]:start[f+1]`` indexes ``rows``/``acts`` of latent f."""
        B, K = idx.shape
        start = np.zeros(F + 1, np.int64)
        for b in range(B):
            for j in range(K):
                if vals[b, j] > 0:
                    start[idx[b, j] + 1] += 1
        for f in range(F):
            start[f + 1] += start[f]
        fill = start[:F].copy()
        rows, acts = np.empty(start[F], np.int64), np.empty(start[F], np.float32)
        for b in range(B):
            for j in range(K):
                if vals[b, j] > 0:
                    q = fill[idx[b, j]]
                    rows[q], acts[q] = b, vals[b, j]
                    fill[idx[b, j]] = q + 1
        return start, rows, acts

    @_jit
    def _decode(W_dec, start, rows, acts, out):
        """``out[b] += a * W_dec[f]`` for every pair (b, a) of latent f."""
        D = W_dec.shape[1]
        for f in range(W_dec.shape[0]):
            w = W_dec[f]
            for q in range(start[f], start[f + 1]):
                o = out[rows[q]]
                a = acts[q]
                for d in range(D):
                    o[d] += a * w[d]

    @_jit
    def _accumulate(w, start, stop, rows, acts, g_rows, xc, acc_dec, acc_enc):
        """One latent's sums over its pairs: ``acc_dec += a g[b]``, ``acc_enc += c xc[b]`` with
        ``c = w . g[b]``; returns the sum of ``c`` (the ``b_enc`` gradient)."""
        D = w.shape[0]
        gb = np.float32(0.0)
        for q in range(start, stop):
            g = g_rows[rows[q]]
            xr = xc[rows[q]]
            a = acts[q]
            c = np.float32(0.0)
            for d in range(D):  # one pass over g: the decoder backward and the decoder sum
                c += w[d] * g[d]
                acc_dec[d] += a * g[d]
            for d in range(D):
                acc_enc[d] += c * xr[d]
            gb += c
        return gb

    @_jit
    def _sum_sq(v):
        tot = 0.0
        for b in range(v.shape[0]):
            for d in range(v.shape[1]):
                tot += v[b, d] * v[b, d]
        return tot

    @_jit
    def _centred_power(v):
        """``mean_b ||v[b] - mean(v)||^2``, the normaliser of the loss."""
        B, D = v.shape
        mu = np.zeros(D, np.float64)
        for b in range(B):
            for d in range(D):
                mu[d] += v[b, d]
        tot = 0.0
        for b in range(B):
            for d in range(D):
                c = v[b, d] - mu[d] / B
                tot += c * c
        return max(tot / B, 1e-12)

    @_jit
    def _adam(p, g, m, v, hyper):
        """torch's Adam on one row, in place; ``hyper = (lr_t, b1, b2, eps_t)`` with the bias
        corrections folded in (``adam_hyper``)."""
        lr_t, b1, b2, eps_t = hyper[0], hyper[1], hyper[2], hyper[3]
        c1, c2 = np.float32(1) - b1, np.float32(1) - b2
        for d in range(p.shape[0]):
            mi = b1 * m[d] + c1 * g[d]
            vi = b2 * v[d] + c2 * g[d] * g[d]
            m[d], v[d] = mi, vi
            p[d] -= lr_t * mi / (np.sqrt(vi) + eps_t)

    @_jit
    def _renorm(w):
        """Scale a row to unit norm (``topk.normalize_rows_``)."""
        ss = np.float32(0.0)
        for d in range(w.shape[0]):
            ss += w[d] * w[d]
        inv = np.float32(1) / max(np.sqrt(ss), np.float32(1e-8))
        for d in range(w.shape[0]):
            w[d] *= inv

    @_jit
    def _to_bf16(bits, out):
        """bf16 bits of a row of float32 bits, rounded to nearest even as torch rounds. The
        sum is signed, but its low 16 bits after the shift are those of the unsigned sum, and
        the int16 cast keeps only those."""
        one, half = np.int32(1), np.int32(0x7FFF)
        for d in range(bits.shape[0]):
            u = bits[d]
            out[d] = np.int16((u + half + ((u >> 16) & one)) >> 16)

    @_jit
    def _sparse_step(x, b_dec, W_dec, W_enc, b_enc, idx, vals, a_idx, a_vals, aux_coef,
                     gW_enc, gb_enc, gW_dec, g_b_dec, fuse, state, hyper, lowp, since):
        """Losses and gradients of one batch given its selections (module docstring); returns
        ``(loss, aux)``. ``b_dec`` enters twice (``x_hat`` and ``x - b_dec``), hence its
        ``- gb_enc @ W_enc`` term, summed over the latents that fired.
        Two passes over the latents that fired, each reading its decoder row once: the first
        decodes (``x_hat`` and the AuxK ``e_hat``), the second sums every weight gradient of
        the latent locally, the decoder's with its radial part removed (the rows are unit;
        ``r = g . w``, ``g - r w``), and writes its rows once. With ``fuse`` it does not write
        the weight gradients but takes the Adam step on the latent's rows there and then
        (``state`` = Adam's moments of W_enc, b_enc, W_dec, b_dec; the biases' step after the
        loop), renormalises the decoder row and writes the new encoder row's bf16 bits to
        ``lowp`` (when it has rows): one pass over every weight-sized array. ``since`` (when
        it has F entries) counts rows since each latent last fired: 0 for a latent with a
        pair, plus B for the others."""
        B, D = x.shape
        F = W_dec.shape[0]
        main = _buckets(F, idx, vals)
        extra = _buckets(F, a_idx, a_vals)
        x_hat = np.zeros_like(x)
        _decode(W_dec, main[0], main[1], main[2], x_hat)
        err = x_hat + b_dec - x
        denom = _centred_power(x)
        loss = _sum_sq(err) / (B * denom)
        g_out = err * np.float32(2.0 / (B * denom))
        for d in range(D):
            g_b_dec[d] = 0
        for b in range(B):
            for d in range(D):
                g_b_dec[d] += g_out[b, d]
        aux = 0.0
        g_aux = g_out  # not read when there is no AuxK pair
        if a_idx.shape[1] > 0:
            e_hat = np.zeros_like(x)
            _decode(W_dec, extra[0], extra[1], extra[2], e_hat)
            e = -err  # x - x_hat, a constant target
            a_err = e_hat - e
            e_denom = _centred_power(e)
            aux = _sum_sq(a_err) / (B * e_denom)
            g_aux = a_err * np.float32(2.0 * aux_coef / (B * e_denom))
        xc = x - b_dec
        acc_dec, acc_enc = np.empty(D, np.float32), np.empty(D, np.float32)
        enc_bits = W_enc.view(np.int32)
        write_low = lowp.shape[0] == F
        count = since.shape[0] == F
        for f in range(F):
            if count:
                since[f] = 0 if main[0][f + 1] > main[0][f] else since[f] + B
            acc_dec[:] = 0
            acc_enc[:] = 0
            w = W_dec[f]
            gb = _accumulate(w, main[0][f], main[0][f + 1], main[1], main[2], g_out, xc,
                             acc_dec, acc_enc)
            gb += _accumulate(w, extra[0][f], extra[0][f + 1], extra[1], extra[2], g_aux, xc,
                              acc_dec, acc_enc)
            r = np.float32(0.0)
            for d in range(D):
                r += acc_dec[d] * w[d]
            gb_enc[f] = gb
            if gb != 0:  # with the encoder row as it was
                for d in range(D):
                    g_b_dec[d] -= gb * W_enc[f, d]
            if not fuse:
                for d in range(D):
                    gW_dec[f, d] = acc_dec[d] - r * w[d]
                    gW_enc[f, d] = acc_enc[d]
                continue
            for d in range(D):
                acc_dec[d] -= r * w[d]
            _adam(W_dec[f], acc_dec, state[4][f], state[5][f], hyper)
            _renorm(w)
            _adam(W_enc[f], acc_enc, state[0][f], state[1][f], hyper)
            if write_low:
                _to_bf16(enc_bits[f], lowp[f])
        if fuse:
            _adam(b_enc, gb_enc, state[2], state[3], hyper)
            _adam(b_dec, g_b_dec, state[6], state[7], hyper)
        return loss, aux


def _np(t: Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.detach().numpy()


def select(pre_BF: Tensor, k: int, dead_idx: Tensor | None = None, k_aux: int = 0
           ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Exact top ``k`` per row of ``pre_BF`` (bf16 or fp32, CPU), and top ``k_aux`` among the
    columns ``dead_idx``: ``(vals_BK, idx_BK, aux_vals, aux_idx)``, values as float32, in no
    particular order. Ties at the k-th value are broken arbitrarily (deterministically)."""
    if numba is None:
        raise RuntimeError("saeflow.kernels needs numba (pip install numba)")
    B, F = pre_BF.shape
    if not 0 < k <= F:
        raise ValueError(f"need 0 < k <= {F}, got k={k}")
    pre_BF = pre_BF.contiguous()
    dead = (torch.empty(0, dtype=torch.long) if dead_idx is None else dead_idx.long()).contiguous()
    ka = min(k_aux, dead.shape[0])
    idx = torch.empty(B, k, dtype=torch.long)
    a_idx = torch.empty(B, ka, dtype=torch.long)
    if pre_BF.dtype not in (torch.bfloat16, torch.float32):
        raise TypeError(f"select takes bf16 or fp32 pre-activations, got {pre_BF.dtype}")
    bits, a_bits = torch.empty(B, k, dtype=torch.int32), torch.empty(B, ka, dtype=torch.int32)
    pre = pre_BF.view(torch.int16 if pre_BF.dtype == torch.bfloat16 else torch.int32).numpy()
    _select(pre, pre_BF.dtype == torch.bfloat16, k, dead.numpy(), ka, bits.numpy(), idx.numpy(),
            a_bits.numpy(), a_idx.numpy())
    vals, a_vals = bits.view(torch.float32), a_bits.view(torch.float32)
    return vals, idx, a_vals, a_idx


_NO_ROWS = np.empty((0, 0), np.float32)


def adam_hyper(opt: torch.optim.Adam, lr: float, params) -> np.ndarray:
    """Advance ``opt``'s step count for ``params`` (creating torch's state the first time, so
    checkpoints are those of ``torch.optim.Adam``) and return ``(lr_t, b1, b2, eps_t)``:
    ``p -= lr_t m / (sqrt(v) + eps_t)`` is torch's ``lr / bc1 * m / (sqrt(v / bc2) + eps)``."""
    (b1, b2), eps = opt.defaults["betas"], opt.defaults["eps"]
    for t in params:
        st = opt.state[t]
        if not st:
            st["step"] = torch.tensor(0.0)
            st["exp_avg"], st["exp_avg_sq"] = torch.zeros_like(t), torch.zeros_like(t)
        st["step"] += 1
    step = float(opt.state[params[0]]["step"])
    bc1, bc2 = 1 - b1 ** step, 1 - b2 ** step
    return np.array([lr * bc2 ** 0.5 / bc1, b1, b2, eps * bc2 ** 0.5], np.float32)


def sparse_step(x_BD: Tensor, p, idx_BK: Tensor, vals_BK: Tensor, a_idx: Tensor, a_vals: Tensor,
                aux_coef: float, grads: tuple[Tensor, Tensor, Tensor, Tensor] | None = None,
                opt: torch.optim.Adam | None = None, lr: float = 0.0,
                W_low: Tensor | None = None, since_F: Tensor | None = None
                ) -> tuple[float, float]:
    """Losses of one batch given its selections; returns ``(loss, aux)``. With ``grads``
    (``TopKParams``-shaped fp32 CPU buffers, overwritten): writes the gradients, the decoder's
    with its radial part removed. With ``opt`` instead: takes the Adam step (learning rate
    ``lr``, state kept in ``opt``), renormalises the decoder rows and, given ``W_low`` (a bf16
    ``[F, D]`` tensor), writes the new encoder's bf16 copy, without forming the weight
    gradients. ``since_F`` (int64, the trainer's rows since each latent fired) is updated in
    the same pass: 0 where a latent has a positive selection, plus B elsewhere."""
    F, D = p.W_enc_FD.shape
    fuse = opt is not None
    if fuse:
        gb_enc, g_b_dec = torch.empty(F), torch.empty(D)
        hyper = adam_hyper(opt, lr, list(p))
        state = tuple(_np(opt.state[t][key]) for t in p for key in ("exp_avg", "exp_avg_sq"))
        gw = (_NO_ROWS, _NO_ROWS)
    elif grads is None:
        raise ValueError("sparse_step needs grads buffers or an optimizer")
    else:
        gW_enc, gb_enc, gW_dec, g_b_dec = grads
        state, hyper = _no_state(), np.zeros(4, np.float32)
        gw = (_np(gW_enc), _np(gW_dec))
    low = _np(W_low) if W_low is not None else np.empty((0, 0), np.int16)
    since = np.empty(0, np.int64)
    if since_F is not None:
        if since_F.dtype != torch.int64 or since_F.shape != (F,) or not since_F.is_contiguous():
            raise ValueError(f"since_F must be a contiguous int64 tensor of {F} counts")
        since = since_F.numpy()
    loss, aux = _sparse_step(_np(x_BD.contiguous()), _np(p.b_dec_D), _np(p.W_dec_FD),
                             _np(p.W_enc_FD), _np(p.b_enc_F), _np(idx_BK), _np(vals_BK),
                             _np(a_idx), _np(a_vals), float(aux_coef), gw[0], _np(gb_enc),
                             gw[1], _np(g_b_dec), fuse, state, hyper, low, since)
    return float(loss), float(aux)


def _no_state():
    """A placeholder for ``_sparse_step``'s Adam state when it only writes gradients."""
    e2, e1 = np.empty((0, 0), np.float32), np.empty(0, np.float32)
    return (e2, e2, e1, e1, e2, e2, e1, e1)  # the types of (W_enc, b_enc, W_dec, b_dec) x (m, v)


def train_step(x_BD: Tensor, p, pre_BF: Tensor, k: int, dead_F: Tensor | None, k_aux: int,
               aux_coef: float, grads: tuple[Tensor, Tensor, Tensor, Tensor] | None = None,
               opt: torch.optim.Adam | None = None, lr: float = 0.0,
               W_low: Tensor | None = None, since_F: Tensor | None = None):
    """``topk.topk_step`` on the compiled path, given the encoder's pre-activations ``pre_BF``
    (``topk.encode_pre``): ``select``, then ``sparse_step`` (gradients into ``grads``, or the
    whole Adam step with ``opt``; ``since_F`` counted there). ``p`` holds the parameters as
    ``topk.TopKParams``; returns ``(loss, aux, idx_BK, acts_BK)``."""
    dead_idx = None
    if dead_F is not None and k_aux > 0 and aux_coef > 0:
        dead_idx = dead_F.nonzero().squeeze(1)
    vals, idx, a_vals, a_idx = select(pre_BF, k, dead_idx, k_aux)
    loss, aux = sparse_step(x_BD, p, idx, vals, a_idx, a_vals, aux_coef, grads, opt, lr, W_low,
                            since_F)
    return loss, aux, idx, vals.clamp_min(0)
