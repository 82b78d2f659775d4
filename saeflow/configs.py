"""The settings of the algorithms, as plain dataclasses and constants with no heavy imports
(no torch, numpy or transformers), so that the CLI builds its parsers from them quickly and
nothing restates a default. Each algorithm module re-exports its own (``prune.HeldoutConfig``,
``permutation.PermutationConfig``, ...); this module is where their values live."""

from __future__ import annotations

from dataclasses import dataclass

OUTLIER_FACTOR = 10.0  # the usable-token norm limit, x the median (saeflow.tokens)
DEFAULT_BLOCK = 4096  # tile size of the blocked decoder matmuls (saeflow.match)

# the atlas and its threshold rule (saeflow.atlas, saeflow.lineage, saeflow.nulls)
DEFAULT_K = 5  # matches stored per feature and source site
DEFAULT_QUANTILE = 0.99
DEFAULT_NULL_SAMPLES = 2048
DEFAULT_NULL = "gaussian"
DEFAULT_MIN_COS = 0.2  # the minimum effect size: cos^2 = 4% shared variance
NULLS = ("gaussian", "rotation", "reference")

# steering (saeflow.steer, saeflow.magnitudes)
ACTIONS = ("activate", "suppress")
MODES = ("single", "cumulative")
SCHEDULES = ("constant", "exponential", "linear")
MAGNITUDES = ("res_norm", "activation", "theta", "none")

GRAPH_FORMATS = ("json", "graphml", "dot", "svg", "png", "neuronpedia")  # saeflow.export
PRUNE_METHODS = ("permutation", "cosine", "reconstruction", "skip")  # saeflow.prune
OBJECTIVES = ("decoder", "encoder", "both")  # saeflow.permutation


# ---- held-out text and permutations (saeflow.prune, saeflow.permutation) ----------------------
@dataclass(frozen=True)
class HeldoutConfig:
    source: str = "default"  # corpus source (saeflow.corpus) or a path to .txt files
    split: str = "heldout"
    n_seqs: int = 16
    seq_len: int = 128
    batch_size: int = 4
    outlier_factor: float = OUTLIER_FACTOR
    seed: int = 0

    def __post_init__(self):
        for name in ("n_seqs", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"held-out text: {name} must be >= 1, got {getattr(self, name)}")
        if self.seq_len < 3:
            raise ValueError(f"held-out text: seq_len must be >= 3, got {self.seq_len}")
        if not self.outlier_factor > 1:
            raise ValueError(f"held-out text: outlier_factor must be > 1, got "
                             f"{self.outlier_factor}")


@dataclass(frozen=True)
class PermutationConfig:
    objective: str = "both"  # the paper's experiments match encoder + decoder
    fold: bool = True
    solver: str = "auto"  # auto | dense | sparse (see saeflow.match.permutation_match)
    knn: int = 16
    dense_limit: int = 20_000
    block: int = DEFAULT_BLOCK
    precision: str = "auto"

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"permutation objective must be one of {', '.join(OBJECTIVES)}, got "
                             f"{self.objective!r}")
        if self.solver not in ("auto", "dense", "sparse"):
            raise ValueError(f"permutation solver must be auto, dense or sparse, got "
                             f"{self.solver!r}")
        for name in ("knn", "dense_limit", "block"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"permutation {name} must be >= 1, got {getattr(self, name)}")

    @property
    def tag(self) -> str:
        return f"{self.objective}-{'folded' if self.fold else 'raw'}"


# ---- persistence over depth (saeflow.persistence) ---------------------------------------------
@dataclass(frozen=True)
class PersistenceConfig:
    starts: tuple[int, ...] = ()  # start layers (empty: four spread over the depth)
    max_distance: int = 8
    n_features: int = 128  # sampled per start among features that fire >= min_fires times
    min_fires: int = 3
    top_k: int = 4  # contexts per feature for the semantic proxy
    window: int = 12  # tokens before the peak in a context
    level: float = 0.5
    semantic: bool = True
    judge_pairs: int = 16  # pairs per (start, distance) shown to the LLM judge, when one is set
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "starts", tuple(int(s) for s in self.starts))
        for name in ("max_distance", "n_features", "min_fires", "top_k", "window",
                     "judge_pairs"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"persistence: {name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.level < 1:
            raise ValueError(f"persistence: level must be in (0, 1), got {self.level}")


# ---- activation-based lineage groups (saeflow.groups) -----------------------------------------
@dataclass(frozen=True)
class GroupsConfig:
    layers: tuple[int, ...] = (6, 12, 18)
    tokens_per_text: int = 5
    max_len: int = 64  # tokens per text (longer texts are cut)
    min_group: int = 20  # a group enters the tests with at least this many members
    alpha: float = 0.001
    batch: int = 8  # texts per forward pass
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))
        if not self.layers or min(self.layers) < 0:
            raise ValueError(f"groups: layers must be >= 0, got {list(self.layers)}")
        for name in ("tokens_per_text", "min_group", "batch"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"groups: {name} must be >= 1, got {getattr(self, name)}")
        if self.max_len < 2:
            raise ValueError("groups: max_len must be >= 2 (position 0 is never sampled)")
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"groups: alpha must be between 0 and 1, got {self.alpha}")


# ---- top activating contexts (saeflow.contexts) -----------------------------------------------
@dataclass(frozen=True)
class ContextSettings:
    source: str = "default"  # corpus source (see saeflow.corpus) or "texts"
    n_tokens: int = 65_536
    seq_len: int = 128
    batch_size: int = 8
    top_k: int = 8
    seed: int = 0

    def __post_init__(self):
        for name in ("n_tokens", "seq_len", "batch_size", "top_k"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"contexts: {name} must be >= 1, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise ValueError("contexts: seq_len must be >= 2 (the first token is skipped)")

    @property
    def n_batches(self) -> int:
        per = self.seq_len * self.batch_size
        return max(1, -(-self.n_tokens // per))


# ---- the causal check (saeflow.deactivate, saeflow.correlate) ----------------------------
POWER_TOKENS = 100_000  # tokens the Pearson baseline needs for its power (saeflow.correlate)
STRATEGIES = ("top1", "top5", "random5", "random_active", "permutation", "pearson",
              "exhaustive")


@dataclass(frozen=True)
class DeactivationConfig:
    layers: tuple[int, ...] = (6, 12, 18)
    strategies: tuple[str, ...] = STRATEGIES
    rs: tuple[float, ...] = (0.0,)
    tokens_per_text: int = 5
    max_len: int = 64  # tokens per text (longer texts are cut)
    max_pairs: int | None = None  # over all layers, split evenly
    top_k: int = 5
    corr_tokens: int = POWER_TOKENS  # tokens for the Pearson baseline (fewer: underpowered)
    batch_tokens: int = 8192  # edited rows x prefix length per block call
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))
        object.__setattr__(self, "strategies", tuple(self.strategies))
        object.__setattr__(self, "rs", tuple(float(x) for x in self.rs))
        if not self.layers or min(self.layers) < 1:
            raise ValueError(f"deactivate: layers must be >= 1 (layer L needs R_(L-1)), got "
                             f"{list(self.layers)}")
        bad = [s for s in self.strategies if s not in STRATEGIES]
        if bad or not self.strategies:
            raise ValueError(f"deactivate: unknown strategies {bad}; known: "
                             f"{', '.join(STRATEGIES)}")
        if not self.rs:
            raise ValueError("deactivate: give at least one r")
        for name in ("tokens_per_text", "top_k", "corr_tokens", "batch_tokens"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"deactivate: {name} must be >= 1, got {getattr(self, name)}")
        if self.max_len < 2:
            raise ValueError("deactivate: max_len must be >= 2 (position 0 is never sampled)")
        if self.max_pairs is not None and self.max_pairs < 1:
            raise ValueError(f"deactivate: max_pairs must be >= 1, got {self.max_pairs}")


# ---- the steering evaluation (saeflow.evaluate) ------------------------------------------
REPORT_PROMPTS = ("My friend told me", "In my opinion,", "Today", "Here is the story of")


@dataclass(frozen=True)
class SweepConfig:
    modes: tuple[str, ...] = MODES
    layers: tuple[int, ...] = ()
    coefficients: tuple[float, ...] = (0.05, 0.1, 0.2, 0.4)
    prompts: tuple[str, ...] = ("I think", "Let me tell you about", "Yesterday,", "The best thing")
    seeds: tuple[int, ...] = (0,)
    samples: int = 2
    report_prompts: tuple[str, ...] = REPORT_PROMPTS
    report_seeds: tuple[int, ...] | None = None  # None: as many seeds, after the selection ones
    max_new_tokens: int = 36
    schedule: str = "constant"
    alpha: float = -0.05
    end_coefficient: float | None = None
    action: str = "activate"
    temperature: float = 1.27
    top_p: float = 0.7
    baseline_prompt: str = "Write about {theme}.\n\n{prompt}"
    equal_norm: bool = True  # add cumulative_norm cells (activation with both modes only)
    judge_sample: int = 24  # held-out generations a configured judge rates

    def __post_init__(self):
        if self.action not in ACTIONS:
            raise ValueError(f"unknown action {self.action!r}; known: {', '.join(ACTIONS)}")
        for m in self.modes:
            if m not in MODES:
                raise ValueError(f"unknown mode {m!r}; known: {', '.join(MODES)}")
        if not self.layers or not self.coefficients or not self.prompts or not self.seeds:
            raise ValueError("a sweep needs layers, coefficients, prompts and seeds")
        if self.report_seeds is None:
            top = max(self.seeds) + 1
            object.__setattr__(self, "report_seeds", tuple(range(top, top + len(self.seeds))))
        if not self.report_prompts or not self.report_seeds:
            raise ValueError("a sweep needs report prompts and seeds (held out from selection)")
        if same := sorted(set(self.prompts) & set(self.report_prompts)):
            raise ValueError(f"prompts {same} are both selection and report prompts; the "
                             "held-out report needs prompts no choice has seen")
        if same := sorted(set(self.seeds) & set(self.report_seeds or ())):
            raise ValueError(f"seeds {same} are both selection and report seeds; the held-out "
                             "report needs seeds no choice has seen")
        if self.samples < 1:
            raise ValueError(f"samples must be >= 1, got {self.samples}")

    @property
    def norm_cells(self) -> bool:
        return self.equal_norm and self.action == "activate" and set(MODES) <= set(self.modes)
