"""The optional Ray back end (``--ray [ADDRESS]`` on ``steer-eval``, ``deactivate`` and
``atlas``; ``pip install 'saeflow[ray]'``): independent units of a run go out as Ray tasks, and
their results come back to this process, which saves each one as it arrives.

  - steer-eval: one unit per cell (theme x mode x layer x coefficient, over the prompts and
    seeds of its stage): ``evaluate.generate_cell`` on the worker; scoring and
    ``results.json`` (rewritten after every cell, in sweep order) here;
  - deactivate: a layer's block re-runs of edited rows (most of the work), dealt to
    ``units`` units by batch (``block_edits.iter_edited_acts(part=...)``: the same batches as
    the whole run, since a row's last bits depend on its batch, so they are never split by
    text); each unit's values are saved in ``checkpoints/units/``, a finished layer in
    ``checkpoints/layer-L.json`` as a local run saves it. The clean pass, the Pearson baseline,
    the choice of pairs and the summary run here;
  - atlas: one unit per layer's matching (``saeflow.atlas``'s ``_match_layer``); the layer
    folder is written here, atomically, and the labels and the classification are computed
    here afterwards by ``compute_atlas``, which finds every layer done.

A worker opens the model and suite once (``SuiteLoader`` by name on the worker's machine, or
``Given`` objects shipped from here) and keeps them for every unit it runs. A worker that dies
loses only its unit: Ray runs it again (``max_retries``; no scheduler of ours), and a killed
run resumes from what was saved. Results equal the local run's: units are seeded on their
own, and every merge keeps the local order. Ray is imported here only, when a run asks for it.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RETRIES = 3  # how often Ray re-runs a unit whose worker died
_LOADED: dict = {}  # in a worker process: the run key -> (lm, suite) it opened


@dataclass(frozen=True)
class SuiteLoader:
    """What a worker opens once, on its own machine: a suite by name (``catalog.load_suite``)
    and its model; ``lm=None``: the model only when the suite has att_z SAEs (an atlas)."""
    suite: str
    model: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    lm: bool | None = True

    def __post_init__(self):  # a relative path: the same file from a worker's own folder
        from saeflow.catalog import PROFILE_NAMES, STARTER_NAMES
        for name in ("suite", "model"):
            v = getattr(self, name)
            if v and v not in (*STARTER_NAMES, *PROFILE_NAMES) and Path(v).exists():
                object.__setattr__(self, name, str(Path(v).resolve()))

    def __call__(self):
        from saeflow.catalog import load_suite
        suite = load_suite(self.suite, model=self.model)
        need = self.lm if self.lm is not None else any(s.kind == "att_z" for s in suite.sites())
        return (suite.load_model(device=self.device, dtype=self.dtype) if need else None), suite


class Given:
    """A model and suite already in memory, shipped once to each worker (library use, tests)."""

    def __init__(self, lm, suite):
        self.lm, self.suite = lm, suite

    def __call__(self):
        return self.lm, self.suite


def _ray():
    try:
        import ray
    except ImportError:
        raise ImportError("--ray needs Ray: pip install 'saeflow[ray]' (or pip install ray)"
                          ) from None
    return ray


def _unit(key: str, boxed_loader: list, fn, args, unit):
    """A unit on a worker: open the model and suite on the first unit of this run, then reuse."""
    if key not in _LOADED:
        _LOADED.clear()  # another run's objects
        loader: Any = _ray().get(boxed_loader[0])
        _LOADED[key] = loader()
    lm, suite = _LOADED[key]
    return fn(lm, suite, *args, unit)


class Pool:
    """Ray workers for one run. ``address``: None or "local" starts a Ray on this machine
    (kept when one is already running in this process), "auto" or ``host:port`` joins a
    cluster (``ray start --head``). A loader with a cuda device asks one GPU per worker."""

    def __init__(self, address: str | None, loader, num_cpus: float = 1):
        ray = _ray()
        if not ray.is_initialized():
            ray.init(address=None if address in (None, "local") else address,
                     include_dashboard=False, log_to_driver=False)
        gpu = str(getattr(loader, "device", "cpu")).startswith("cuda")
        self._task = ray.remote(num_cpus=num_cpus, num_gpus=1 if gpu else 0,
                                max_retries=RETRIES, retry_exceptions=False,
                                max_calls=0)(_unit)  # a worker keeps its model between units
        self._loader = ray.put(loader)
        self._key = uuid.uuid4().hex

    def map(self, fn, args: tuple, units, desc: str = "units") -> Iterator[tuple]:
        """``(unit, fn(lm, suite, *args, unit))`` for every unit, as they finish."""
        from tqdm.auto import tqdm
        ray = _ray()
        shared = ray.put(args)
        pending = {self._task.remote(self._key, [self._loader], fn, shared, u): u for u in units}
        bar = tqdm(total=len(pending), desc=f"{desc} (ray)", unit="unit")
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                unit = pending.pop(ready[0])
                yield unit, ray.get(ready[0])
                bar.update()
        finally:
            bar.close()
            for ref in pending:  # stopped early (an error here or in a unit)
                ray.cancel(ref)

    def fan_out(self, desc: str = "cells"):
        """The ``fan_out`` of ``evaluate.run_sweep`` / ``run_heldout``."""
        return lambda fn, args, units: self.map(fn, args, units, desc)


# ---- deactivation: a layer's block re-runs in parts -----------------------------------------
def _rerun_unit(lm, suite, prev, edits, layer, row, tgt_idx, batch_tokens, part):
    from saeflow.deactivate import probe_values
    from saeflow.sites import Site
    prev = [x.to(lm.device) for x in prev]  # shipped on the CPU: a worker has its own device
    return probe_values(lm, prev, edits, layer, suite[Site(layer, "res")], batch_tokens, row,
                        tgt_idx, part=part)


def deactivation_fan_out(pool: Pool, cfg, units: int, checkpoint_dir: str | Path | None = None):
    """The ``fan_out`` of ``deactivate.run_deactivation``: each layer's batches of block
    re-runs dealt to ``units`` units (batch i to unit i mod units); each unit's probe values
    are saved under ``checkpoint_dir/units`` and reused by a re-run with the same key."""
    import numpy as np

    from saeflow.io import atomic_path
    if units < 1:
        raise ValueError(f"Ray units per layer must be >= 1, got {units}")
    folder = Path(checkpoint_dir) / "units" if checkpoint_dir else None

    def rerun(key: str, prev, edits, layer: int, row, tgt_idx):
        todo = []
        for i in range(units):
            f = folder / f"layer-{layer}-part-{i}-of-{units}.npz" if folder else None
            saved = None
            if f and f.exists():
                with np.load(f) as d:
                    saved = (d["probes"], d["z"], d["pre"]) if str(d["key"]) == key else None
            if saved is None:
                todo.append((i, units))
            else:
                yield saved
        args = ([x.cpu() for x in prev], [e._replace(delta=e.delta.cpu()) for e in edits],
                layer, row, tgt_idx, cfg.batch_tokens)
        for (i, n), (probes, z, pre) in pool.map(_rerun_unit, args, todo, f"layer {layer}"):
            if folder:
                folder.mkdir(parents=True, exist_ok=True)
                with atomic_path(folder / f"layer-{layer}-part-{i}-of-{n}.npz") as tmp:
                    with open(tmp, "wb") as fh:
                        np.savez(fh, key=key, probes=probes, z=z, pre=pre)
            yield probes, z, pre
    return rerun


# ---- atlas: one unit per layer's matching ---------------------------------------------------
def _atlas_unit(lm, suite, opts: dict, null_suite, layer: int) -> dict[str, bytes]:
    from saeflow.atlas import _match_layer
    from saeflow.match import Operand, resolve_precision, residual_decoder
    from saeflow.sites import Site
    from saeflow.sources import layer_sources
    dirs = residual_decoder(suite, Site(layer, "res"))
    R = Operand.cosine(dirs, resolve_precision(opts["precision"], dirs.shape[1]))
    with tempfile.TemporaryDirectory() as tmp:
        part = Path(tmp) / "layers" / f"{layer:03d}"
        _match_layer(suite, lm, layer, layer_sources(suite.sites())[layer], R, None, part,
                     k=opts["k"], block=opts["block"], null_samples=opts["null_samples"],
                     seed=opts["seed"], null_suite=null_suite)
        return {p.name: p.read_bytes() for p in part.iterdir()}


def atlas_layers(pool: Pool, suite, out: str | Path, *, k: int, block: int, precision: str,
                 null_samples: int, null_suite=None, cache: bool = False) -> int:
    """Match the layers of ``suite`` missing from the atlas folder ``out`` on the workers and
    write each layer folder as it arrives; returns how many were computed. ``compute_atlas``
    (or ``ensure_atlas``, ``cache=True``) then finds them done. A folder holding another
    atlas is left to those to refuse (``--out``) or replace (the cache)."""
    from saeflow import atlas as am
    from saeflow.io import file_lock, temp_dir, write_json_atomic
    from saeflow.sources import layer_sources
    defaults = inspect.signature(am.compute_atlas).parameters
    seed, label_tokens = defaults["seed"].default, defaults["label_tokens"].default
    out = Path(out)
    settings = am._settings(suite, k, null_samples, seed, label_tokens, null_suite)
    path = out / am.SETTINGS_JSON
    if path.exists() and json.loads(path.read_text()) != settings:
        if not cache:
            return 0  # compute_atlas says what is there and what to do
        from saeflow.contexts import CONTEXTS_FILE
        same = json.loads(path.read_text()).get("fingerprint") == settings["fingerprint"]
        for p in out.iterdir():  # our own cache of other settings, cleared as ensure_atlas does
            if not (same and p.name == CONTEXTS_FILE):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    todo = [L for L in layer_sources(suite.sites())
            if not (out / "layers" / f"{L:03d}" / "part.json").exists()]
    if not todo:
        return 0
    opts = dict(k=k, block=block, precision=precision, null_samples=null_samples, seed=seed)
    with file_lock(out / ".lock", f"waiting for another process computing the atlas in {out}"):
        if not path.exists():
            write_json_atomic(path, settings)
        for layer, files in pool.map(_atlas_unit, (opts, null_suite), todo, "atlas layers"):
            tmp = temp_dir(out, prefix=f".{layer:03d}.")  # what compute_atlas clears if left
            for name, data in files.items():
                (tmp / name).write_bytes(data)
            part = out / "layers" / f"{layer:03d}"
            if part.exists():  # the rest of a layer that never finished
                shutil.rmtree(part)
            part.parent.mkdir(exist_ok=True)
            os.replace(tmp, part)
    return len(todo)
