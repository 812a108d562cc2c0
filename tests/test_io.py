"""Atomic writes: all or nothing, and files as readable as a plain open() would make them."""

import os
import stat

import pytest

from bt_keras.files import atomic_write, atomic_write_json


def test_atomic_write_gives_the_umask_mode_not_mkstemp_private_mode(tmp_path):
    previous = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "result.json", {"top1": 0.5})
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "result.json").stat().st_mode) == 0o644


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "encoder.json"
    atomic_write_json(target, {"step": 1})

    def crash(tmp):
        with open(tmp, "w") as f:
            f.write('{"step": 2, "trunc')
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        atomic_write(target, crash)
    assert target.read_text().strip().endswith("}") and '"step": 1' in target.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["encoder.json"]
