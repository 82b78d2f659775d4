"""Hub presets: a declarative registry of public SAE packs that cover res, mlp and att of a model.

``PRESETS[name]`` says, for each site kind, which Hugging Face repo holds it and the folder of
each layer's SAE inside the repo; ``open_preset(name)`` returns a ``Suite`` over those folders.
Files are looked up, in order:
  1. ``<saeflow cache>/presets/<name>/<owner>--<repo>/<folder>/...`` (files copied by hand);
  2. the Hugging Face cache (``huggingface_hub``, no network);
  3. the hub, with ``snapshot_download(allow_patterns=...)`` so only the needed files come,
     unless ``HF_HUB_OFFLINE=1``.
When files are missing and the hub cannot be reached, the error lists the exact repo and files
and both places they can be put. Packs shipped inside a zip (the Pythia dictionaries) are
extracted once into (1).

Choices: Gemma Scope's "canonical" 16k SAEs are the per-layer ``average_l0`` folders that SAELens
and Neuronpedia call canonical (listed below); OpenAI's GPT-2 v5 SAEs come from their SAELens
conversions on the hub (the original ``.pt`` files live outside the hub; ``saeflow.formats.openai``
reads them when given by path).
"""

from __future__ import annotations

import os
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

from saeflow.io import atomic_path
from saeflow.models import cache_dir
from saeflow.sites import Site
from saeflow.suite import Suite

# Per-layer average_l0 of Gemma Scope 2B's canonical 16k SAEs (layers 0..25).
_GS_L0 = {
    "res": (105, 102, 141, 59, 124, 68, 70, 69, 71, 73, 77, 80, 82, 84, 84, 78, 78, 77, 74, 73, 71,
            70, 72, 75, 73, 116),
    "mlp": (119, 105, 95, 95, 85, 114, 133, 60, 136, 88, 110, 98, 108, 112, 97, 80, 72, 68, 106,
            109, 109, 113, 121, 128, 73, 126),
    "att": (104, 79, 93, 117, 116, 135, 61, 99, 129, 127, 70, 80, 85, 92, 71, 98, 71, 79, 72, 122,
            62, 65, 106, 73, 96, 77),
}


@dataclass(frozen=True)
class Pack:
    """One site kind of a preset: a hub repo and each layer's SAE folder inside it."""
    kind: str
    repo: str
    folders: tuple[str, ...]  # index = layer
    files: tuple[str, ...]  # needed files inside each folder
    mb: int  # approximate size of one SAE, for the download message
    archive: str | None = None  # a zip in the repo that holds the folders


@dataclass(frozen=True)
class Preset:
    name: str
    model: str  # hub id of the model the SAEs read
    n_layers: int
    d_model: int
    width: int
    architecture: str
    about: str
    packs: tuple[Pack, ...]

    def sites(self) -> list[Site]:
        return sorted(Site(layer, p.kind) for p in self.packs for layer in range(len(p.folders)))

    def pack(self, kind: str) -> Pack:
        return next(p for p in self.packs if p.kind == kind)


def _gemmascope() -> Preset:
    kinds = {"res": "res", "mlp": "mlp", "att": "att_z"}
    packs = tuple(Pack(kind=kinds[k], repo=f"google/gemma-scope-2b-pt-{k}",
                       folders=tuple(f"layer_{L}/width_16k/average_l0_{n}"
                                     for L, n in enumerate(_GS_L0[k])),
                       files=("params.npz",), mb=302 if k != "att" else 268)
                  for k in ("res", "mlp", "att"))
    return Preset("gemmascope-2b-16k", "google/gemma-2-2b", 26, 2304, 16384, "jumprelu",
                  "Gemma Scope 2B, canonical 16k res / mlp / att (att reads o_proj's input: att_z)",
                  packs)


def _llamascope() -> Preset:
    packs = tuple(Pack(kind=kind, repo=f"fnlp/Llama3_1-8B-Base-LX{c}-8x",
                       folders=tuple(f"Llama3_1-8B-Base-L{L}{c}-8x" for L in range(32)),
                       files=("hyperparams.json", "checkpoints/final.safetensors"), mb=537)
                  for c, kind in (("R", "res"), ("A", "att"), ("M", "mlp")))
    return Preset("llamascope-8x", "meta-llama/Llama-3.1-8B", 32, 4096, 32768, "jumprelu",
                  "Llama Scope 8x (32k) R / A / M for Llama-3.1-8B base", packs)


def _openai() -> Preset:
    repos = {"res": ("resid-post", ".pt"), "att": ("attn-out", ""), "mlp": ("mlp-out", "")}
    packs = tuple(Pack(kind=kind, repo=f"jbloom/GPT2-Small-OAI-v5-32k-{r}-SAEs",
                       folders=tuple(f"v5_32k_layer_{L}{suffix}" for L in range(12)),
                       files=("cfg.json", "sae_weights.safetensors"), mb=201)
                  for kind, (r, suffix) in repos.items())
    return Preset("openai-gpt2-v5-32k", "openai-community/gpt2", 12, 768, 32768, "topk",
                  "OpenAI v5 32k TopK(32) SAEs on GPT-2 small: resid_post / attn_out / mlp_out",
                  packs)


def _pythia() -> Preset:
    names = {"res": "resid_out", "att": "attn_out", "mlp": "mlp_out"}
    packs = tuple(Pack(kind=kind, repo="saprmarks/pythia-70m-deduped-saes",
                       folders=tuple(f"dictionaries/pythia-70m-deduped/{n}_layer{L}/10_32768"
                                     for L in range(6)),
                       files=("ae.pt",), mb=134,
                       archive="dictionaries_pythia-70m-deduped_10.zip")
                  for kind, n in names.items())
    return Preset("pythia-70m-sm", "EleutherAI/pythia-70m-deduped", 6, 512, 32768, "relu",
                  "Pythia-70m-deduped 'sm' dictionaries (dictionary_learning, 10_32768)", packs)


PRESETS: dict[str, Preset] = {p.name: p for p in (_gemmascope(), _llamascope(), _openai(),
                                                  _pythia())}


class PresetUnavailable(FileNotFoundError):
    """A preset's files are neither on this machine nor reachable on the hub."""


def preset_dir(name: str) -> Path:
    """Where files of preset ``name`` copied by hand (or extracted from archives) live."""
    return cache_dir() / "presets" / name


def _local_root(name: str, repo: str) -> Path:
    return preset_dir(name) / repo.replace("/", "--")


def _offline() -> bool:
    from huggingface_hub import constants
    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    return env or bool(getattr(constants, "HF_HUB_OFFLINE", False))


def _has(root: Path | None, rels: list[str]) -> bool:
    return root is not None and all((root / r).is_file() for r in rels)


def _snapshot(repo: str, patterns: list[str], note: str = "") -> tuple[Path | None, str]:
    """The local snapshot holding ``patterns`` (downloading when allowed, after printing
    ``note``), or why not."""
    from huggingface_hub import snapshot_download
    try:
        root = Path(snapshot_download(repo, allow_patterns=patterns, local_files_only=True))
        if _has(root, patterns):
            return root, ""
    except Exception:  # not cached: fall through to the network
        pass
    if _offline():
        return None, "HF_HUB_OFFLINE is set"
    if note:
        print(note)
    try:
        root = Path(snapshot_download(repo, allow_patterns=patterns))
    except Exception as e:
        return None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if not _has(root, patterns):
        return None, f"the repo {repo} does not hold all of these files"
    return root, ""


def _unavailable(preset: Preset, pack: Pack, needs: list[str], reason: str) -> PresetUnavailable:
    from huggingface_hub import constants
    local = _local_root(preset.name, pack.repo)
    if pack.archive:
        how = (f"  hf download {pack.repo} {pack.archive}\n"
               f"and unzip it into {local} (keeping the paths inside the zip)")
        files = "\n".join(f"  {local / n}" for n in needs)
    else:
        folders = dict.fromkeys(n.rsplit("/", 1)[0] if "/" in n else n for n in needs)
        includes = " ".join(f'--include "{f}/*"' for f in folders)
        how = (f"  hf download {pack.repo} {includes}\n"
               f"then copy the Hugging Face cache ({constants.HF_HUB_CACHE}) to this machine, or "
               f"put the files under {local}, keeping their paths in the repo")
        files = "\n".join(f"  {local / n}" for n in needs)
    return PresetUnavailable(
        f"preset {preset.name!r}: {len(needs)} file(s) from the hub repo {pack.repo} are not on "
        f"this machine and cannot be downloaded ({reason}). On a machine with access to the hub "
        f"run\n{how}\nExpected files:\n{files}")


def _extract(zip_path: Path, folders: list[str], dest: Path) -> None:
    """Extract the members under ``folders`` from a zip into ``dest`` (each file atomically)."""
    try:
        with zipfile.ZipFile(zip_path) as zf:
            for member in zf.namelist():
                if member.endswith("/") or not any(member.startswith(f + "/") for f in folders):
                    continue
                with atomic_path(dest / member) as tmp, open(tmp, "wb") as f, \
                        zf.open(member) as src:
                    shutil.copyfileobj(src, f, 1 << 22)
    except zipfile.BadZipFile as e:
        raise PresetUnavailable(f"{zip_path}: not a readable zip archive ({e})") from None


def _resolve(preset: Preset, pack: Pack, layers: list[int]) -> dict[Site, Path]:
    local = _local_root(preset.name, pack.repo)
    out, missing = {}, []
    for L in layers:
        folder = pack.folders[L]
        if _has(local / folder, list(pack.files)):
            out[Site(L, pack.kind)] = local / folder
        else:
            missing.append(L)
    if not missing:
        return out
    if pack.archive:
        root, reason = _snapshot(pack.repo, [pack.archive])
        if root is None:
            needs = [f"{pack.folders[L]}/{f}" for L in missing for f in pack.files]
            raise _unavailable(preset, pack, needs, reason)
        _extract(root / pack.archive, [pack.folders[L] for L in missing], local)
        base = local
    else:
        needs = [f"{pack.folders[L]}/{f}" for L in missing for f in pack.files]
        note = (f"saeflow: preset {preset.name}: downloading {len(missing)} SAE(s) from "
                f"{pack.repo} (~{len(missing) * pack.mb / 1024:.1f} GB) into the HF cache")
        base, reason = _snapshot(pack.repo, needs, note)
        if base is None:
            raise _unavailable(preset, pack, needs, reason)
    for L in missing:
        folder = base / pack.folders[L]
        if not _has(folder, list(pack.files)):
            raise _unavailable(preset, pack, [f"{pack.folders[L]}/{f}" for f in pack.files],
                               f"{pack.archive or pack.repo} does not hold them")
        out[Site(L, pack.kind)] = folder
    return out


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[name]


def open_preset(name: str, model: str | None = None, sites=None):
    """The suite of preset ``name`` (``sites``: an optional subset, e.g. ``["12/res"]``),
    with its files found or fetched as the module docstring says."""
    preset = get_preset(name)
    wanted = preset.sites() if sites is None else sorted({Site.parse(s) for s in sites})
    known = set(preset.sites())
    for s in wanted:
        if s not in known:
            raise KeyError(f"preset {name!r} has no SAE at {s}; it covers layers "
                           f"0..{preset.n_layers - 1} of kinds "
                           f"{', '.join(p.kind for p in preset.packs)}")
    paths: dict[Site, Path | None] = {}
    problems = []
    for pack in preset.packs:  # try every pack, so one error lists everything that is missing
        layers = [s.layer for s in wanted if s.kind == pack.kind]
        if layers:
            try:
                paths.update(_resolve(preset, pack, layers))
            except PresetUnavailable as e:
                problems.append(str(e))
    if problems:
        raise PresetUnavailable("\n\n".join(problems))
    info = {"preset": name, "about": preset.about, "width": preset.width,
            "architecture": preset.architecture, "d_model": preset.d_model}
    return Suite(paths=paths, model=model or preset.model, name=name, info=info)
