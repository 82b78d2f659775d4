"""Outputs are written whole or not at all, with ordinary permissions; locks; checkpoints."""

import os

import pytest

from saeflow.io import (atomic_dir, atomic_path, file_lock, save_checkpoint, temp_dir,
                        write_json_atomic, write_text)


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "out" / "table.csv"
    write_text(target, "old\n")
    with pytest.raises(RuntimeError, match="interrupted"):
        with atomic_path(target) as tmp:
            tmp.write_text("half a ro")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["table.csv"]


def test_temporary_keeps_the_suffix_and_result_follows_umask(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "plot.png") as tmp:
            assert tmp.suffix == ".png" and tmp.parent == tmp_path  # writers go by the suffix
            tmp.write_bytes(b"png")
        write_json_atomic(tmp_path / "a" / "b.json", {"x": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "plot.png").stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
    assert (tmp_path / "a" / "b.json").read_text() == '{\n  "x": 1\n}'


def _with_umask(mask, fn):
    old = os.umask(mask)
    try:
        return fn()
    finally:
        os.umask(old)


def test_atomic_folder_replaces_the_old_one_with_ordinary_permissions(tmp_path):
    target = tmp_path / "sae"
    target.mkdir()
    (target / "old.txt").write_text("old")

    def write():
        with atomic_dir(target) as tmp:
            assert tmp.parent == tmp_path and tmp.name.startswith(".sae.")
            (tmp / "cfg.json").write_text("{}")
    _with_umask(0o022, write)
    assert sorted(p.name for p in target.iterdir()) == ["cfg.json"]
    assert target.stat().st_mode & 0o777 == 0o755  # not mkdtemp's 0700
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]


def test_failed_folder_write_keeps_the_old_folder(tmp_path):
    target = tmp_path / "layer"
    target.mkdir()
    (target / "part.json").write_text("old")
    with pytest.raises(RuntimeError, match="interrupted"):
        with atomic_dir(target) as tmp:
            (tmp / "part.json").write_text("half")
            raise RuntimeError("interrupted")
    assert (target / "part.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layer"]


def test_temp_dir_follows_umask(tmp_path):
    tmp = _with_umask(0o027, lambda: temp_dir(tmp_path / "new", prefix=".x."))
    assert tmp.parent == tmp_path / "new" and tmp.stat().st_mode & 0o777 == 0o750


def test_saved_sae_folders_are_readable_by_others(tmp_path):
    """Every SAE folder saeflow writes goes through atomic_dir (it used to be mode 0700)."""
    import torch

    from saeflow.formats import save_saelens
    from saeflow.sae import SAE
    from saeflow.sites import Site
    W = torch.randn(8, 4)
    sae = SAE(W_enc=W.T.contiguous(), b_enc=torch.zeros(8), W_dec=W, b_dec=torch.zeros(4),
              site=Site(0, "res"))
    folder = _with_umask(0o022, lambda: save_saelens(sae, tmp_path / "0-res"))
    assert folder.stat().st_mode & 0o777 == 0o755


def test_file_lock_excludes_a_second_holder(tmp_path):
    import fcntl
    lock = tmp_path / "sub" / ".lock"
    with file_lock(lock):
        with open(lock) as other:  # another open file description: must not get the lock
            with pytest.raises(BlockingIOError):
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with open(lock) as other:  # released at the end of the block
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_checkpoint_round_trip_and_no_temporary_left(tmp_path):
    import torch
    path = tmp_path / ".checkpoint.pt"
    save_checkpoint(path, {"step": 3, "w": torch.arange(4.0)})
    state = torch.load(path)
    assert state["step"] == 3 and torch.equal(state["w"], torch.arange(4.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".checkpoint.pt"]
