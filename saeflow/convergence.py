"""Has a trained suite converged? Diagnostics beside the quality table.

Feature flow matches decoder rows of independently trained SAEs across layers, so what it finds
is only as good as the dictionaries: rows that never left their random initialisation match
nothing. Three checks, all from weights (no data):
  - **movement**: median cosine of each SAE's encoder and decoder rows with their own random
    initialisation (``init_params`` of the seed stored in the file's training metadata); near
    1 means the dictionary has barely moved;
  - **cross-seed stability**: the same site trained twice with different seeds on the same
    tokens; the share of features whose best match in the other seed has cosine >= 0.7
    (a converged dictionary is reproducible; Paulo & Belrose 2025 report ~30-70% shared for
    SAEs trained on far more data);
  - **adjacent-layer matching**: per layer L, the top-1 decoder cosine of every ``L/res`` feature
    against ``L-1/res`` (median, share >= 0.5 and >= 0.7): the score feature flow thresholds.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from saeflow.match import cosine_topk
from saeflow.sae import SAE
from saeflow.topk import init_params


def _unit(W: Tensor) -> Tensor:
    return torch.nn.functional.normalize(W.float(), dim=-1)


def init_cosines(sae: SAE) -> tuple[float, float] | None:
    """Median cosine of (encoder rows, decoder rows) with their initialisation, or None when
    the file does not record the seed saeflow initialised it from."""
    seed = (sae.metadata.get("saeflow_training") or {}).get("init_seed")
    if seed is None:
        return None
    init = init_params(sae.d_in, sae.d_sae, torch.Generator().manual_seed(int(seed))).W_dec_FD
    enc = (_unit(sae.W_enc.T) * init).sum(-1)
    dec = (_unit(sae.W_dec) * init).sum(-1)
    return float(enc.median()), float(dec.median())


def top1_cosines(a_FD: Tensor, b_FD: Tensor) -> Tensor:
    """For each row of ``a``, the cosine of its best match among the rows of ``b``."""
    return cosine_topk(_unit(a_FD), _unit(b_FD), 1).values[:, 0]


def seed_stability(a: SAE, b: SAE, threshold: float = 0.7) -> float:
    """Share of ``a``'s features whose best match in ``b`` (another seed) reaches ``threshold``."""
    return float((top1_cosines(a.W_dec, b.W_dec) >= threshold).float().mean())


@dataclass(frozen=True)
class AdjacentRow:
    layer: int  # matches L/res -> (L-1)/res
    median: float
    p10: float
    p90: float
    share_ge_05: float
    share_ge_07: float


def adjacent_res(suite) -> list[AdjacentRow]:
    """Top-1 decoder cosine of every ``L/res`` feature against ``(L-1)/res``, per layer."""
    res = {s.layer: s for s in suite.sites("res")}
    rows = []
    for layer in sorted(res):
        if layer - 1 not in res:
            continue
        c = top1_cosines(suite[res[layer]].W_dec, suite[res[layer - 1]].W_dec)
        q = torch.quantile(c, torch.tensor([0.1, 0.5, 0.9]))
        rows.append(AdjacentRow(layer, round(float(q[1]), 4), round(float(q[0]), 4),
                                round(float(q[2]), 4), round(float((c >= 0.5).float().mean()), 4),
                                round(float((c >= 0.7).float().mean()), 4)))
    return rows


def report(suite, seed_saes: dict | None = None) -> dict:
    """The three diagnostics as JSON-ready data: ``movement`` per site, ``stability`` per site
    with a second-seed SAE in ``seed_saes`` ({site: SAE}), ``adjacent`` per layer, and medians."""
    movement = {}
    for site in suite.sites():
        got = init_cosines(suite[site])
        if got is not None:
            movement[str(site)] = {"encoder": round(got[0], 4), "decoder": round(got[1], 4)}
    stability = {str(s): round(seed_stability(suite[s], other), 4)
                 for s, other in (seed_saes or {}).items()}
    adjacent = adjacent_res(suite)
    out = {"movement": movement, "stability": stability,
           "adjacent": [asdict(r) for r in adjacent]}

    def med(xs):
        xs = sorted(xs)
        return round(xs[len(xs) // 2], 4) if xs else None
    out["summary"] = {
        "decoder_cos_to_init_median": med([m["decoder"] for m in movement.values()]),
        "encoder_cos_to_init_median": med([m["encoder"] for m in movement.values()]),
        "seed_stability": stability,
        "adjacent_res_top1_median": med([r.median for r in adjacent]),
        "adjacent_res_share_ge_05": med([r.share_ge_05 for r in adjacent]),
    }
    return out


def format_report(rep: dict) -> str:
    s = rep["summary"]
    lines = ["convergence (from weights):",
             f"  rows' median cosine with their initialisation: decoder "
             f"{s['decoder_cos_to_init_median']}, encoder {s['encoder_cos_to_init_median']}"]
    for site, v in s["seed_stability"].items():
        lines.append(f"  cross-seed stability {site}: {v:.1%} of features match at cos >= 0.7")
    if rep["adjacent"]:
        lines.append("  adjacent res top-1 cosine (L-1 -> L), median per layer: " +
                     " ".join(f"{r['median']:.2f}" for r in rep["adjacent"]))
        lines.append(f"  median over layers {s['adjacent_res_top1_median']}, share >= 0.5 "
                     f"{s['adjacent_res_share_ge_05']}")
    return "\n".join(lines)


def plot(rep: dict, path, title: str = "") -> None:
    """Adjacent-layer top-1 cosine over depth (median with the 10-90% band)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from saeflow.io import save_figure
    rows = rep["adjacent"]
    if not rows:
        return
    L = [r["layer"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 3.2), dpi=120)
    ax.fill_between(L, [r["p10"] for r in rows], [r["p90"] for r in rows], alpha=0.25,
                    label="10-90% of features")
    ax.plot(L, [r["median"] for r in rows], marker="o", ms=3, label="median")
    ax.plot(L, [r["share_ge_05"] for r in rows], ls="--", label="share >= 0.5")
    ax.set_xlabel("layer L (match L/res -> L-1/res)")
    ax.set_ylabel("top-1 decoder cosine")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "adjacent-layer matching", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def for_suite(suite) -> dict:
    """``report`` for a suite, with the second-seed replicas a trained suite keeps in its
    ``seeds/`` folder (``saeflow.train``) when there are any."""
    from saeflow.formats import load_sae
    seeds = {}
    folder = suite.root / "seeds" if suite.root is not None else None
    if folder is not None and folder.is_dir():
        for sub in sorted(folder.iterdir()):
            if (sub / "cfg.json").exists():
                sae = load_sae(sub)
                if sae.site in suite:
                    seeds[sae.site] = sae
    return report(suite, seeds)
