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
  - checkpoints every ``checkpoint_every`` forwards, once ``checkpoint_minutes`` of training
    have passed since the last one (atomic), hold everything that determines the rest of the
    run (weights, Adam state, scales, dead counters, buffers, step); resuming reproduces the
    uninterrupted run bit for bit, wherever the checkpoint fell.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import torch

from saeflow.hooks import SiteTaps
from saeflow.io import file_lock, save_checkpoint, write_json_atomic
from saeflow.models import dtype_name
from saeflow.sae import SAE
from saeflow.sites import Site, parse_sites
from saeflow.suite import SUITE_JSON
from saeflow.topk import TopKTrainer, bf16_matmul_is_fast, tune_malloc
from saeflow.trainconfig import (GPU_CONFIG, PROFILES, RESULT_FIELDS, STANDARD_CONFIG,  # noqa: F401
                                 STARTER_CONFIG, Profile, TrainConfig, profile)

CHECKPOINT = ".checkpoint.pt"
TRAINED = ".trained.json"  # SAEs written, evaluation pending


def _matmul_dtype(cfg: TrainConfig, d: int, device: torch.device) -> torch.dtype:
    if cfg.matmul == "auto":
        if device.type == "cuda":
            return torch.bfloat16
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


@contextmanager
def _stop_requests():
    """While training runs in the main thread, a first Ctrl-C (SIGINT) or a SIGTERM only asks
    to stop: the loop writes a checkpoint at the next forward boundary and then raises
    ``KeyboardInterrupt``. A second Ctrl-C stops at once. Yields the list of signals received."""
    import signal
    import threading
    asked: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield asked  # signals are only delivered to the main thread
        return

    def ask(signum, frame):
        if asked:
            raise KeyboardInterrupt
        asked.append(signum)
        print("\nsaeflow: stopping after this forward to write a checkpoint (Ctrl-C again to "
              "stop at once and resume from the last one)", flush=True)

    old = {sig: signal.signal(sig, ask) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield asked
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


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


SEED_SUFFIX = "@seed2"  # the second-seed replica of a site, for cross-seed stability


def _seed_sites(cfg: TrainConfig, sites: list[Site], n_layers: int | None) -> list[Site]:
    """The sites of ``cfg.seed_sites`` that are trained (a profile's replicas of sites a run
    leaves out are skipped)."""
    named = parse_sites(cfg.seed_sites, n_layers) if cfg.seed_sites else []
    return sorted(s for s in set(named) if s in sites)


def make_trainers(cfg: TrainConfig, sites: list[Site], d: int, device="cpu",
                  matmul_dtype: torch.dtype = torch.float32,
                  n_layers: int | None = None) -> dict[str, tuple[Site, TopKTrainer]]:
    """One trainer per site (keyed ``"12/res"``) plus a second-seed replica for each of
    ``cfg.seed_sites`` (keyed ``"12/res@seed2"``). Every trainer has its own seed: nothing is
    shared or tied between sites (see docs/training.md, "Nothing couples the sites")."""
    def make(seed):
        return TopKTrainer(d, cfg.width, cfg.k, k_aux=cfg.k_aux, aux_coef=cfg.aux_coef,
                           dead_tokens=cfg.dead_tokens, outlier_factor=cfg.outlier_factor,
                           seed=seed, matmul_dtype=matmul_dtype, device=device,
                           buffer_rows=cfg.buffer_tokens, kernels=cfg.kernels)
    out = {str(s): (s, make(cfg.seed * 100_003 + i)) for i, s in enumerate(sites)}
    extra = _seed_sites(cfg, sites, n_layers)
    for i, s in enumerate(extra):
        out[str(s) + SEED_SUFFIX] = (s, make(cfg.seed * 100_003 + 50_000 + i))
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
    mm_dtype = _matmul_dtype(cfg, d, lm.device)
    trainers = make_trainers(cfg, sites, d, lm.device, mm_dtype, lm.n_layers)
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
    step, elapsed, cpu = 0, 0.0, 0.0  # step counts model forwards
    if ckpt.exists() and resume:
        state = torch.load(ckpt, weights_only=False)
        if state["settings"] != _settings(cfg) or state["sites"] != [str(s) for s in sites]:
            diff = [k for k in RESULT_FIELDS if state["settings"].get(k) != getattr(cfg, k)]
            raise ValueError(f"{ckpt}: an interrupted run with other settings "
                             f"({', '.join(diff) or 'sites'}) is in this folder; use another "
                             "--out or restart it (--restart, resume=False)")
        for key, (_, t) in trainers.items():
            t.load_state_dict(state["trainers"][key])
        step, elapsed, cpu = state["step"], state["elapsed"], state.get("cpu", 0.0)
        torch.set_rng_state(state["rng"])
        if progress:
            print(f"saeflow: resuming {out_dir} at forward {step}/{cfg.forwards}")
    batches = token_batches(lm.tokenizer, cfg.seq_len, cfg.seqs_per_batch, cfg.source, "train",
                            seed=cfg.seed, repeat=True, start=step)
    shown = _progress_sites(sites)
    ema: dict[str, float] = {}  # per trainer key (second-seed replicas apart)
    taps = SiteTaps(lm, sites)
    tok_per_step = cfg.seqs_per_batch * cfg.seq_len
    spf = cfg.steps_per_forward
    rows_per_step = cfg.sae_batch or tok_per_step
    bar = tqdm(total=cfg.forwards * tok_per_step, initial=step * tok_per_step, unit="tok",
               unit_scale=True, desc=f"training {len(sites)} SAEs", disable=not progress,
               smoothing=0.1)

    def forward(ids):
        with torch.no_grad():
            return taps.record(ids)

    def sae_steps(args):
        key, h, first = args
        with torch.no_grad():
            _, t = trainers[key]
            if t.buffer is None:
                return key, t.step(t.prepare(h), cfg.lr_at(first)).loss
            t.add(h)
            loss = 0.0
            for j in range(spf):
                loss = t.step(t.sample(rows_per_step), cfg.lr_at(first + j)).loss
            return key, loss

    def checkpoint():
        save_checkpoint(ckpt, {"settings": _settings(cfg), "sites": [str(s) for s in sites],
                                "step": step, "elapsed": elapsed, "cpu": cpu,
                                "rng": torch.get_rng_state(),
                                "trainers": {k: t.state_dict() for k, (_, t) in trainers.items()}})

    tune_malloc()
    saved_at = time.perf_counter()  # the last checkpoint (or the start of this process's run)
    with _single_threaded_ops(), taps.installed(), \
            ThreadPoolExecutor(max_workers=cfg.workers) as pool, _stop_requests() as stop:
        while step < cfg.forwards and not stop:
            t0, c0 = time.perf_counter(), time.process_time()
            ids = next(batches)
            parts = list(pool.map(forward, ids.chunk(min(cfg.workers, ids.shape[0]))))
            acts = {s: torch.cat([p[s] for p in parts]) for s in sites}
            work = [(key, acts[s], step * spf) for key, (s, _) in trainers.items()]
            for key, loss in pool.map(sae_steps, work):
                ema[key] = loss if key not in ema else 0.9 * ema[key] + 0.1 * loss
            del acts, parts, work
            step += 1
            elapsed += time.perf_counter() - t0
            cpu += time.process_time() - c0
            if step % cfg.checkpoint_every == 0 and step < cfg.forwards and \
                    time.perf_counter() - saved_at >= 60 * cfg.checkpoint_minutes:
                checkpoint()
                saved_at = time.perf_counter()
            bar.update(tok_per_step)
            post = {"loss": f"{sum(ema.values()) / len(ema):.3f}"}
            post.update({str(s): f"{ema[str(s)]:.3f}" for s in shown})
            bar.set_postfix(post, refresh=False)
            if on_step is not None:
                on_step(step)
        if stop and step > 0:
            checkpoint()
    bar.close()
    if stop:
        print(f"saeflow: checkpoint written at forward {step}/{cfg.forwards} in {ckpt}; the "
              "same command resumes from it", flush=True)
        raise KeyboardInterrupt
    saes = _write_saes(lm, trainers, cfg, out_dir, spec)
    timing = {"elapsed": elapsed, "cpu": cpu,
              "matmul_dtype": dtype_name(mm_dtype),
              "kernels": "numba" if next(iter(trainers.values()))[1].compiled else "torch"}
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


SEEDS_DIR = "seeds"  # second-seed replicas (cross-seed stability), one SAELens folder each


def _write_saes(lm, trainers: dict, cfg: TrainConfig, out_dir: Path,
                model_spec: str) -> dict[Site, SAE]:
    from saeflow.formats import save_saelens
    saes = {}
    for key, (s, t) in trainers.items():
        meta = {"saeflow_training": {**_settings(cfg), "trained_tokens": t.tokens,
                                     "steps": t.steps, "init_seed": t.seed,
                                     "input_scale": t.scale, "outlier_max_norm": t.max_norm,
                                     "model_dtype": dtype_name(lm.dtype),
                                     "model_spec": model_spec},
                "decoder_rows": "norm = 1/input_scale (unit norm in the training space)"}
        sae = t.sae(s, meta)
        replica = key.endswith(SEED_SUFFIX)
        save_saelens(sae, out_dir / SEEDS_DIR / s.slug if replica else out_dir / s.slug,
                     model_name=lm.name, extra=meta)
        if not replica:
            saes[s] = sae
    return saes


def _seed_replicas(out_dir: Path, cfg: TrainConfig, n_layers: int) -> dict[Site, SAE]:
    from saeflow.formats import load_sae
    sites = parse_sites(cfg.seed_sites, n_layers) if cfg.seed_sites else []
    return {s: load_sae(out_dir / SEEDS_DIR / s.slug, s) for s in sorted(set(sites))
            if (out_dir / SEEDS_DIR / s.slug).exists()}


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
    from saeflow import convergence
    from saeflow.suite import Suite
    conv = convergence.report(Suite.from_saes(saes), _seed_replicas(out_dir, cfg, lm.n_layers))
    convergence.plot(conv, out_dir / "convergence.png", title=f"{name}: adjacent-layer matching")
    if progress:
        print(convergence.format_report(conv))
    elapsed, cpu = timing["elapsed"], timing.get("cpu", 0.0)
    tokens = cfg.forwards * cfg.seqs_per_batch * cfg.seq_len
    info = {"model": model_spec, "name": name, "model_name": lm.name,
            "sites": [str(s) for s in sorted(saes)],
            "training": {**dataclasses.asdict(cfg), "forwards": cfg.forwards, "steps": cfg.steps,
                         "rows_per_step": cfg.sae_batch or cfg.seqs_per_batch * cfg.seq_len,
                         "tokens_trained": tokens, "wall_seconds": round(elapsed, 1),
                         "tokens_per_second": round(tokens / max(elapsed, 1e-9), 1),
                         # CPU time of all threads: wall time on `workers` free cores is about
                         # cpu_seconds / workers, whatever else the machine was doing
                         "cpu_seconds": round(cpu, 1),
                         "cpu_seconds_per_1k_tokens": round(1000 * cpu / max(tokens, 1), 2),
                         "encoder_matmul_dtype": timing.get("matmul_dtype"),
                         "step_kernels": timing.get("kernels"),
                         "model_dtype": dtype_name(lm.dtype)},
            "quality": quality.rows_to_json(rows), "quality_summary": quality.summarize(rows),
            "convergence": conv}
    write_json_atomic(out_dir / SUITE_JSON, info)


# ---- named suites by budget (saeflow.trainconfig.PROFILES) -----------------------------
def starter_dir() -> Path:
    return PROFILES["starter"].folder


def is_complete(folder: Path) -> bool:
    return (Path(folder) / SUITE_JSON).exists()


def _stale(folder: Path, cfg: TrainConfig) -> list[str]:
    """Settings in which a complete suite in ``folder`` differs from ``cfg``."""
    done = json.loads((folder / SUITE_JSON).read_text()).get("training", {})
    return [f for f in RESULT_FIELDS if done.get(f, getattr(TrainConfig, f, None)) !=
            getattr(cfg, f)]


def ensure_trained(folder: Path, sites, cfg: TrainConfig, model_spec: str = "smollm2",
                   device: str = "cpu", dtype: str = "auto", name: str | None = None,
                   resume: bool = True, progress: bool = True) -> Path:
    """Train a suite into ``folder`` unless it is already complete there (process-safe), on
    the activations of the model in ``dtype`` (``auto``: ``compute.model_dtype``, bf16 where
    bf16 products are fast, else fp32)."""
    from saeflow.compute import model_dtype
    from saeflow.models import load_model
    folder = Path(folder)
    if is_complete(folder):
        return folder
    with file_lock(folder.parent / f".{folder.name}.lock",
                   waiting=f"another process is training {folder}; waiting for it to finish"):
        if is_complete(folder):  # another process finished it while we waited
            return folder
        lm = load_model(model_spec, device=device, dtype=model_dtype(dtype, device))
        return train_suite(lm, sites, cfg, folder, model_spec=model_spec, name=name,
                           resume=resume, progress=progress)


def ensure_profile_suite(name: str = "starter", device: str | None = None,
                         progress: bool = True) -> Path:
    """The suite of a named profile, trained on first use and cached. A cached suite trained
    with other settings (an older recipe) is retrained, with a message saying why."""
    prof = profile(name)
    folder = prof.folder
    cfg = prof.config
    if is_complete(folder):
        stale = _stale(folder, cfg)
        if not stale:
            return folder
        print(f"saeflow: the cached {name} suite in {folder} was trained with other settings "
              f"({', '.join(stale)}); training the current recipe instead")
        (folder / SUITE_JSON).unlink()
        discard_run(folder)
    tokens = cfg.tokens
    print(f"saeflow: training the {name} suite first. No pretrained SAEs ship for the embedded "
          f"model (SmolLM2-135M), so saeflow trains its own: TopK SAEs at every res, mlp and "
          f"att site (width {cfg.width}, k {cfg.k}) on {tokens:,} tokens of bundled text, each "
          f"token used {cfg.reuse:g} times. This takes {prof.about} (longer when the machine "
          f"is busy), once; the result is cached in {folder} and an interrupted run resumes "
          f"where it stopped.")
    return ensure_trained(folder, prof.sites, cfg, prof.model, device=device or prof.device,
                          name=f"{prof.model}-{name}", progress=progress)


def ensure_starter_suite(device: str = "cpu") -> Path:
    """The SmolLM2 starter suite (all 30 layers x res, mlp, att); trained on first use."""
    return ensure_profile_suite("starter", device)


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
            if sub.is_dir() and ((sub / "cfg.json").exists() or sub.name == SEEDS_DIR):
                shutil.rmtree(sub)
