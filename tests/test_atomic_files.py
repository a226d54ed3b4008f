"""fastsae.atomic_files: a reader sees the old content or the new, never a partial
file, and a failed write leaves the target and its folder as they were."""

import json

import pytest

from fastsae.atomic_files import atomic_write_json, atomic_write_text


def test_write_creates_parents_and_replaces(tmp_path):
    path = tmp_path / "a" / "b" / "x.json"
    atomic_write_json(path, {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1} and path.read_text().endswith("\n")
    atomic_write_text(path, "ünïcode")
    assert path.read_text(encoding="utf-8") == "ünïcode"
    assert [p.name for p in path.parent.iterdir()] == ["x.json"]  # no temporary left
    assert path.stat().st_mode & 0o777 == 0o644


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "x.json"
    atomic_write_json(path, [1, 2])
    with pytest.raises(TypeError):
        atomic_write_json(path, {"not json": object()})  # fails before anything is written
    with pytest.raises(TypeError):
        atomic_write_text(path, b"bytes")  # fails while writing the temporary file
    assert json.loads(path.read_text()) == [1, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]
