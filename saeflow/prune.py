"""Layer pruning by SAE matching: the hidden-state approximation of "Mechanistic Permutability"
(Balagansky et al., ICLR 2025, sec. 4.4, eq. 5), with its baselines and the top-1 cosine
mapping of "Analyze Feature Flow" (appendix F).

For a pruned layer u (its block replaced) and t = u - 1, the estimate of h_u from h_t is
  permutation     decode_u(P(t->u) encode_t(h_t))  (codes of feature i of t go to P[i] of u)
  cosine          decode_u(M encode_t(h_t)), M sends each feature of t to its top-1 decoder
                  cosine match in u (many-to-one: codes of several features add up)
  reconstruction  decode_t(encode_t(h_t))          (the SAE-t reconstruction, no permutation)
  skip            h_t                              (the block is skipped)
Metrics, on held-out text: explained variance 1 - sum |h_u - est|^2 / sum |h_u - mean h_u|^2
over the evaluated tokens, and delta L: the mean next-token loss (nats) when the model's h_u is
replaced by the estimate at those tokens, minus the clean loss, over the same predictions. Only
the blocks after u are re-run (``Tail``: each block called directly, then the final norm and
the unembedding), from the clean states of one recorded pass; each layer first checks that
the re-run from the clean h_u reproduces the model's own losses.

Choices where the paper is silent or differs:
  - text: packed sequences of the bundled corpus' held-out split (or the user's own), not the
    paper's 100 x 1,024 tokens of OpenWebText/code/WikiText; sizes are settings;
  - evaluated tokens: position 0 (the paper excludes BOS) and tokens whose norm at any recorded
    layer exceeds ``outlier_factor`` x the batch median (SmolLM2's attention-sink tokens; the
    SAEs are not trained on them) are left untouched and not scored (``tokens.usable_tokens``);
  - codes move in the parametrisation the matching used: folded SAEs when ``fold`` is on (so a
    feature's code is rescaled by theta_u / theta_t), as stored otherwise; TopK SAEs are the same
    either way. SAEs that standardise their input (``layer_norm``) are un-standardised with h_t's
    statistics, as their own reconstruction is;
  - the permutation is the stored one (``saeflow.permutation``), the cosine match is
    ``match.cosine_topk`` on unit decoder rows.
Results are saved after every layer (``prune.json``) and a re-run with the same settings
resumes; ``prune.csv`` and ``prune.png`` (two panels, like the paper's figs. 10/11) follow.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from saeflow.configs import PRUNE_METHODS as METHODS
from saeflow.configs import HeldoutConfig  # noqa: F401  (defined there without torch)
from saeflow.io import atomic_path, save_figure, write_json_atomic
from saeflow.hooks import recording
from saeflow.sae import SAE
from saeflow.sites import Site
from saeflow.tokens import OUTLIER_FACTOR, usable_tokens

Estimator = Callable[[Tensor], Tensor]  # h_t [n, d] -> estimate of h_u [n, d]


class HeldoutStates(NamedTuple):
    """Residual states of the evaluated tokens, from one clean pass per batch."""
    ids: list[Tensor]  # token batches [B, T]
    keep: list[Tensor]  # [B, T] bool: evaluated tokens
    states: dict[int, Tensor]  # layer -> [N, d] float32, the kept tokens in batch order
    clean_nll: list[Tensor]  # per batch [B, T-1]: loss of the prediction made at each position
    context: Tensor  # [N, 2] int64: (sequence, position) of each kept token
    full: dict[int, list[Tensor]]  # layer -> per batch [B, T, d] (model dtype), when asked for


class PruneRow(NamedTuple):
    layer: int  # the pruned layer u (block u replaced; h_u estimated from h_{u-1})
    method: str
    explained_variance: float
    delta_loss: float  # nats per prediction; nan when losses were not computed
    tokens: int


def text_batches(tokenizer, cfg: HeldoutConfig) -> list[Tensor]:
    """The first ``n_seqs`` packed sequences of the held-out text, in batches."""
    from saeflow.corpus import token_batches
    out, n = [], 0
    for b in token_batches(tokenizer, cfg.seq_len, cfg.batch_size, source=cfg.source,
                           split=cfg.split, seed=cfg.seed):
        out.append(b[: cfg.n_seqs - n])
        n += len(out[-1])
        if n >= cfg.n_seqs:
            break
    return out


def _nll(logits: Tensor, ids: Tensor) -> Tensor:
    """[B, T-1] loss of the prediction at each position 0..T-2."""
    lg = logits[:, :-1].float()
    return F.cross_entropy(lg.reshape(-1, lg.shape[-1]), ids[:, 1:].reshape(-1).to(lg.device),
                           reduction="none").view(ids.shape[0], -1).cpu()


@torch.no_grad()
def collect_states(lm, layers: Sequence[int], batches: Sequence[Tensor],
                   outlier_factor: float = OUTLIER_FACTOR, full: Sequence[int] = (),
                   progress: bool = True) -> HeldoutStates:
    """One clean forward pass per batch: the residual states at ``layers`` of the kept tokens,
    the whole states [B, T, d] of the ``full`` layers (for ``delta_loss``) and the clean
    per-position losses."""
    from tqdm.auto import tqdm

    sites = [Site(L, "res") for L in sorted(set(layers) | set(full))]
    keeps, nlls, ctx, parts = [], [], [], {s.layer: [] for s in sites}
    whole: dict[int, list[Tensor]] = {L: [] for L in full}
    row0 = 0
    for ids in tqdm(batches, desc="held-out states", unit="batch", disable=not progress):
        with recording(lm, sites) as rec:
            logits = lm.model(input_ids=ids.to(lm.device), use_cache=False).logits
        keep = torch.ones(ids.shape, dtype=torch.bool)
        for s in sites:
            keep &= usable_tokens(rec[s], factor=outlier_factor).cpu()
        for s in sites:
            parts[s.layer].append(rec[s].cpu()[keep].float())
            if s.layer in whole:
                whole[s.layer].append(rec[s].cpu())
        b, p = keep.nonzero(as_tuple=True)
        ctx.append(torch.stack([b + row0, p], 1))
        row0 += len(ids)
        keeps.append(keep)
        nlls.append(_nll(logits, ids))
    if not sum(int(k.sum()) for k in keeps):
        raise ValueError("held-out text: no token was left to evaluate after excluding position "
                         "0 and outlier norms")
    return HeldoutStates(list(batches), keeps, {L: torch.cat(v) for L, v in parts.items()},
                         nlls, torch.cat(ctx), whole)


# ---- estimators -----------------------------------------------------------------------------
def _decode_like(sae_u: SAE, z: Tensor, x: Tensor, sae_t: SAE) -> Tensor:
    out = sae_u.decode(z)
    if sae_u.input_norm == "layer_norm":
        _, mu, std = sae_t._standardise(x.to(sae_t.W_enc.dtype))
        out = out * std + mu
    return out


def mapped_estimator(sae_t: SAE, sae_u: SAE, target: Tensor) -> Estimator:
    """encode_t -> codes of feature i moved to ``target[i]`` of u (added up when several share
    it) -> decode_u. A permutation is the one-to-one case."""
    target = target.long()

    def est(x: Tensor) -> Tensor:
        z = sae_t.encode(x)
        zu = torch.zeros(*z.shape[:-1], sae_u.d_sae, dtype=z.dtype, device=z.device)
        zu.index_add_(-1, target.to(z.device), z)
        return _decode_like(sae_u, zu, x, sae_t)
    return est


def estimators(sae_t: SAE, sae_u: SAE, perm: Tensor, fold: bool = True,
               methods: Sequence[str] = METHODS) -> dict[str, Estimator]:
    """The estimators of h_u from h_t (module docstring); SAEs are folded when ``fold``."""
    from saeflow.match import cosine_topk

    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"unknown pruning methods {bad}; known: {', '.join(METHODS)}")
    st, su = (sae_t.fold(), sae_u.fold()) if fold else (sae_t, sae_u)
    out: dict[str, Estimator] = {}
    for m in methods:
        if m == "permutation":
            out[m] = mapped_estimator(st, su, perm)
        elif m == "cosine":
            top = cosine_topk(sae_t.unit_decoder(), sae_u.unit_decoder(), k=1, precision="fp32")
            out[m] = mapped_estimator(st, su, top.indices[:, 0])
        elif m == "reconstruction":
            out[m] = sae_t.reconstruct
        else:
            out[m] = lambda x: x
    return out


@torch.no_grad()
def explained_variance(h_t: Tensor, h_u: Tensor, est: Estimator, chunk: int = 4096) -> float:
    """1 - SSE / SST of ``est(h_t)`` against ``h_u`` over the rows."""
    sse = 0.0
    for s in range(0, len(h_t), chunk):
        e = est(h_t[s:s + chunk]).float()
        sse += float(((h_u[s:s + chunk] - e).double() ** 2).sum())
    sst = float(((h_u - h_u.mean(0)).double() ** 2).sum())
    return 1.0 - sse / sst if sst > 0 else math.nan


class Tail:
    """The model after layer u: blocks u+1.. called directly with the extra arguments the model
    itself passes them (rotary embeddings, masks: captured for every block from one one-row
    pass per sequence length, shared through ``captured`` across tails), then the final norm
    and the unembedding (with Gemma 2's final logit soft-capping), from a given h_u [B, T, d]."""

    def __init__(self, lm, u: int, captured: dict | None = None):
        self.lm, self.u = lm, u
        self.captured = {} if captured is None else captured  # T -> {layer: (args, kwargs)}

    def _arguments(self, T: int) -> dict:
        if T not in self.captured:
            got: dict[int, tuple] = {}

            def grab(layer):
                def fn(mod, args, kwargs):
                    got[layer] = (args[1:], dict(kwargs))
                return fn
            handles = [b.register_forward_pre_hook(grab(L), with_kwargs=True)
                       for L, b in enumerate(self.lm.blocks)]
            try:
                self.lm.model(input_ids=torch.zeros(1, T, dtype=torch.long, device=self.lm.device),
                              use_cache=False)
            finally:
                for h in handles:
                    h.remove()
            self.captured[T] = got
        return self.captured[T]

    @torch.no_grad()
    def logits(self, h_BTD: Tensor) -> Tensor:
        h = h_BTD.to(self.lm.device, self.lm.dtype)
        kw = self._arguments(h.shape[1])
        for L in range(self.u + 1, self.lm.n_layers):
            args, kwargs = kw[L]
            out = self.lm.blocks[L](h, *args, **kwargs)
            h = out[0] if isinstance(out, tuple) else out  # transformers 4.x returns tuples
        norm, _ = self.lm.unembed()
        out = self.lm.model.get_output_embeddings()(norm(h))
        cap = getattr(self.lm.config, "final_logit_softcapping", None)
        return torch.tanh(out / cap) * cap if cap else out


def check_tail(lm, data: HeldoutStates, u: int, tail: Tail, tol: float = 1e-3) -> float:
    """Largest difference between the clean losses and the tail re-run from the clean h_u on
    the first batch; raises when it exceeds ``tol`` nats (the re-run would not be exact)."""
    err = float((_nll(tail.logits(data.full[u][0]), data.ids[0])
                 - data.clean_nll[0]).abs().max())
    if err > tol:
        raise RuntimeError(f"re-running {lm.name} from layer {u} does not reproduce its own "
                           f"losses (max difference {err:.3g} nats); delta L cannot be trusted "
                           "here (use --no-loss)")
    return err


def delta_loss(lm, data: HeldoutStates, t: int, u: int, est: Estimator,
               tail: Tail | None = None) -> float:
    """Mean loss change (nats) over the predictions made at kept positions when h_u is replaced
    by ``est(h_t)`` at the kept tokens (other tokens keep their clean h_u); the model is re-run
    from layer u only (``Tail``). Needs the ``full`` states of t and u."""
    if t not in data.full or u not in data.full:
        raise ValueError(f"delta L of layer {u} needs the whole states of layers {t} and {u}: "
                         f"collect_states(..., full=[{t}, {u}])")
    tail = tail or Tail(lm, u)
    diff, n = 0.0, 0
    for b, (ids, keep, clean) in enumerate(zip(data.ids, data.keep, data.clean_nll)):
        h = data.full[u][b].clone()
        h[keep] = est(data.full[t][b][keep].float()).to(h.dtype)
        new = _nll(tail.logits(h), ids)
        scored = keep[:, :-1]
        diff += float((new - clean)[scored].double().sum())
        n += int(scored.sum())
    return diff / max(n, 1)


# ---- the experiment ---------------------------------------------------------------------------
def parse_layers(text: str | None, what: str = "--layers") -> list[int]:
    """``"1-5,10,12"`` -> [1, 2, 3, 4, 5, 10, 12]; empty or None -> []."""
    out: set[int] = set()
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-"))
                if hi < lo:
                    raise ValueError
                out.update(range(lo, hi + 1))
            else:
                out.add(int(part))
        except ValueError:
            raise ValueError(f"{what}: {part!r} is not a layer or a range like 3-7") from None
    return sorted(out)


def prunable_layers(suite, layers: Sequence[int] | None = None) -> list[int]:
    """Layers u with residual SAEs at u - 1 and u (all of them when ``layers`` is empty)."""
    have = {s.layer for s in suite.sites("res")}
    ok = sorted(u for u in have if u - 1 in have)
    if not layers:
        return ok
    bad = [u for u in layers if u not in ok]
    if bad:
        raise ValueError(f"--layers {bad}: pruning layer u needs residual SAEs at u-1 and u; "
                         f"this suite allows {ok[0] if ok else '-'}..{ok[-1] if ok else '-'}")
    return sorted(set(layers))


def run_pruning(lm, suite, store, layers: Sequence[int], data: HeldoutStates,
                methods: Sequence[str] = METHODS, with_loss: bool = True,
                out: str | Path | None = None, settings: dict | None = None,
                progress: bool = True) -> list[PruneRow]:
    """Per pruned layer and method: explained variance and (``with_loss``) delta L. ``store``
    is a ``PermutationStore``. With ``out``, ``out/prune.json`` keeps every layer computed
    under the same ``settings`` (also by earlier runs over other layers), updated after each
    layer; a layer is reused while both its SAEs are unchanged."""
    from tqdm.auto import tqdm

    settings = json.loads(json.dumps({**(settings or {}), "methods": list(methods),
                                      "with_loss": with_loss,
                                      "permutations": store.config.tag}, default=str))
    path = Path(out) / "prune.json" if out else None
    kept: dict[int, dict] = {}  # layer -> {"saes": [...], "rows": [...]}
    if path and path.exists():
        old = json.loads(path.read_text())
        if old.get("settings") == settings:
            kept = {int(k): v for k, v in old.get("layers", {}).items()}
    rows: list[PruneRow] = []
    captured: dict = {}  # block arguments, shared by the tails of every layer
    for u in tqdm(layers, desc="pruning", unit="layer", disable=not progress):
        t = u - 1
        prints = [store.fingerprint(Site(t, "res")), store.fingerprint(Site(u, "res"))]
        if u in kept and kept[u]["saes"] == prints:
            rows += [PruneRow(**r) for r in kept[u]["rows"]]
            continue
        perm = store.get(Site(t, "res"), Site(u, "res")).perm
        ests = estimators(suite[Site(t, "res")].to(dtype=torch.float32),
                          suite[Site(u, "res")].to(dtype=torch.float32), perm,
                          store.config.fold, methods)
        tail = Tail(lm, u, captured) if with_loss else None
        if tail is not None:
            check_tail(lm, data, u, tail)
        new = []
        for m, est in ests.items():
            ev = explained_variance(data.states[t], data.states[u], est)
            dl = delta_loss(lm, data, t, u, est, tail) if with_loss else math.nan
            new.append(PruneRow(u, m, ev, dl, len(data.states[u])))
        rows += new
        kept[u] = {"saes": prints, "rows": [r._asdict() for r in new]}
        if path:
            write_json_atomic(path, {"settings": settings,
                                     "layers": {str(k): kept[k] for k in sorted(kept)}})
    return rows


# ---- reporting ------------------------------------------------------------------------------
def table(rows: Sequence[PruneRow]) -> str:
    """One line per pruned layer: explained variance and delta L of each method."""
    methods = [m for m in METHODS if any(r.method == m for r in rows)]
    by = {(r.layer, r.method): r for r in rows}
    head = "layer " + " ".join(f"{'EV ' + m[:5]:>9}" for m in methods) + "  " + " ".join(
        f"{'dL ' + m[:5]:>9}" for m in methods)
    lines = [head]
    for u in sorted({r.layer for r in rows}):
        ev = " ".join(f"{by[(u, m)].explained_variance:9.3f}" if (u, m) in by else " " * 9
                      for m in methods)
        dl = " ".join(f"{by[(u, m)].delta_loss:9.3f}" if (u, m) in by else " " * 9
                      for m in methods)
        lines.append(f"{u:5d} {ev}  {dl}")
    lines.append("(EV: explained variance of h_u; dL: loss change in nats when block u is "
                 "replaced by the estimate from h_(u-1))")
    return "\n".join(lines)


def write_csv(rows: Sequence[PruneRow], path: str | Path) -> None:
    import csv
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(PruneRow._fields)
        w.writerows(rows)


def plot(rows: Sequence[PruneRow], path: str | Path, title: str = "") -> Path:
    """Explained variance and delta L against the pruned layer, one line per method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"permutation": ("tab:blue", "o"), "cosine": ("tab:orange", "s"),
              "reconstruction": ("tab:green", "^"), "skip": ("tab:gray", "x")}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=120)
    for m in METHODS:
        rs = sorted((r for r in rows if r.method == m), key=lambda r: r.layer)
        if not rs:
            continue
        color, marker = styles[m]
        x = [r.layer for r in rs]
        axes[0].plot(x, [r.explained_variance for r in rs], marker=marker, color=color, label=m)
        if not all(math.isnan(r.delta_loss) for r in rs):
            axes[1].plot(x, [r.delta_loss for r in rs], marker=marker, color=color, label=m)
    axes[0].set_ylabel("explained variance of h_u")
    axes[1].set_ylabel("delta L (nats)")
    axes[1].set_yscale("symlog", linthresh=0.05)
    from matplotlib.ticker import MaxNLocator
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("pruned layer u")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title or "Layer pruning: block u replaced by an estimate from h_(u-1)")
    fig.tight_layout()
    return save_figure(fig, path)
