"""SAE quality on held-out text: FVU, L0, dead fraction and LM loss recovered, per site.

Metrics (the usual SAE evaluation, e.g. Gao et al. 2024 sec. 4; SAELens' evals):
  - FVU: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over the evaluated tokens;
  - L0: mean number of active latents per token;
  - dead fraction: latents that never activate on the evaluated tokens (so it depends on how
    many tokens are evaluated: a latent firing once per 10k tokens looks dead on 8k);
  - loss recovered: (L_ablated - L_sae) / (L_ablated - L_clean), where L_sae is the LM's
    next-token loss when the SAE's reconstruction replaces the site's hidden state, and
    L_ablated the loss when the hidden state is ablated: zeros for mlp and att sites (removing
    the block's contribution), and for res sites the mean residual vector over the evaluated
    tokens by default (zeroing the whole residual stream is degenerate: every later block then
    sees the same empty input, so L_zero is far above any meaningful baseline and every SAE
    scores close to 1). ``res_ablation="zero"`` gives the zero version; the row says which.
Choices: position 0 is excluded everywhere (not evaluated, not patched, not scored as a
prediction), and so are tokens whose norm exceeds ``outlier_factor`` times the median norm of
their batch at that site (SmolLM2's first token and document separators reach ~100 times the
typical norm; the SAEs are not trained on them). Forward passes run concurrently in
``workers`` threads with one intra-op thread each (``SiteTaps`` keeps their hooks apart).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import Tensor

from saeflow.io import write_bytes
from saeflow.hooks import SiteTaps
from saeflow.sae import SAE
from saeflow.sites import Site
from saeflow.tokens import usable_tokens

_BLOCK_ORDER = {"att_z": 0, "att": 1, "mlp": 2, "res": 3}


def keep_mask(h_BTD: Tensor, outlier_factor: float) -> Tensor:
    """Tokens to evaluate: the shared rule of ``saeflow.tokens`` (position >= 1, norm <= factor
    x the batch's median norm)."""
    return usable_tokens(h_BTD, factor=outlier_factor)


@dataclass(frozen=True)
class QualityRow:
    site: str
    kind: str
    layer: int
    fvu: float
    l0: float
    dead_frac: float
    loss_clean: float
    loss_sae: float
    loss_ablated: float
    loss_recovered: float
    ablation: str  # "zero" or "mean"
    tokens: int  # tokens behind FVU, L0 and dead fraction
    loss_tokens: int  # predictions behind the losses


def _workers_pool(workers: int):
    torch.set_num_threads(1)  # each worker thread runs its own ops on one core
    return ThreadPoolExecutor(max_workers=max(1, workers))


def evaluate(lm, saes: Mapping, source: str = "default", tokens: int = 8192,
             loss_tokens: int = 2048, seq_len: int = 256, res_ablation: str = "mean",
             outlier_factor: float = 10.0, workers: int = 2,
             progress: bool = True) -> list[QualityRow]:
    """Quality of every SAE in ``saes`` (a ``{site: SAE}`` mapping or a Suite) on the
    held-out split of ``source``."""
    from tqdm.auto import tqdm

    from saeflow.corpus import token_batches
    if res_ablation not in ("zero", "mean"):
        raise ValueError(f"res_ablation must be 'zero' or 'mean', got {res_ablation!r}")
    sites = [Site.parse(s) for s in (saes.sites() if hasattr(saes, "sites") else saes)]
    sae_of: dict[Site, SAE] = {s: saes[s].to(dtype=torch.float32) for s in sites}
    need = max(tokens, loss_tokens)
    batches = []
    for b in token_batches(lm.tokenizer, seq_len, 2, source, "heldout", seed=0):
        batches.append(b)
        if len(batches) * 2 * seq_len >= need:
            break
    if not batches:
        raise ValueError(f"text source {source!r} has no held-out batch of 2 x {seq_len} tokens")
    stat_batches = batches[: max(1, math.ceil(tokens / (2 * seq_len)))]
    loss_batches = batches[: max(1, math.ceil(loss_tokens / (2 * seq_len)))]
    taps = SiteTaps(lm, sites)
    prev_threads = torch.get_num_threads()
    acc = {s: {"err": 0.0, "sx": 0.0, "sxx": 0.0, "n": 0, "l0": 0.0,
               "fired": torch.zeros(sae_of[s].d_sae, dtype=torch.bool),
               "sum": torch.zeros(sae_of[s].d_in, dtype=torch.float64)} for s in sites}

    def stats_job(ids):
        with torch.no_grad():
            hs = taps.record(ids)
            part = {}
            for s in sites:
                h = hs[s]
                x = h[keep_mask(h, outlier_factor)].float()
                sae = sae_of[s]
                z = sae.encode(x)
                x_hat = sae.decode(z)
                part[s] = (float((x_hat - x).pow(2).sum()), x.double().sum(0),
                           float(x.double().pow(2).sum()), x.shape[0], float((z > 0).sum()),
                           (z > 0).any(0))
            return part

    try:
        with taps.installed(), _workers_pool(workers) as pool:
            bar = tqdm(total=len(stat_batches) + len(loss_batches) * (1 + 2 * len(sites)),
                       desc="quality", unit="pass", disable=not progress)
            for part in pool.map(stats_job, stat_batches):
                for s, (err, sx, sxx, n, l0, fired) in part.items():
                    a = acc[s]
                    a["err"] += err
                    a["sum"] += sx
                    a["sxx"] += sxx
                    a["n"] += n
                    a["l0"] += l0
                    a["fired"] |= fired
                bar.update()
            means = {s: (acc[s]["sum"] / max(acc[s]["n"], 1)).float() for s in sites}

            def patch_fn(s: Site, mode: str):
                sae, mean = sae_of[s], means[s]

                def fn(h):
                    keep = keep_mask(h, outlier_factor)
                    out = h.clone()
                    if mode == "sae":
                        out[keep] = sae.reconstruct(h[keep].float()).to(h.dtype)
                    elif mode == "mean":
                        out[keep] = mean.to(h.dtype)
                    else:
                        out[keep] = 0
                    return out
                return fn

            sums: dict[tuple, list[float]] = {}

            def add(key, got):
                t = sums.setdefault(key, [0.0, 0])
                t[0] += got[0]
                t[1] += got[1]
                bar.update()

            # the clean passes keep each block's input, so a patched pass reruns only the
            # blocks from its site's layer on (SiteTaps.loss_from: the same loss)
            def clean_job(ids):
                inputs: list = []
                return taps.loss(ids, block_inputs=inputs), inputs

            block_inputs = []
            for got, inputs in pool.map(clean_job, loss_batches):
                add((None, "clean"), got)
                block_inputs.append(inputs)
            jobs = []
            for s in sites:
                abl = res_ablation if s.kind == "res" else "zero"
                jobs += [(s, mode, b) for mode in ("sae", abl) for b in range(len(loss_batches))]

            def loss_job(job):
                s, mode, b = job
                got = taps.loss_from(s.layer, block_inputs[b], loss_batches[b],
                                     {s: patch_fn(s, mode)})
                return (s, "abl" if mode in ("zero", "mean") else mode), got

            for key, got in pool.map(loss_job, jobs):
                add(key, got)
            block_inputs.clear()
            bar.close()
    finally:
        torch.set_num_threads(prev_threads)

    clean, n_pred = sums[(None, "clean")][0] / sums[(None, "clean")][1], sums[(None, "clean")][1]
    rows = []
    for s in sites:
        a = acc[s]
        n = max(a["n"], 1)
        var = a["sxx"] - float(a["sum"].pow(2).sum()) / n
        l_sae = sums[(s, "sae")][0] / sums[(s, "sae")][1]
        l_abl = sums[(s, "abl")][0] / sums[(s, "abl")][1]
        denom = l_abl - clean
        rows.append(QualityRow(
            site=str(s), kind=s.kind, layer=s.layer, fvu=a["err"] / var if var > 0 else math.nan,
            l0=a["l0"] / n, dead_frac=float((~a["fired"]).float().mean()), loss_clean=clean,
            loss_sae=l_sae, loss_ablated=l_abl,
            loss_recovered=(l_abl - l_sae) / denom if abs(denom) > 1e-9 else math.nan,
            ablation=res_ablation if s.kind == "res" else "zero", tokens=a["n"],
            loss_tokens=n_pred))
    return rows


# ---- reporting -------------------------------------------------------------------------
COLUMNS = [f.name for f in fields(QualityRow)]
MIN_ABLATION_DELTA = 0.05  # nats; below it loss recovered is not summarised


def _median(values: list[float]) -> float:
    v = sorted(x for x in values if not math.isnan(x))
    if not v:
        return math.nan
    m = len(v) // 2
    return v[m] if len(v) % 2 else (v[m - 1] + v[m]) / 2


def summarize(rows: list[QualityRow]) -> dict[str, dict[str, float]]:
    """Medians per kind: ``{kind: {"fvu", "l0", "dead_frac", "loss_recovered",
    "loss_recovered_sized", "n", "n_sized"}}``. ``loss_recovered_sized`` is the median over the
    sites whose ablation raises the loss by at least ``MIN_ABLATION_DELTA`` nats (``n_sized``
    of them): elsewhere the ratio divides by almost nothing and is noise."""
    out = {}
    for kind in sorted({r.kind for r in rows}, key=lambda k: _BLOCK_ORDER.get(k, 9)):
        rs = [r for r in rows if r.kind == kind]
        sized = [r for r in rs if r.loss_ablated - r.loss_clean >= MIN_ABLATION_DELTA]
        out[kind] = {m: _median([getattr(r, m) for r in rs])
                     for m in ("fvu", "l0", "dead_frac", "loss_recovered")}
        out[kind]["loss_recovered_sized"] = _median([r.loss_recovered for r in sized])
        out[kind]["n"] = len(rs)
        out[kind]["n_sized"] = len(sized)
    return out


def format_table(rows: list[QualityRow]) -> str:
    """Per-site table plus the medians per kind."""
    head = (f"{'site':>8} {'FVU':>7} {'L0':>6} {'dead':>6} {'loss rec':>8} {'ablation':>8} "
            f"{'dL abl':>7}")
    lines = [head]
    for r in sorted(rows, key=lambda r: (r.layer, _BLOCK_ORDER.get(r.kind, 9))):
        d_abl = r.loss_ablated - r.loss_clean
        lines.append(f"{r.site:>8} {r.fvu:7.3f} {r.l0:6.1f} {r.dead_frac:6.3f} "
                     f"{r.loss_recovered:8.3f} {r.ablation:>8} {d_abl:7.3f}")
    lines.append("(dL abl: loss increase under the ablation; loss rec is noise where it is tiny)")
    lines.append("")
    lines.append(f"{'kind':>8} {'n':>4} {'med FVU':>8} {'med L0':>7} {'med dead':>8} "
                 f"{'med loss rec':>12} {f'(dL abl >= {MIN_ABLATION_DELTA})':>22}")
    for kind, m in summarize(rows).items():
        lines.append(f"{kind:>8} {m['n']:4d} {m['fvu']:8.3f} {m['l0']:7.1f} {m['dead_frac']:8.3f} "
                     f"{m['loss_recovered']:12.3f} {m['loss_recovered_sized']:10.3f} "
                     f"of {m['n_sized']:2d} sites")
    return "\n".join(lines)


def rows_to_json(rows: list[QualityRow]) -> list[dict]:
    return [asdict(r) for r in rows]


def rows_from_json(data: list[dict]) -> list[QualityRow]:
    return [QualityRow(**{c: d[c] for c in COLUMNS}) for d in data]


def write_csv(rows: list[QualityRow], path: Path) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS)
    w.writeheader()
    w.writerows(rows_to_json(rows))
    write_bytes(path, buf.getvalue().encode())


def plot(rows: list[QualityRow], path: Path, title: str = "") -> None:
    """Four panels (FVU, L0, dead fraction, loss recovered) against layer, one line per kind."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    metrics = [("fvu", "FVU"), ("l0", "L0"), ("dead_frac", "dead fraction"),
               ("loss_recovered", "loss recovered")]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    lo, hi = -0.2, 1.2  # loss recovered is clipped to this range (tiny denominators explode)
    for ax, (m, label) in zip(axes, metrics):
        for kind in sorted({r.kind for r in rows}, key=lambda k: _BLOCK_ORDER.get(k, 9)):
            rs = sorted((r for r in rows if r.kind == kind), key=lambda r: r.layer)
            ax.plot([r.layer for r in rs], [getattr(r, m) for r in rs], marker=".", label=kind)
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if m in ("l0", "dead_frac"):
            ax.set_ylim(bottom=0)
        if m == "loss_recovered":
            off = sum(1 for r in rows if not lo <= r.loss_recovered <= hi)
            ax.set_ylim(lo, hi)
            if off:
                ax.set_title(f"{label} ({off} off scale)")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_bytes(path, buf.getvalue())


def write_reports(rows: list[QualityRow], folder: Path, title: str = "") -> None:
    """``quality.csv`` and ``quality.png`` in ``folder``."""
    folder = Path(folder)
    write_csv(rows, folder / "quality.csv")
    plot(rows, folder / "quality.png", title)
