"""Compatibility name for ``saeflow.io`` (atomic files and folders, locks, checkpoints)."""

from saeflow.io import (atomic_dir, atomic_path, file_lock, save_checkpoint, temp_dir,
                        write_bytes, write_json_atomic, write_text)

__all__ = ["atomic_dir", "atomic_path", "file_lock", "save_checkpoint", "temp_dir",
           "write_bytes", "write_json_atomic", "write_text"]
