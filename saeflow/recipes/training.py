"""A training run (``saeflow train``; the trainer is ``saeflow.train``): a profile with the
user's changes, the folder it trains into (the profile's cache folder, or one named after the
settings), and continuing, requiring or discarding an interrupted run there."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import NamedTuple

from saeflow.recipes import Log


class TrainRun(NamedTuple):
    folder: Path
    reused: bool  # the folder already held a finished suite
    info: dict  # its suite.json


def default_out(model: str, sites: str, cfg, prof) -> Path:
    """The profile's folder for the profile's settings, else a cache folder named after them."""
    from saeflow.io import cache_dir
    from saeflow.trainconfig import RESULT_FIELDS
    same = all(getattr(cfg, f) == getattr(prof.config, f) for f in RESULT_FIELDS)
    if model == prof.model and sites == prof.sites and same:
        return prof.folder
    key = json.dumps({"model": model, "sites": sites,
                      **{f: getattr(cfg, f) for f in RESULT_FIELDS}}, sort_keys=True)
    tag = hashlib.sha1(key.encode()).hexdigest()[:8]
    model_tag = "".join(c if c.isalnum() else "_" for c in model.split("/")[-1])[:32]
    return cache_dir() / "suites" / f"{model_tag}-w{cfg.width}-k{cfg.k}-{tag}"


def train(profile: str = "starter", sites: str = "all", changes: dict | None = None,
          model: str | None = None, device: str = "cpu", dtype: str = "auto",
          out: str | None = None, resume: bool = False, restart: bool = False,
          progress: bool = True, log: Log = print) -> TrainRun:
    """Train (or continue, or reuse) the suite of ``profile`` with ``changes`` to its
    ``TrainConfig``; ``device`` "cpu" means the profile's device."""
    from saeflow.sites import parse_sites
    from saeflow.train import (CHECKPOINT, TRAINED, discard_run, ensure_trained, is_complete)
    from saeflow.trainconfig import profile as named_profile
    prof = named_profile(profile)
    cfg = dataclasses.replace(prof.config, **(changes or {}))
    model = model or prof.model
    device = prof.device if device == "cpu" else device
    parse_sites(sites, 10**6)  # syntax check before loading anything
    folder = Path(out).expanduser() if out else default_out(model, sites, cfg, prof)
    reused = is_complete(folder)
    if reused:
        log(f"saeflow train: {folder} already holds a trained suite (delete it or pick another "
            "--out to train again)")
    else:
        if restart:
            discard_run(folder)
        elif resume and not ((folder / CHECKPOINT).exists() or (folder / TRAINED).exists()):
            raise FileNotFoundError(f"--resume: no interrupted run in {folder} "
                                    f"(no {CHECKPOINT}); drop --resume to start one")
        log(f"saeflow train: {sites} of {model} -> {folder}\n  settings: "
            + ", ".join(f"{f.name}={getattr(cfg, f.name)}" for f in dataclasses.fields(cfg)))
        ensure_trained(folder, sites, cfg, model, device=device, dtype=dtype, name=folder.name,
                       progress=progress)
    return TrainRun(folder, reused, json.loads((folder / "suite.json").read_text()))
