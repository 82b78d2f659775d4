"""What ``saeflow info`` says about an SAE file or folder, a hub preset (from the registry,
without downloading) or a suite, as plain values (``describe``) and as text
(``format_description``)."""

from __future__ import annotations

from pathlib import Path


def sae_row(sae, fmt: str = "") -> dict:
    """One SAE described as plain values."""
    arch = sae.activation + (f" k={sae.k}" if sae.activation == "topk" else "")
    if sae.activation == "jumprelu":
        theta = sae.threshold
        arch += (f" theta={float(theta[0]):.4g}" if bool((theta == theta[0]).all())
                 else f" theta median {float(theta.median()):.4g}")
    norms = sae.W_dec.float().norm(dim=1)
    return {"site": str(sae.site) if sae.site else None,
            "format": fmt or sae.metadata.get("format", ""),
            "d_in": sae.d_in, "width": sae.d_sae, "architecture": arch,
            "input": sae.input_norm + (f" x{sae.input_scale:.4g}" if sae.input_scale != 1 else ""),
            "decoder_norm": f"{float(norms.min()):.3g}..{float(norms.max()):.3g}",
            "model": sae.metadata.get("model_name") or "", "source": sae.source}


def describe_preset(name: str) -> dict:
    from saeflow.presets import PRESETS, preset_dir
    p = PRESETS[name]
    return {"preset": name, "about": p.about, "model": p.model, "n_layers": p.n_layers,
            "d_model": p.d_model, "width": p.width, "architecture": p.architecture,
            "kinds": {pk.kind: pk.repo for pk in p.packs}, "n_sites": len(p.sites()),
            "local_dir": str(preset_dir(name))}


def describe(target: str, site: str | None = None) -> tuple[str, dict]:
    """``(what, description)``: what is "sae", "preset" or "suite"."""
    from saeflow.formats import READERS, load_sae
    from saeflow.presets import PRESETS
    path = Path(target).expanduser()
    reader = next((name for name, detect, _ in READERS if path.exists() and detect(path)), None)
    if reader:
        return "sae", sae_row(load_sae(path, site), reader)
    if target in PRESETS and not path.exists():
        return "preset", describe_preset(target)
    from saeflow.catalog import load_suite
    suite = load_suite(target)
    rows = [sae_row(suite[s]) for s in suite.sites()]
    return "suite", {"suite": suite.name, "model": suite.model, "n_sites": len(rows),
                     "layers": suite.layers, "sites": rows}


SUITE_COLUMNS = ["site", "width", "d_in", "architecture", "input", "decoder_norm", "source"]


def format_description(what: str, info: dict) -> str:
    """The text ``saeflow info`` prints for ``describe``'s answer."""
    if what == "sae":
        return "\n".join(f"{k:13s}{v}" for k, v in info.items())
    if what == "preset":
        lines = [f"{k:13s}" + (", ".join(f"{a}: {b}" for a, b in v.items())
                               if isinstance(v, dict) else f"{v}") for k, v in info.items()]
        return "\n".join(lines + ["(files are fetched on first use; see `saeflow.presets` for "
                                   "where they go)"])
    rows = info["sites"]
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in SUITE_COLUMNS}
    lines = [f"suite {info['suite']}: model {info['model'] or '(none named)'}, "
             f"{info['n_sites']} sites over {len(info['layers'])} layers",
             "  ".join(c.ljust(widths[c]) for c in SUITE_COLUMNS)]
    lines += ["  ".join(str(r.get(c, "")).ljust(widths[c]) for c in SUITE_COLUMNS) for r in rows]
    return "\n".join(lines)
