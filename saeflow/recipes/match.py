"""Two SAEs to match (``saeflow match``; the matching itself is ``saeflow.match``): bare SAE
folders, or two sites of a suite (an att_z site needs the suite's model for W_O)."""

from __future__ import annotations

import csv

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
