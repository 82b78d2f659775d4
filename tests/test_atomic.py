"""Outputs are written whole or not at all, with ordinary permissions."""

import os

import pytest

from saeflow.atomic import atomic_path, write_json_atomic, write_text


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
