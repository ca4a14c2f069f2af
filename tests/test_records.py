"""The atomic write helpers every stage's outputs go through: a file or folder appears whole
or not at all, and a failed write leaves the old one and no temp behind."""

from __future__ import annotations

import pytest

from pipeline.core.records import atomic_folder, atomic_path


class Boom(RuntimeError):
    pass


def test_atomic_path_replaces_the_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "sub" / "out.bin"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp != target
        tmp.write_bytes(b"new")
        assert not target.exists()  # nothing visible until the block ends
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.bin"]


def test_atomic_path_keeps_the_old_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(Boom), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise Boom
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_atomic_path_fixed_temp_name(tmp_path):
    target = tmp_path / "out.bin"
    with atomic_path(target, tmp_name=".shared.tmp") as tmp:
        assert tmp.name == ".shared.tmp"
        tmp.write_bytes(b"x")
    assert target.read_bytes() == b"x"


def test_atomic_folder_replaces_the_whole_folder(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "stale.bin").write_bytes(b"old")
    with atomic_folder(folder) as tmp:
        assert tmp.is_dir() and not any(tmp.iterdir())
        (tmp / "weights.bin").write_bytes(b"new")
        assert (folder / "stale.bin").exists()  # the old folder stays until the block ends
    assert sorted(p.name for p in folder.iterdir()) == ["weights.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_atomic_folder_keeps_the_old_folder_when_the_save_fails(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"old")
    with pytest.raises(Boom), atomic_folder(folder) as tmp:
        (tmp / "weights.bin").write_bytes(b"half")
        raise Boom
    assert (folder / "weights.bin").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
