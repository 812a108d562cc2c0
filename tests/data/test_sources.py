"""Tests of bt_keras.data: CIFAR-10 from the shared offline TFDS copy, digits, image folders
(JPEG/PNG, gray, RGBA, corrupt files), sharding, determinism and fast, clear failures offline."""

import logging
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from bt_keras import augment, data
from bt_keras.data import sources
from tests.helpers import TFDS_DIR

needs_cifar = pytest.mark.skipif(not (TFDS_DIR / "cifar10").is_dir(),
                                 reason=f"CIFAR-10 in TFDS format not found at {TFDS_DIR}")
BATCH = 32


def first(ds, count=1):
    return [tf.nest.map_structure(lambda t: t.numpy(), b) for b in ds.take(count)]


def unnormalize(images, mean, std):
    return images * np.array(std) + np.array(mean)


# ---------------------------------------------------------------------------------- CIFAR-10


@pytest.mark.slow
@needs_cifar
def test_cifar10_pretrain_offline_and_seeded():
    def make(seed):
        return data.pretrain_dataset("tfds:cifar10", global_batch_size=BATCH, data_dir=str(TFDS_DIR),
                                     shuffle_buffer=256, cache=False, seed=seed)

    (v1, v2), = first(make(3))
    assert v1.shape == v2.shape == (BATCH, 32, 32, 3) and v1.dtype == np.float32
    assert np.isfinite(v1).all() and -3 < v1.min() < -1 and 1 < v1.max() < 3  # CIFAR-normalised
    assert not np.allclose(v1, v2)
    again, = first(make(3))
    np.testing.assert_array_equal(again[0], v1)
    assert not np.allclose(first(make(4))[0][0], v1)


@needs_cifar
def test_cifar10_labelled_eval_is_identity_plus_normalisation():
    import tensorflow_datasets as tfds

    images, labels = first(data.labelled_dataset("tfds:cifar10", split="test", batch_size=100, image_size=32,
                                                 data_dir=str(TFDS_DIR)))[0]
    assert images.shape == (100, 32, 32, 3) and labels.dtype == np.int32
    raw = next(iter(tfds.load("cifar10", split="test", data_dir=str(TFDS_DIR), download=False,
                              as_supervised=True).batch(100)))
    np.testing.assert_array_equal(labels, raw[1].numpy())
    np.testing.assert_allclose(unnormalize(images, augment.CIFAR10_MEAN, augment.CIFAR10_STD),
                               raw[0].numpy() / 255.0, atol=1e-5)
    info = data.dataset_info("tfds:cifar10", data_dir=str(TFDS_DIR))
    assert (info.num_classes, info.image_shape, info.splits) == (10, (32, 32, 3), {"train": 50000, "test": 10000})
    assert info.mean == augment.CIFAR10_MEAN


@pytest.mark.slow
@needs_cifar
def test_cifar10_class_balanced_subset_is_seeded():
    def subset(fraction_or_count, seed):
        return first(data.labelled_dataset("tfds:cifar10", split="test", batch_size=100, image_size=32,
                                           data_dir=str(TFDS_DIR), subset=fraction_or_count, seed=seed))[0]

    images, labels = subset(0.005, 0)  # 0.5% of the 1000 test images of each class
    assert images.shape == (50, 32, 32, 3) and np.bincount(labels).tolist() == [5] * 10
    np.testing.assert_array_equal(subset(5, 0)[0], images)  # same seed, same examples (file order)
    assert not np.allclose(subset(5, 1)[0], images)


# ------------------------------------------------------------------------------------ digits


def test_digits_pretrain_labelled_and_info():
    info = data.dataset_info("digits")
    assert (info.num_classes, info.image_shape, info.splits) == (10, (32, 32, 3), {"train": 1437, "test": 360})
    views = data.default_views("digits")
    assert views[0].crop_size == 32 and views[1].solarize_prob == 0.2 and views[0].mean == data.DIGITS_MEAN
    (v1, v2), = first(data.pretrain_dataset("digits", global_batch_size=BATCH, seed=1))
    assert v1.shape == v2.shape == (BATCH, 32, 32, 3) and np.isfinite(v1).all()
    test = list(data.labelled_dataset("digits", split="test", batch_size=100, image_size=32))
    assert sum(len(y) for _, y in test) == 360 and test[0][0].shape[1:] == (32, 32, 3)
    train = np.concatenate([x.numpy() for x, _ in data.labelled_dataset("digits", split="train", batch_size=500,
                                                                       image_size=32)])
    pixels = unnormalize(train, data.DIGITS_MEAN, data.DIGITS_STD)
    assert abs(pixels.mean() - data.DIGITS_MEAN[0]) < 1e-3 and abs(pixels.std() - data.DIGITS_STD[0]) < 1e-3


def _shard_rows(name, split, shards, data_dir=None):
    """Each shard's images (as bytes) and the whole split's, read through the loader's own sharding (in batches of
    1024: one eager step per batch instead of per image)."""
    def rows(**shard):
        source = sources.open_source(name, split, data_dir, False, shuffle=True, seed=2, **shard)
        return [row.tobytes() for images, _ in source.dataset.batch(1024) for row in images.numpy()]

    return [rows(shard=(shards, i)) for i in range(shards)], rows()


@pytest.mark.parametrize("shards", [2, 3])
def test_shards_are_disjoint_and_cover_the_split(shards):
    """Multi-worker input: every example is read by exactly one input pipeline (as many times as in the split)."""
    from collections import Counter

    parts, whole = _shard_rows("digits", "train", shards)
    assert all(parts) and sum(len(p) for p in parts) == len(whole) == 1437
    assert sum((Counter(p) for p in parts), Counter()) == Counter(whole)  # together: the split, each example once
    for a in range(shards):
        for b in range(a + 1, shards):
            assert not set(parts[a]) & set(parts[b]) - {row for row, n in Counter(whole).items() if n > 1}


@pytest.mark.slow
@needs_cifar
def test_tfds_shards_are_disjoint_and_cover_the_split():
    from collections import Counter

    parts, whole = _shard_rows("tfds:cifar10", "test", 2, TFDS_DIR)
    assert len(whole) == 10_000 and Counter(parts[0]) + Counter(parts[1]) == Counter(whole)
    assert abs(len(parts[0]) - len(parts[1])) <= 1


def test_sharding_with_input_context():
    context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=1, num_replicas_in_sync=4)
    (v1, _), = first(data.pretrain_dataset("digits", global_batch_size=BATCH, seed=2, input_context=context))
    assert v1.shape[0] == BATCH // 4
    other = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=0, num_replicas_in_sync=4)
    assert not np.allclose(first(data.pretrain_dataset("digits", global_batch_size=BATCH, seed=2,
                                                       input_context=other))[0][0], v1)


# ----------------------------------------------------------------------------------- folders


def write_image(path: Path, array: np.ndarray, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path)


@pytest.fixture
def image_tree(tmp_path):
    """root/{cat,dog}/ with RGB/gray JPEGs, RGB/gray/RGBA PNGs of different sizes, upper-case
    extensions, and a text file that is ignored."""
    root = tmp_path / "pets"
    red = np.zeros((30, 40, 3), np.uint8)
    red[..., 0] = 255
    write_image(root / "cat" / "a.jpg", red)
    write_image(root / "cat" / "b.PNG", np.full((50, 20, 3), 90, np.uint8))
    write_image(root / "cat" / "nested" / "c.jpeg", np.full((64, 64), 200, np.uint8))  # gray JPEG
    write_image(root / "dog" / "d.png", np.full((25, 25), 30, np.uint8))  # gray PNG
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[..., 2], rgba[..., 3] = 255, 100
    write_image(root / "dog" / "e.png", rgba)  # RGBA: alpha dropped -> blue
    write_image(root / "dog" / "f.JPG", np.random.default_rng(0).integers(0, 256, (70, 50, 3), dtype=np.uint8))
    (root / "dog" / "notes.txt").write_text("not an image")
    return root


@pytest.mark.slow
def test_folder_loader_reads_jpeg_png_gray_rgba(image_tree):
    name = f"folder:{image_tree}"
    info = data.dataset_info(name)
    assert (info.num_classes, info.image_shape, info.splits) == (2, None, {"train": 6})
    images, labels = first(data.labelled_dataset(name, split="train", batch_size=10, image_size=16))[0]
    assert images.shape == (6, 16, 16, 3) and labels.tolist() == [0, 0, 0, 1, 1, 1]  # sorted classes, files
    pixels = unnormalize(images, augment.IMAGENET_MEAN, augment.IMAGENET_STD)
    np.testing.assert_allclose(pixels[0].mean(axis=(0, 1)), [1, 0, 0], atol=0.02)  # red JPEG
    for gray in (2, 3):  # gray JPEG / PNG: three equal channels
        assert np.ptp(pixels[gray], axis=-1).max() < 1e-4
    np.testing.assert_allclose(pixels[4].mean(axis=(0, 1)), [0, 0, 1], atol=1e-4)  # RGBA -> RGB
    (v1, v2), = first(data.pretrain_dataset(name, global_batch_size=4, seed=0,
                                            views=augment.imagenet_views(16)))
    assert v1.shape == v2.shape == (4, 16, 16, 3) and np.isfinite(v1).all()


def test_folder_split_directories(image_tree):
    (image_tree / "val").mkdir()
    with pytest.raises(data.DatasetNotFoundError, match="test"):
        data.labelled_dataset(f"folder:{image_tree}", split="test", batch_size=2, image_size=8)


@pytest.mark.slow
@pytest.mark.hostile
def test_folder_skips_corrupt_files(image_tree, caplog):
    (image_tree / "cat" / "text.jpg").write_text("this is not a JPEG")  # caught by the header check
    good = (image_tree / "cat" / "a.jpg").read_bytes()
    (image_tree / "dog" / "truncated.jpg").write_bytes(good[: len(good) // 2])  # valid header, cut body
    with caplog.at_level(logging.WARNING):
        ds = data.labelled_dataset(f"folder:{image_tree}", split="train", batch_size=10, image_size=16)
    assert "skipping 1 file" in caplog.text and "text.jpg" in caplog.text
    images, labels = first(ds)[0]
    assert len(labels) == 6  # the truncated JPEG is dropped while decoding
    (everything, _), = first(data.pretrain_dataset(f"folder:{image_tree}", global_batch_size=6, seed=0,
                                                   views=augment.imagenet_views(16), repeat=False))
    assert everything.shape[0] == 6


# ---------------------------------------------------------------------------------- failures


def test_empty_folder(tmp_path):
    with pytest.raises(ValueError, match="is empty"):
        data.pretrain_dataset(f"folder:{tmp_path}", global_batch_size=2)


def test_folder_without_class_subfolders(tmp_path):
    write_image(tmp_path / "loose.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="no class sub-folders"):
        data.labelled_dataset(f"folder:{tmp_path}", split="train", batch_size=2, image_size=8)
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(ValueError, match="no .jpg"):
        data.dataset_info(f"folder:{tmp_path}")


def test_missing_folder(tmp_path):
    with pytest.raises(data.DatasetNotFoundError, match="does not exist"):
        data.dataset_info(f"folder:{tmp_path / 'nope'}")


@pytest.mark.parametrize("name, message", [("cifar10", "Did you mean 'tfds:cifar10'"), ("hdf5:x", "folder:PATH"),
                                           ("tfds:no_such_dataset_xyz", "TFDS has no dataset")])
def test_unknown_dataset_name(name, message):
    with pytest.raises(ValueError, match=message):
        data.pretrain_dataset(name, global_batch_size=2, views=augment.cifar_views())


def test_missing_tfds_data_fails_fast_offline(tmp_path):
    start = time.monotonic()
    with pytest.raises(data.DatasetNotFoundError) as error:
        data.pretrain_dataset("tfds:cifar10", global_batch_size=2, data_dir=str(tmp_path), download=False)
    message = str(error.value)
    assert str(tmp_path) in message and "tfds build cifar10" in message and "download=True" in message
    with pytest.raises(data.DatasetNotFoundError):
        data.labelled_dataset("tfds:imagenet2012_subset/1pct", split="train", batch_size=2, image_size=8,
                              data_dir=str(tmp_path))
    assert time.monotonic() - start < 10  # a hang bound: an offline TFDS download retries for minutes


def test_bad_arguments():
    with pytest.raises(ValueError, match="subset"):
        data.labelled_dataset("digits", split="train", batch_size=2, image_size=8, subset=1.5)
    with pytest.raises(ValueError, match="splits 'train' and 'test'"):
        data.labelled_dataset("digits", split="validation", batch_size=2, image_size=8)
    with pytest.raises(ValueError, match="ViewConfig"):
        data.pretrain_dataset("digits", global_batch_size=2, views=("a", "b"))
    with pytest.raises(ValueError, match="cache"):
        data.pretrain_dataset("digits", global_batch_size=2, cache="yes")


@pytest.mark.slow
def test_start_batch_resumes_the_seeded_stream_exactly():
    """Batch i of a stream started at batch k equals batch i of the full stream, across epoch boundaries."""
    views = augment.cifar_views(32)
    full = data.pretrain_dataset("digits", global_batch_size=100, views=views, seed=3)
    reference = [batch for _, batch in zip(range(33), full)]  # 14 batches an epoch: spans three epochs
    tf.random.set_seed(0)  # the trainer's global seed: it once broke tensor shuffle seeds in traced graphs
    resumed = data.pretrain_dataset("digits", global_batch_size=100, views=views, seed=3, start_batch=17)
    compared = 0
    for want, got in zip(reference[17:], resumed):
        np.testing.assert_array_equal(want[0].numpy(), got[0].numpy())
        np.testing.assert_array_equal(want[1].numpy(), got[1].numpy())
        compared += 1
    assert compared == 16  # zip would pass on an empty resumed stream
    assert not np.array_equal(reference[0][0].numpy(), reference[14][0].numpy())  # each epoch reshuffled
