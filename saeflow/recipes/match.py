"""Two SAEs to match (``saeflow match``; the matching itself is ``saeflow.match``): bare SAE
folders, or two sites of a suite (an att_z site needs the suite's model for W_O), matched by
top-k decoder cosine or by permutation, summarised in one line and optionally saved as CSV."""

from __future__ import annotations

import csv

from saeflow.configs import DEFAULT_BLOCK
from saeflow.io import atomic_path


def open_pair(a: str, b: str, suite: str | None = None, model: str | None = None,
              permutation: bool = False, device: str = "cpu", dtype: str = "float32"):
    """``(saes, residual-basis decoders or None for a permutation, names)`` of A and B."""
    from saeflow.formats import load_sae
    from saeflow.match import residual_decoder
    from saeflow.sites import Site

    if suite:
        from saeflow.catalog import load_suite
        opened = load_suite(suite, model=model)
        sites = [Site.parse(a), Site.parse(b)]
        lm = None
        if any(s.kind == "att_z" for s in sites) and not permutation:
            lm = opened.load_model(device=device, dtype=dtype)
        saes = [opened[s] for s in sites]
        dirs = None if permutation else [residual_decoder(opened, s, lm) for s in sites]
        return saes, dirs, [str(s) for s in sites]
    saes = [load_sae(a), load_sae(b)]
    if not permutation and any(s.site is not None and s.site.kind == "att_z" for s in saes):
        raise ValueError("att_z SAEs match in the residual basis through the model's W_O: use "
                         "--suite (with a model) instead of bare SAE folders")
    dirs = None if permutation else [residual_decoder(s) for s in saes]
    return saes, dirs, [a, b]


def write_csv(path: str, header: list[str], rows) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def match_pair(a: str, b: str, suite: str | None = None, model: str | None = None, *,
               permutation: bool = False, k: int = 1, encoder: bool = False,
               solver: str = "auto", knn: int = 16, block: int = DEFAULT_BLOCK,
               precision: str = "auto", out: str | None = None, device: str = "cpu",
               dtype: str = "float32") -> str:
    """Match A and B; returns the summary line (and writes the matches to ``out`` as CSV)."""
    import torch

    from saeflow.match import cosine_topk_pair, permutation_match
    saes, dirs, names = open_pair(a, b, suite, model, permutation, device, dtype)
    if permutation:
        res = permutation_match(saes[0], saes[1], use_encoder=encoder, solver=solver, knn=knn,
                                block=block, precision=precision)
        cos = (saes[0].unit_decoder() * saes[1].unit_decoder()[res.perm]).sum(1)
        if out:
            write_csv(out, ["index_a", "index_b", "cos"],
                      ([i, int(j), f"{c:.6f}"] for i, (j, c) in enumerate(zip(res.perm, cos))))
        return (f"permutation {names[0]} -> {names[1]}: {len(res.perm)} pairs, solver "
                f"{res.solver}, {res.seconds:.1f} s; total squared distance {res.cost:.4g}; mean "
                f"cosine {res.mean_cos:.3f}; cosine > 0.5 for {(cos > 0.5).float().mean():.1%}")
    assert dirs is not None  # (None only for a permutation)
    stats: dict = {}
    fwd, back = cosine_topk_pair(dirs[0], dirs[1], k=k, block=block, precision=precision,
                                 stats=stats)
    top = fwd.values[:, 0]
    mutual = (back.indices[fwd.indices[:, 0], 0] == torch.arange(len(top))).float().mean()
    q = torch.quantile(top, torch.tensor([0.1, 0.5, 0.9]))
    if out:
        rows = ([i, r, int(fwd.indices[i, r]), f"{float(fwd.values[i, r]):.6f}"]
                for i in range(len(top)) for r in range(fwd.indices.shape[1]))
        write_csv(out, ["index_a", "rank", "index_b", "cos"], rows)
    return (f"{names[0]} ({len(top)}) -> {names[1]} ({len(back.values)}): top-1 cosine "
            f"p10 {q[0]:.3f}, median {q[1]:.3f}, p90 {q[2]:.3f}; > 0.5 for "
            f"{(top > 0.5).float().mean():.1%}; mutual best {mutual:.1%} "
            f"[{stats.get('precision')}]")
