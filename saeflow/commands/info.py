"""``saeflow info SUITE_OR_SAE``: the sites, widths, architectures and model of a suite or of one
SAE file or folder (any format saeflow reads). A hub preset is described from the registry,
without downloading anything."""

from __future__ import annotations

import json
from pathlib import Path


def add(subparsers) -> None:
    p = subparsers.add_parser(
        "info", help="describe a suite, a hub preset or one SAE file",
        description="Print the sites, widths, architectures and model of a suite (folder, spec "
                    "file, 'starter' or a preset name) or of one SAE file or folder.")
    p.add_argument("target", metavar="SUITE_OR_SAE",
                   help="an SAE file/folder, a suite folder or spec file, 'starter', or a preset")
    p.add_argument("--site", default=None,
                   help="for one SAE whose file names no site: the site it reads, e.g. 12/res")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


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


def _print_table(rows: list[dict], cols: list[str]) -> None:
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r.get(c, "")).ljust(widths[c]) for c in cols))


def _describe_preset(name: str) -> dict:
    from saeflow.presets import PRESETS, preset_dir
    p = PRESETS[name]
    return {"preset": name, "about": p.about, "model": p.model, "n_layers": p.n_layers,
            "d_model": p.d_model, "width": p.width, "architecture": p.architecture,
            "kinds": {pk.kind: pk.repo for pk in p.packs}, "n_sites": len(p.sites()),
            "local_dir": str(preset_dir(name))}


def run(args) -> int:
    from saeflow.formats import READERS, load_sae
    from saeflow.presets import PRESETS
    target = args.target
    path = Path(target).expanduser()
    reader = next((name for name, detect, _ in READERS if path.exists() and detect(path)), None)
    if reader:
        row = sae_row(load_sae(path, args.site), reader)
        if args.json:
            print(json.dumps(row, indent=2))
        else:
            for k, v in row.items():
                print(f"{k:13s}{v}")
        return 0
    if target in PRESETS and not path.exists():
        info = _describe_preset(target)
        if args.json:
            print(json.dumps(info, indent=2))
        else:
            for k, v in info.items():
                v = ", ".join(f"{a}: {b}" for a, b in v.items()) if isinstance(v, dict) else v
                print(f"{k:13s}{v}")
            print("(files are fetched on first use; see `saeflow.presets` for where they go)")
        return 0
    from saeflow.catalog import load_suite
    suite = load_suite(target)
    rows = []
    for site in suite.sites():
        rows.append(sae_row(suite[site]))
    out = {"suite": suite.name, "model": suite.model, "n_sites": len(rows),
           "layers": suite.layers, "sites": rows}
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"suite {suite.name}: model {suite.model or '(none named)'}, {len(rows)} sites over "
          f"{len(suite.layers)} layers")
    _print_table(rows, ["site", "width", "d_in", "architecture", "input", "decoder_norm", "source"])
    return 0
