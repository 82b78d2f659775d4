"""Files and folders written whole or not at all, file locks and checkpoints.

Every output goes to a temporary name beside its target and is renamed over it only once
complete, so an interrupted run never leaves a half-written file or folder:
  - ``atomic_path(path)``: a temporary file path (``write_text``, ``write_bytes`` and
    ``write_json_atomic`` use it);
  - ``atomic_dir(path)``: a temporary folder that replaces ``path`` as a whole;
  - ``temp_dir(parent, prefix)``: a temporary folder for callers that rename it themselves.
Results get the permissions of an ordinary ``open``/``mkdir`` under the process umask (0644 /
0755 by default), not the 0600 / 0700 that ``mkstemp`` / ``mkdtemp`` give.

``file_lock(path)`` makes one process at a time work on something (others wait, after saying
so), and ``save_checkpoint(path, state)`` writes a ``torch.save`` checkpoint atomically.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_dir", "atomic_path", "file_lock", "save_checkpoint", "temp_dir",
           "write_bytes", "write_json_atomic", "write_text"]


def cache_dir() -> Path:
    """Where saeflow keeps converted models, trained suites and atlases
    (``$SAEFLOW_CACHE`` or ``~/.cache/saeflow``)."""
    return Path(os.environ.get("SAEFLOW_CACHE", Path.home() / ".cache" / "saeflow"))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _ordinary_mode(path: str | Path) -> None:
    """Give ``path`` the mode a plain ``open`` (file) or ``mkdir`` (folder) would have."""
    os.chmod(path, (0o777 if Path(path).is_dir() else 0o666) & ~_umask())


@contextmanager
def atomic_path(path: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without an error it replaces
    ``path`` (with the usual permissions, not mkstemp's 0600), otherwise it is deleted. The
    temporary name keeps ``path``'s suffix (or ``suffix``) for writers that go by it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.",
                               suffix=path.suffix if suffix is None else suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        _ordinary_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | Path, data) -> None:
    write_text(path, json.dumps(data, indent=2, default=str))


def temp_dir(parent: str | Path, prefix: str) -> Path:
    """A new empty folder inside ``parent`` (created if missing) with ordinary permissions."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    _ordinary_mode(tmp)
    return tmp


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; when the block ends without an error
    it replaces ``path`` (an existing folder there is removed first), otherwise it is
    deleted."""
    path = Path(path)
    tmp = temp_dir(path.parent, prefix=f".{path.name}.")
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def file_lock(path: str | Path, waiting: str = "") -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing) for the block. When another
    process holds it, print ``waiting`` (if given) to stderr and wait for it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting:
                print(f"saeflow: {waiting}", file=sys.stderr)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def save_checkpoint(path: str | Path, state: dict) -> None:
    """``torch.save(state)`` to ``path``, atomically."""
    import torch
    with atomic_path(path, suffix=".tmp") as tmp:
        torch.save(state, tmp)


def save_figure(fig, path: str | Path) -> Path:
    """Write a matplotlib figure as PNG atomically, then close it (also when saving fails)."""
    import matplotlib.pyplot as plt
    path = Path(path)
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return path
