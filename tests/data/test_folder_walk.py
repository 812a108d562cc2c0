"""Folder datasets on hostile trees (bt_keras.data.folder_walk, as `sources` scans a folder): symlink loops and
self-links end, each file is listed once (also through hard links and links to other classes), in sorted order."""

import io
import os
import signal
import time
from pathlib import Path

import pytest
from PIL import Image

from bt_keras.data import sources
from bt_keras.data.folder_walk import FolderWalk

pytestmark = pytest.mark.hostile


def _png(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), colour).save(buffer, "PNG")
    return buffer.getvalue()


class _Timeout(Exception):
    pass


def _scan(root, seconds=20):
    """sources._scan_folder(root) under an alarm: a walk that never ends fails the test instead of hanging it."""

    def alarm(*_):
        raise _Timeout(f"the scan of {root} took over {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        return sources._scan_folder(Path(root))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _image_tree(root: Path, per_class=3):
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            (root / name / f"{i}.png").write_bytes(_png((i, 0, 0)))


def test_folder_scan_survives_a_self_link(tmp_path):
    _image_tree(tmp_path)
    os.symlink(".", tmp_path / "dog" / "again")  # dog/again/again/...: ~40 levels before ELOOP, each image 41 times
    os.symlink(".", tmp_path / "cat" / "x")  # two self-links: 2^40 paths, a scan that never ends
    os.symlink(".", tmp_path / "cat" / "y")
    paths, labels, classes, _ = _scan(tmp_path)
    assert classes == ("cat", "dog") and len(paths) == 6 and list(labels) == [0, 0, 0, 1, 1, 1], paths


def test_folder_scan_survives_a_loop_of_two_directories(tmp_path):
    _image_tree(tmp_path)
    (tmp_path / "cat" / "a").mkdir()
    (tmp_path / "cat" / "b").mkdir()
    (tmp_path / "cat" / "a" / "x.png").write_bytes((tmp_path / "cat" / "0.png").read_bytes())
    os.symlink("../b", tmp_path / "cat" / "a" / "to_b")
    os.symlink("../a", tmp_path / "cat" / "b" / "to_a")
    os.symlink(tmp_path / "cat" / "0.png", tmp_path / "dog" / "also_cat.png")  # one file, two places
    os.symlink(tmp_path / "cat", tmp_path / "dog" / "cats")  # a whole class again, under another one
    start = time.perf_counter()
    paths, labels, _, _ = _scan(tmp_path)
    assert time.perf_counter() - start < 5  # a hang bound, not a speed test: a followed loop never ends
    real = sorted(os.path.realpath(p) for p in paths)
    assert len(real) == len(set(real)) == 7, paths  # 3 + 1 (a/x.png) cat images, 3 dog images; each once
    assert list(labels).count(0) == 4


def test_folder_walk_lists_each_file_once_in_sorted_order(tmp_path):
    (tmp_path / "d" / "e").mkdir(parents=True)
    for name in ("b.png", "a.png", "e/c.png"):
        (tmp_path / "d" / name).write_bytes(b"x")
    os.link(tmp_path / "d" / "a.png", tmp_path / "d" / "e" / "hard.png")  # the same file by a hard link
    walk = FolderWalk()
    assert [os.path.relpath(p, tmp_path) for p in walk.files(tmp_path / "d")] == ["d/a.png", "d/b.png", "d/e/c.png"]
    assert walk.skipped == 1 and walk.files(tmp_path / "d") == []  # all of it seen already
