"""bt_keras.files: atomic writes (all or nothing, and files as readable as a plain open() would make them), trees
shared under the umask, and telling a full disk from other errors."""

import errno
import os
import stat
from pathlib import Path

import pytest
import tensorflow as tf

from bt_keras import files
from bt_keras.files import atomic_write, atomic_write_json, current_umask, share_tree


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


@pytest.mark.hostile
def test_share_tree_respects_a_stricter_umask(tmp_path):
    import tempfile

    previous = os.umask(0o027)
    try:
        assert current_umask() == 0o027
        staged = Path(tempfile.mkdtemp(dir=tmp_path))  # 0700, as export stages versions
        (staged / "sub").mkdir()
        fd, name = tempfile.mkstemp(dir=staged / "sub")  # 0600
        os.close(fd)
        share_tree(staged)
    finally:
        os.umask(previous)
    assert [staged.stat().st_mode & 0o777, (staged / "sub").stat().st_mode & 0o777,
            Path(name).stat().st_mode & 0o777] == [0o750, 0o750, 0o640]


@pytest.mark.hostile
def test_is_disk_full_reads_errno_chains_and_tensorflow_messages():
    assert files.is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert files.is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    try:
        try:
            raise OSError(errno.ENOSPC, "full")
        except OSError as inner:
            raise ValueError("could not save the model") from inner
    except ValueError as outer:
        assert files.is_disk_full(outer)
    assert files.is_disk_full(tf.errors.ResourceExhaustedError(None, None, "ckpt-9_temp/part: No space left on device"))
    assert not files.is_disk_full(tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor"))
    assert not files.is_disk_full(OSError(errno.EACCES, "Permission denied"))
