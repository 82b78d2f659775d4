"""Sites and features: the one place where their names are parsed and printed.

A *site* is where an SAE reads the model: ``12/res`` (residual stream after block 12),
``12/mlp`` (the MLP block's contribution), ``12/att`` (the attention block's contribution),
``12/att_z`` (the per-head attention output before the output projection). A *feature* is one
latent of the SAE at a site: ``12/res/4111``. The same spelling is used in the CLI, JSON,
URLs and file names (``12-res`` where a slash cannot appear).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

KINDS = ("res", "mlp", "att", "att_z")
# Kinds whose activations live in the residual basis (att_z does not: it is the o_proj input).
RESIDUAL_KINDS = ("res", "mlp", "att")

_SITE_RE = re.compile(r"^(\d+)[/-](res|mlp|att_z|att)$")
_FEATURE_RE = re.compile(r"^(\d+)[/-](res|mlp|att_z|att)[/-](\d+)$")

# TransformerLens hook names (and the HF module names people also write) -> kind.
_HOOK_PATTERNS = [
    (re.compile(r"^blocks\.(\d+)\.hook_resid_post$"), "res"),
    (re.compile(r"^blocks\.(\d+)\.hook_mlp_out$"), "mlp"),
    (re.compile(r"^blocks\.(\d+)\.hook_attn_out$"), "att"),
    (re.compile(r"^blocks\.(\d+)\.attn\.hook_z$"), "att_z"),
    (re.compile(r"^(?:model\.)?layers\.(\d+)$"), "res"),
    (re.compile(r"^(?:model\.)?layers\.(\d+)\.mlp$"), "mlp"),
    (re.compile(r"^(?:model\.)?layers\.(\d+)\.post_feedforward_layernorm$"), "mlp"),
    (re.compile(r"^(?:model\.)?layers\.(\d+)\.self_attn$"), "att"),
    (re.compile(r"^(?:model\.)?layers\.(\d+)\.post_attention_layernorm$"), "att"),
    (re.compile(r"^(?:model\.)?layers\.(\d+)\.self_attn\.o_proj(?:\.input)?$"), "att_z"),
    (re.compile(r"^(?:transformer\.)?h\.(\d+)$"), "res"),
    (re.compile(r"^(?:transformer\.)?h\.(\d+)\.mlp$"), "mlp"),
    (re.compile(r"^(?:transformer\.)?h\.(\d+)\.attn$"), "att"),
    (re.compile(r"^(?:gpt_neox\.)?layers\.(\d+)\.attention$"), "att"),
]

_TL_HOOK = {"res": "blocks.{}.hook_resid_post", "mlp": "blocks.{}.hook_mlp_out",
            "att": "blocks.{}.hook_attn_out", "att_z": "blocks.{}.attn.hook_z"}


@dataclass(frozen=True, order=True)
class Site:
    layer: int
    kind: str

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown site kind {self.kind!r}; known kinds: {', '.join(KINDS)}")
        if not isinstance(self.layer, int) or self.layer < 0:
            raise ValueError(f"site layer must be a non-negative integer, got {self.layer!r}")

    @classmethod
    def parse(cls, text: str | Site) -> Site:
        if isinstance(text, Site):
            return text
        m = _SITE_RE.match(str(text).strip())
        if not m:
            raise ValueError(f"cannot parse site {text!r}: expected LAYER/KIND such as 12/res, "
                             f"with KIND one of {', '.join(KINDS)}")
        return cls(int(m.group(1)), m.group(2))

    def __str__(self) -> str:
        return f"{self.layer}/{self.kind}"

    @property
    def slug(self) -> str:
        """File-name form: ``12-res``."""
        return f"{self.layer}-{self.kind}"

    @property
    def hook_name(self) -> str:
        """TransformerLens hook name, as SAELens configs store it."""
        return _TL_HOOK[self.kind].format(self.layer)

    @property
    def residual_basis(self) -> bool:
        return self.kind in RESIDUAL_KINDS

    def feature(self, index: int) -> Feature:
        return Feature(self, int(index))


@dataclass(frozen=True, order=True)
class Feature:
    site: Site
    index: int

    def __post_init__(self):
        if self.index < 0:
            raise ValueError(f"feature index must be non-negative, got {self.index}")

    @classmethod
    def parse(cls, text: str | Feature) -> Feature:
        if isinstance(text, Feature):
            return text
        m = _FEATURE_RE.match(str(text).strip())
        if not m:
            raise ValueError(f"cannot parse feature {text!r}: expected LAYER/KIND/INDEX such as "
                             f"12/res/4111, with KIND one of {', '.join(KINDS)}")
        return cls(Site(int(m.group(1)), m.group(2)), int(m.group(3)))

    @property
    def layer(self) -> int:
        return self.site.layer

    @property
    def kind(self) -> str:
        return self.site.kind

    def __str__(self) -> str:
        return f"{self.site}/{self.index}"


def site_from_hook_name(name: str) -> Site:
    """Map a TransformerLens hook name or an HF module name to a site."""
    for pattern, kind in _HOOK_PATTERNS:
        m = pattern.match(name.strip())
        if m:
            return Site(int(m.group(1)), kind)
    raise ValueError(f"cannot tell the site of hook {name!r}: known forms are "
                     "blocks.L.hook_resid_post, blocks.L.hook_mlp_out, blocks.L.hook_attn_out, "
                     "blocks.L.attn.hook_z and the HF module names model.layers.L[.mlp|.self_attn]")


def parse_sites(text: str, n_layers: int | None = None) -> list[Site]:
    """Parse a comma-separated site list; ``all`` or ``*/res`` expand over ``n_layers`` layers,
    ``3-5/res`` is a layer range."""
    out: list[Site] = []
    for part in [p.strip() for p in text.split(",") if p.strip()]:
        if part == "all" or part.startswith("*/") or re.match(r"^\d+-\d+/", part):
            kinds = list(RESIDUAL_KINDS) if part == "all" else [part.split("/", 1)[1]]
            if part.startswith("*/") or part == "all":
                if n_layers is None:
                    raise ValueError(f"site pattern {part!r} needs the model's layer count")
                layers = range(n_layers)
            else:
                lo, hi = part.split("/", 1)[0].split("-")
                layers = range(int(lo), int(hi) + 1)
            out.extend(Site(layer, kind) for layer in layers for kind in kinds)
        else:
            out.append(Site.parse(part))
    return sorted(set(out))
