"""Training settings and the named training profiles, without importing torch (the CLI builds
its ``saeflow train`` parser from them, and ``saeflow --help`` stays instant). The trainer
itself is ``saeflow.train``; docs/training.md explains every setting and how the profiles were
chosen."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TrainConfig:
    width: int = 2304  # latents per SAE
    k: int = 32
    tokens: int = 300_000  # model tokens to train on (every site sees all of them)
    batch_tokens: int = 1024  # tokens per model forward (rounded to sequences)
    seq_len: int = 256
    sae_batch: int = 0  # rows per SAE Adam step (0: batch_tokens, one step per forward)
    reuse: float = 1.0  # times each token is used on average (needs buffer_tokens > 0 if > 1)
    buffer_tokens: int = 0  # per-site shuffle buffer in tokens (0: train on each batch as is)
    lr: float = 2e-3
    warmup_steps: int = 10  # in SAE steps
    decay_frac: float = 0.2  # linear decay to 0 over this final fraction of the SAE steps
    k_aux: int = 64
    aux_coef: float = 1 / 32
    dead_tokens: int = 20_000  # a latent silent for this many training rows gets AuxK gradient
    outlier_factor: float = 10.0
    source: str = "default"
    seed: int = 0
    matmul: str = "auto"  # encoder matmul dtype: auto | bfloat16 | float32
    kernels: str = "auto"  # SAE step: auto (compiled on the CPU when numba is there) | numba | torch
    workers: int = 2
    checkpoint_every: int = 100  # model forwards
    # and at least this many minutes of training since the last checkpoint (0: forwards alone);
    # a checkpoint costs 12-60 s on a 2-core machine with a ~110 MB/s disk (docs/training.md);
    # Ctrl-C or SIGTERM writes one at the next forward whatever these say
    checkpoint_minutes: float = 0.0
    eval_tokens: int = 8192  # quality: tokens for FVU, L0, dead (0 skips the evaluation)
    eval_loss_tokens: int = 1024  # quality: tokens for loss recovered
    seed_sites: str = ""  # sites also trained with a second seed (cross-seed stability)

    def __post_init__(self):
        for name in ("width", "k", "tokens", "batch_tokens", "seq_len", "workers",
                     "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"training setting {name} must be >= 1, got {getattr(self, name)}")
        for name in ("sae_batch", "buffer_tokens", "checkpoint_minutes"):
            if getattr(self, name) < 0:
                raise ValueError(f"training setting {name} must be >= 0, got {getattr(self, name)}")
        if self.k > self.width:
            raise ValueError(f"k={self.k} must not exceed width={self.width}")
        if not self.lr > 0:
            raise ValueError(f"learning rate must be positive, got {self.lr}")
        if not self.reuse > 0:
            raise ValueError(f"reuse must be positive, got {self.reuse}")
        if self.buffer_tokens == 0 and (self.reuse != 1 or self.sae_batch not in
                                        (0, self.seqs_per_batch * self.seq_len)):
            raise ValueError("reuse != 1 or an SAE batch other than the model batch needs a "
                             "shuffle buffer (buffer_tokens > 0)")
        if self.matmul not in ("auto", "bfloat16", "float32"):
            raise ValueError(f"matmul must be auto, bfloat16 or float32, got {self.matmul!r}")
        if self.kernels not in ("auto", "numba", "torch"):
            raise ValueError(f"kernels must be auto, numba or torch, got {self.kernels!r}")

    @property
    def seqs_per_batch(self) -> int:
        return max(1, self.batch_tokens // self.seq_len)

    @property
    def forwards(self) -> int:
        """Model forward passes (each of ``seqs_per_batch`` sequences)."""
        return max(1, -(-self.tokens // (self.seqs_per_batch * self.seq_len)))

    @property
    def steps_per_forward(self) -> int:
        """SAE Adam steps each site takes after each forward."""
        if self.buffer_tokens == 0:
            return 1
        rows = self.sae_batch or self.seqs_per_batch * self.seq_len
        return max(1, round(self.reuse * self.seqs_per_batch * self.seq_len / rows))

    @property
    def steps(self) -> int:
        """SAE Adam steps per site over the run."""
        return self.forwards * self.steps_per_forward

    def lr_at(self, step: int) -> float:
        warm = min(1.0, (step + 1) / max(1, self.warmup_steps))
        decay_steps = max(1, int(self.steps * self.decay_frac))
        left = self.steps - step
        return self.lr * warm * min(1.0, left / decay_steps)


# Settings that change the result (the others only change speed or bookkeeping).
RESULT_FIELDS = ("width", "k", "tokens", "batch_tokens", "seq_len", "sae_batch", "reuse",
                 "buffer_tokens", "lr", "warmup_steps",
                 "decay_frac", "k_aux", "aux_coef", "dead_tokens", "outlier_factor", "source",
                 "seed", "matmul", "seed_sites")
# The starter: 300k tokens through a per-site shuffle buffer, 256-row Adam steps, each token
# used 1.5 times (1,764 steps per SAE; the old recipe took 293). Adam steps, not rows, were what
# mattered in bench/train_recipes.py (docs/training.md, "Recipe experiments").
# A checkpoint after every 30 minutes of training (each costs 40-60 s here: 3.8-4.7 GB at
# ~110 MB/s, docs/training.md), so the starter writes none and `standard` one; Ctrl-C or a
# SIGTERM writes one at the next forward, so only a hard kill loses up to half an hour.
STARTER_CONFIG = TrainConfig(tokens=300_000, batch_tokens=2048, sae_batch=256, reuse=1.5,
                             buffer_tokens=8192, checkpoint_every=1, checkpoint_minutes=30,
                             seed_sites="6/res,12/res,18/res")
# Every train-split token of the bundled corpus (~1.99M) through the model, 512-row steps, each
# row used 0.75 times on average (2,916 steps per SAE: 1.65x the starter's steps on 3.3x its
# rows), sized to about an hour by the idle benchmark's per-step costs; measured at 51 minutes
# for the command on 2 free cores (47.5 of training, one checkpoint) and estimated at about 61
# on a slower day of this machine (docs/training.md).
STANDARD_CONFIG = dataclasses.replace(STARTER_CONFIG, tokens=1_990_000, sae_batch=512,
                                      reuse=0.75, buffer_tokens=16_384)
# For a GPU: 50M tokens (the corpus repeated), large model batches, 4,096-row steps.
GPU_CONFIG = dataclasses.replace(STARTER_CONFIG, tokens=50_000_000, batch_tokens=16_384,
                                 sae_batch=4096, reuse=1.0, buffer_tokens=65_536, lr=1e-3,
                                 workers=1)


@dataclass(frozen=True)
class Profile:
    """A named training budget for the embedded model: what ``saeflow train --profile NAME``
    and a suite name like ``starter`` or ``standard`` mean."""
    name: str
    config: TrainConfig
    about: str  # budget, as measured (docs/training.md)
    sites: str = "all"
    model: str = "smollm2"
    device: str = "cpu"

    @property
    def folder(self) -> Path:
        from saeflow.io import cache_dir
        return cache_dir() / "suites" / f"{self.model}-{self.name}"


PROFILES = {p.name: p for p in (
    Profile("starter", STARTER_CONFIG, "about 17-20 minutes on 2 free CPU cores (15-18 "
                                       "of training, then the quality table)"),
    Profile("standard", STANDARD_CONFIG, "about 50-60 minutes on 2 free CPU cores"),
    Profile("gpu", GPU_CONFIG, "for a CUDA GPU (--device cuda); not timed here", device="cuda"),
)}


def profile(name: str) -> Profile:
    if name not in PROFILES:
        raise ValueError(f"unknown training profile {name!r}; known: {', '.join(PROFILES)}")
    return PROFILES[name]
