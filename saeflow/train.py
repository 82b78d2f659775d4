"""Streaming multi-site TopK SAE training, and the cached SmolLM2 starter suite.

Each step runs the model once on a batch of packed text (``saeflow.corpus``) with hooks at all
chosen sites, and every site's TopK SAE (Gao et al. 2024; kernels in ``saeflow.topk``) takes
one Adam step on that batch's activations. Nothing is cached on disk but checkpoints.

Choices (the feature-flow papers train their own SAEs but do not describe the recipe):
  - TopK with AuxK dead-latent revival (Gao et al. 2024, sec. 2.3 and A.2): unit-norm decoder
    rows kept during training (the radial gradient component is removed, rows renormalised),
    encoder initialised as the decoder's transpose, ``b_dec`` at the mean of the first batch;
  - input scale per site from the first batch (``E||x||^2 = d`` after scaling), folded into
    the saved weights so the files work on raw activations; position 0 and norm outliers are
    excluded (see ``TopKTrainer.prepare``);
  - Adam with a linear warm-up and a linear decay to 0 over the last 20% of the steps;
  - the model may run in bf16 (the default): per-token relative error of the activations vs
    fp32 is about 1-2% (median), far below the SAEs' reconstruction error;
  - concurrency: ``workers`` threads with one intra-op thread each split the model forward
    (by sequences) and the SAE steps (by sites); on a shared CPU this degrades gracefully,
    where multi-threaded ops stall on the slowest core;
  - checkpoints every ``checkpoint_every`` steps (atomic) hold everything that determines the
    rest of the run (weights, Adam state, scales, dead counters, step); resuming reproduces
    the uninterrupted run bit for bit.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from saeflow.hooks import SiteTaps
from saeflow.io import write_json_atomic
from saeflow.sae import SAE
from saeflow.sites import Site, parse_sites
from saeflow.suite import SUITE_JSON
from saeflow.topk import TopKTrainer, bf16_matmul_is_fast

CHECKPOINT = ".checkpoint.pt"
TRAINED = ".trained.json"  # SAEs written, evaluation pending
STARTER_NAME = "smollm2-starter"


@dataclass(frozen=True)
class TrainConfig:
    width: int = 2304  # latents per SAE
    k: int = 32
    tokens: int = 300_000  # model tokens to train on (every site sees all of them)
    batch_tokens: int = 1024  # tokens per model forward = per SAE step (rounded to sequences)
    seq_len: int = 256
    lr: float = 2e-3
    warmup_steps: int = 10
    decay_frac: float = 0.2  # linear decay to 0 over this final fraction of the steps
    k_aux: int = 64
    aux_coef: float = 1 / 32
    dead_tokens: int = 20_000  # a latent silent this long gets AuxK gradient
    outlier_factor: float = 10.0
    source: str = "default"
    seed: int = 0
    matmul: str = "auto"  # encoder matmul dtype: auto | bfloat16 | float32
    workers: int = 2
    checkpoint_every: int = 100
    eval_tokens: int = 8192  # quality: tokens for FVU, L0, dead (0 skips the evaluation)
    eval_loss_tokens: int = 1024  # quality: tokens for loss recovered

    def __post_init__(self):
        for name in ("width", "k", "tokens", "batch_tokens", "seq_len", "workers",
                     "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"training setting {name} must be >= 1, got {getattr(self, name)}")
        if self.k > self.width:
            raise ValueError(f"k={self.k} must not exceed width={self.width}")
        if not self.lr > 0:
            raise ValueError(f"learning rate must be positive, got {self.lr}")
        if self.matmul not in ("auto", "bfloat16", "float32"):
            raise ValueError(f"matmul must be auto, bfloat16 or float32, got {self.matmul!r}")

    @property
    def seqs_per_batch(self) -> int:
        return max(1, self.batch_tokens // self.seq_len)

    @property
    def steps(self) -> int:
        return max(1, -(-self.tokens // (self.seqs_per_batch * self.seq_len)))

    def lr_at(self, step: int) -> float:
        warm = min(1.0, (step + 1) / max(1, self.warmup_steps))
        decay_steps = max(1, int(self.steps * self.decay_frac))
        left = self.steps - step
        return self.lr * warm * min(1.0, left / decay_steps)


# Settings that change the result (the others only change speed or bookkeeping).
RESULT_FIELDS = ("width", "k", "tokens", "batch_tokens", "seq_len", "lr", "warmup_steps",
                 "decay_frac", "k_aux", "aux_coef", "dead_tokens", "outlier_factor", "source",
                 "seed", "matmul")
STARTER_CONFIG = TrainConfig()


def _matmul_dtype(cfg: TrainConfig, d: int) -> torch.dtype:
    if cfg.matmul == "auto":
        return torch.bfloat16 if bf16_matmul_is_fast(d, cfg.width) else torch.float32
    return getattr(torch, cfg.matmul)


@contextmanager
def _single_threaded_ops():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def _save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _settings(cfg: TrainConfig) -> dict:
    return {f: getattr(cfg, f) for f in RESULT_FIELDS}


def _progress_sites(sites: list[Site]) -> list[Site]:
    """A few sites to show in the progress bar: a middle layer of each kind."""
    out = []
    for kind in ("res", "mlp", "att"):
        ks = [s for s in sites if s.kind == kind]
        if ks:
            out.append(ks[len(ks) // 2])
    return out


def train_suite(lm, sites, cfg: TrainConfig = STARTER_CONFIG, out_dir: str | Path = "suite", *,
                model_spec: str | None = None, name: str | None = None, resume: bool = True,
                progress: bool = True, on_step=None) -> Path:
    """Train one TopK SAE per site while streaming text through ``lm``; write a suite folder
    (SAELens folders named by site slug, ``suite.json``, ``quality.csv``/``.png``).

    ``sites`` is a list of sites or a site string (``"0-3/res,0-3/mlp"``, ``"all"``).
    ``model_spec`` is what ``load_model`` needs to reopen the model (stored in suite.json).
    A checkpoint in ``out_dir`` with the same settings is resumed unless ``resume=False``.
    ``on_step(step)`` is called after each step (tests use it to simulate a kill).
    """
    from tqdm.auto import tqdm

    from saeflow.corpus import token_batches
    out_dir = Path(out_dir)
    if isinstance(sites, str):
        sites = parse_sites(sites, lm.n_layers)
    sites = sorted({Site.parse(s) for s in sites})
    if not sites:
        raise ValueError("no sites to train")
    for s in sites:
        lm.site_module(s)  # raises for sites outside the model
        if not s.residual_basis:
            raise ValueError(f"site {s}: only res, mlp and att sites are trained")
    d = lm.d_model
    mm_dtype = _matmul_dtype(cfg, d)
    trainers = {s: TopKTrainer(d, cfg.width, cfg.k, k_aux=cfg.k_aux, aux_coef=cfg.aux_coef,
                               dead_tokens=cfg.dead_tokens, outlier_factor=cfg.outlier_factor,
                               seed=cfg.seed * 100_003 + i, matmul_dtype=mm_dtype)
                for i, s in enumerate(sites)}
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt = out_dir / CHECKPOINT
    spec, name = model_spec or lm.name, name or out_dir.name
    done = _trained_marker(out_dir, cfg, sites) if resume else None
    if done is not None:  # killed during the final evaluation: the SAEs are already written
        from saeflow.formats import load_sae
        saes = {s: load_sae(out_dir / s.slug, s) for s in sites}
        _finish(lm, saes, cfg, out_dir, spec, name, done, progress)
        _cleanup(out_dir)
        return out_dir
    step, elapsed, cpu = 0, 0.0, 0.0
    if ckpt.exists() and resume:
        state = torch.load(ckpt, weights_only=False)
        if state["settings"] != _settings(cfg) or state["sites"] != [str(s) for s in sites]:
            diff = [k for k in RESULT_FIELDS if state["settings"].get(k) != getattr(cfg, k)]
            raise ValueError(f"{ckpt}: an interrupted run with other settings "
                             f"({', '.join(diff) or 'sites'}) is in this folder; use another "
                             "--out or restart it (--restart, resume=False)")
        for s in sites:
            trainers[s].load_state_dict(state["trainers"][str(s)])
        step, elapsed, cpu = state["step"], state["elapsed"], state.get("cpu", 0.0)
        torch.set_rng_state(state["rng"])
        if progress:
            print(f"saeflow: resuming {out_dir} at step {step}/{cfg.steps}")
    batches = token_batches(lm.tokenizer, cfg.seq_len, cfg.seqs_per_batch, cfg.source, "train",
                            seed=cfg.seed, repeat=True, start=step)
    shown = _progress_sites(sites)
    ema: dict[Site, float] = {}
    taps = SiteTaps(lm, sites)
    tok_per_step = cfg.seqs_per_batch * cfg.seq_len
    bar = tqdm(total=cfg.steps * tok_per_step, initial=step * tok_per_step, unit="tok",
               unit_scale=True, desc=f"training {len(sites)} SAEs", disable=not progress,
               smoothing=0.1)

    def forward(ids):
        with torch.no_grad():
            return taps.record(ids)

    def sae_step(args):
        s, h, lr = args
        with torch.no_grad():
            t = trainers[s]
            return s, t.step(t.prepare(h), lr).loss

    def checkpoint():
        _save_checkpoint(ckpt, {"settings": _settings(cfg), "sites": [str(s) for s in sites],
                                "step": step, "elapsed": elapsed, "cpu": cpu,
                                "rng": torch.get_rng_state(),
                                "trainers": {str(s): t.state_dict() for s, t in trainers.items()}})

    with _single_threaded_ops(), taps.installed(), \
            ThreadPoolExecutor(max_workers=cfg.workers) as pool:
        while step < cfg.steps:
            t0, c0 = time.perf_counter(), time.process_time()
            ids = next(batches)
            parts = list(pool.map(forward, ids.chunk(min(cfg.workers, ids.shape[0]))))
            acts = {s: torch.cat([p[s] for p in parts]) for s in sites}
            lr = cfg.lr_at(step)
            for s, loss in pool.map(sae_step, [(s, acts[s], lr) for s in sites]):
                ema[s] = loss if s not in ema else 0.9 * ema[s] + 0.1 * loss
            del acts, parts
            step += 1
            elapsed += time.perf_counter() - t0
            cpu += time.process_time() - c0
            if step % cfg.checkpoint_every == 0 and step < cfg.steps:
                checkpoint()
            bar.update(tok_per_step)
            post = {"loss": f"{sum(ema.values()) / len(ema):.3f}"}
            post.update({str(s): f"{ema[s]:.3f}" for s in shown})
            bar.set_postfix(post, refresh=False)
            if on_step is not None:
                on_step(step)
    bar.close()
    saes = _write_saes(lm, trainers, cfg, out_dir, spec)
    timing = {"elapsed": elapsed, "cpu": cpu,
              "matmul_dtype": str(mm_dtype).replace("torch.", "")}
    write_json_atomic(out_dir / TRAINED, {"settings": _settings(cfg), **timing,
                                          "sites": [str(s) for s in sites]})
    ckpt.unlink(missing_ok=True)
    _finish(lm, saes, cfg, out_dir, spec, name, timing, progress)
    _cleanup(out_dir)
    return out_dir


def _trained_marker(out_dir: Path, cfg: TrainConfig, sites: list[Site]) -> dict | None:
    """The marker left between writing the SAEs and finishing the evaluation, if it matches."""
    path = out_dir / TRAINED
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    if data.get("settings") != _settings(cfg) or data.get("sites") != [str(s) for s in sites]:
        return None
    if not all((out_dir / s.slug / "cfg.json").exists() for s in sites):
        return None
    return data


def _cleanup(out_dir: Path) -> None:
    (out_dir / CHECKPOINT).unlink(missing_ok=True)
    (out_dir / TRAINED).unlink(missing_ok=True)


def _write_saes(lm, trainers: dict, cfg: TrainConfig, out_dir: Path,
                model_spec: str) -> dict[Site, SAE]:
    from saeflow.formats import save_saelens
    saes = {}
    for s, t in trainers.items():
        meta = {"saeflow_training": {**_settings(cfg), "trained_tokens": t.tokens,
                                     "steps": t.steps, "input_scale": t.scale,
                                     "outlier_max_norm": t.max_norm,
                                     "model_dtype": str(lm.dtype).replace("torch.", ""),
                                     "model_spec": model_spec},
                "decoder_rows": "norm = 1/input_scale (unit norm in the training space)"}
        sae = t.sae(s, meta)
        save_saelens(sae, out_dir / s.slug, model_name=lm.name, extra=meta)
        saes[s] = sae
    return saes


def _finish(lm, saes: dict[Site, SAE], cfg: TrainConfig, out_dir: Path, model_spec: str,
            name: str, timing: dict, progress: bool) -> None:
    from saeflow import quality
    rows = []
    if cfg.eval_tokens > 0:
        rows = quality.evaluate(lm, saes, source=cfg.source, tokens=cfg.eval_tokens,
                                loss_tokens=cfg.eval_loss_tokens, seq_len=cfg.seq_len,
                                outlier_factor=cfg.outlier_factor, workers=cfg.workers,
                                progress=progress)
        quality.write_reports(rows, out_dir, title=f"{name} ({lm.name})")
        if progress:
            print(quality.format_table(rows))
    steps, elapsed, cpu = cfg.steps, timing["elapsed"], timing.get("cpu", 0.0)
    tokens = steps * cfg.seqs_per_batch * cfg.seq_len
    info = {"model": model_spec, "name": name, "model_name": lm.name,
            "sites": [str(s) for s in sorted(saes)],
            "training": {**dataclasses.asdict(cfg), "steps": steps,
                         "tokens_trained": tokens, "wall_seconds": round(elapsed, 1),
                         "tokens_per_second": round(tokens / max(elapsed, 1e-9), 1),
                         # CPU time of all threads: wall time on `workers` free cores is about
                         # cpu_seconds / workers, whatever else the machine was doing
                         "cpu_seconds": round(cpu, 1),
                         "cpu_seconds_per_1k_tokens": round(1000 * cpu / max(tokens, 1), 2),
                         "encoder_matmul_dtype": timing.get("matmul_dtype"),
                         "model_dtype": str(lm.dtype).replace("torch.", "")},
            "quality": quality.rows_to_json(rows), "quality_summary": quality.summarize(rows)}
    write_json_atomic(out_dir / SUITE_JSON, info)


# ---- the starter suite -----------------------------------------------------------------
def starter_dir() -> Path:
    from saeflow.models import cache_dir
    return cache_dir() / "suites" / STARTER_NAME


@contextmanager
def _folder_lock(folder: Path):
    """Only one process trains into ``folder`` at a time; others wait for it."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"saeflow: another process is training {folder}; waiting for it to finish")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def is_complete(folder: Path) -> bool:
    return (Path(folder) / SUITE_JSON).exists()


def ensure_trained(folder: Path, sites, cfg: TrainConfig, model_spec: str = "smollm2",
                   device: str = "cpu", dtype: str = "bfloat16", name: str | None = None,
                   resume: bool = True, progress: bool = True) -> Path:
    """Train a suite into ``folder`` unless it is already complete there (process-safe)."""
    from saeflow.models import load_model
    folder = Path(folder)
    if is_complete(folder):
        return folder
    with _folder_lock(folder):
        if is_complete(folder):  # another process finished it while we waited
            return folder
        lm = load_model(model_spec, device=device, dtype=dtype)
        return train_suite(lm, sites, cfg, folder, model_spec=model_spec, name=name,
                           resume=resume, progress=progress)


def ensure_starter_suite(device: str = "cpu") -> Path:
    """The SmolLM2 starter suite (all 30 layers x res, mlp, att); trained on first use."""
    folder = starter_dir()
    if is_complete(folder):
        return folder
    cfg = STARTER_CONFIG
    print(f"saeflow: training the starter suite first. No pretrained SAEs ship for the embedded "
          f"model (SmolLM2-135M), so saeflow trains its own: 90 TopK SAEs (30 layers x res, "
          f"mlp, att; width {cfg.width}, k {cfg.k}) on {cfg.tokens:,} tokens of bundled text. "
          f"This takes about 15 minutes on 2 free CPU cores (longer when the machine is busy), "
          f"once; the result is cached in "
          f"{folder} and an interrupted run resumes where it stopped.")
    return ensure_trained(folder, "all", cfg, "smollm2", device=device, name=STARTER_NAME)


def train_quick(out_dir: str | Path, sites: str = "0-3/res,0-3/mlp,0-3/att",
                tokens: int = 20_000, model_spec: str = "smollm2", device: str = "cpu",
                progress: bool = True, **overrides) -> Path:
    """A small suite for demos and CI (a few layers, few tokens), trained into ``out_dir``
    unless it is already there. ``overrides`` are TrainConfig fields."""
    cfg = dataclasses.replace(STARTER_CONFIG, tokens=tokens, checkpoint_every=10**9,
                              eval_tokens=2048, eval_loss_tokens=1024, **overrides)
    return ensure_trained(Path(out_dir), sites, cfg, model_spec, device=device,
                          name=Path(out_dir).name, progress=progress)


def discard_run(folder: Path) -> None:
    """Remove a checkpoint and any SAE folders of an unfinished run."""
    folder = Path(folder)
    _cleanup(folder)
    if folder.exists() and not is_complete(folder):
        for sub in folder.iterdir():
            if sub.is_dir() and (sub / "cfg.json").exists():
                shutil.rmtree(sub)
