"""The cluttered digits (bt_keras.data.cluttered_digits, the quickstart's dataset): the same bytes on every call,
train and test made of disjoint source digits (as digits and as clutter), the documented shapes, ranges and class
balance, digits that really move, grow and turn, and the dataset name wired into bt_keras.data."""

import numpy as np
import pytest

from bt_keras import data
from bt_keras.data import cluttered_digits as cd
from bt_keras.data import sources


@pytest.fixture(scope="module")
def splits():
    return {split: cd.generate(split) for split in cd.SPLITS}


def test_generation_is_deterministic_bytes_and_fast():
    import time

    cd._scans()  # sklearn's loading is not the generator's
    cd.generate.cache_clear()
    start = time.perf_counter()
    first = cd.generate("test")
    elapsed = time.perf_counter() - start
    cd.generate.cache_clear()
    again = cd.generate("test")
    assert first is not again
    for field in ("images", "labels", "sources", "centres", "sizes", "angles", "fragment_sources"):
        assert getattr(first, field).tobytes() == getattr(again, field).tobytes(), field
    assert elapsed < 10, elapsed  # 720 canvases; well under a second on an idle core
    assert not first.images.flags.writeable  # cached and shared: nobody changes them for the others


def test_train_and_test_come_from_disjoint_source_digits(splits):
    train, test = cd.source_split("train"), cd.source_split("test")
    assert len(np.intersect1d(train, test)) == 0 and len(train) + len(test) == 1797
    assert (len(train), len(test)) == (1437, cd.TEST_SOURCES)
    for split, pool in (("train", train), ("test", test)):
        canvases = splits[split]
        assert set(canvases.sources.tolist()) == set(pool.tolist())  # every source used ...
        per_source = np.bincount(canvases.sources, minlength=1797)[pool]
        assert (per_source == cd.CANVASES_PER_SOURCE[split]).all()
        fragments = canvases.fragment_sources[canvases.fragment_sources >= 0]
        assert np.isin(fragments, pool).all()  # ... and the clutter is cut from the same split's digits only
        assert not (canvases.fragment_sources == canvases.sources[:, None]).any()  # never from the canvas's own digit
    _, labels = cd._scans()
    np.testing.assert_array_equal(splits["test"].labels, labels[splits["test"].sources])


def test_shapes_dtypes_range_and_balance(splits):
    for split, canvases in splits.items():
        n = cd.split_sizes()[split]
        assert canvases.images.shape == (n, 32, 32, 3) and canvases.images.dtype == np.uint8
        assert canvases.labels.shape == (n,) and canvases.labels.dtype == np.int32
        assert np.array_equal(canvases.images[..., 0], canvases.images[..., 2])  # grey, repeated to RGB
        assert canvases.images.min() == 0 and canvases.images.max() == 255
        counts = np.bincount(canvases.labels, minlength=10)
        assert counts.min() >= 0.9 * n / 10 and counts.max() <= 1.1 * n / 10, counts
        fragments = (canvases.fragment_sources >= 0).sum(axis=1)
        assert fragments.min() == cd.FRAGMENTS[0] and fragments.max() == cd.FRAGMENTS[1]
    assert np.bincount(splits["test"].labels).tolist() == [72] * 10  # 36 source digits of each class, 2 canvases
    mean, std = (float(f(splits["train"].images[..., 0] / 255.0)) for f in (np.mean, np.std))
    assert (mean, std) == pytest.approx((sources.CLUTTERED_MEAN[0], sources.CLUTTERED_STD[0]), abs=1e-4)


def test_digits_vary_in_position_size_and_rotation(splits):
    canvases = splits["train"]
    low, high = cd.DIGIT_SIZE
    assert low <= canvases.sizes.min() < low + 1 and high - 1 < canvases.sizes.max() <= high
    assert canvases.angles.min() < cd.ROTATION[0] + 3 and canvases.angles.max() > cd.ROTATION[1] - 3
    assert abs(np.corrcoef(canvases.sizes, canvases.angles)[0, 1]) < 0.1  # drawn independently
    half = canvases.sizes[:, None] / 2
    assert ((canvases.centres >= half) & (canvases.centres <= 32 - half)).all()  # the digit's square on the canvas
    assert canvases.centres.std(axis=0).min() > 2.5  # uniform over ~12-20 px: std 3.5-5.8 px
    # The images themselves: the ink's centre of mass follows the digit's centre, so it moves from canvas to canvas.
    ink = canvases.images[..., 0].astype(np.float64)
    grid = np.arange(32) + 0.5
    centre_of_mass = np.stack([(ink.sum(2) * grid).sum(1), (ink.sum(1) * grid).sum(1)], 1) / ink.sum((1, 2))[:, None]
    assert centre_of_mass.std(axis=0).min() > 1.5
    assert np.corrcoef(centre_of_mass[:, 1], canvases.centres[:, 1])[0, 1] > 0.5
    # Bigger digits cover more pixels.
    lit = (canvases.images[..., 0] > 160).sum(axis=(1, 2))
    assert np.corrcoef(lit, canvases.sizes)[0, 1] > 0.3


def test_a_drawn_digit_is_its_scan():
    scans, _ = cd._scans()
    one = scans[:1]
    drawn = cd._draw(one, np.array([[16.0, 16.0]], np.float32), np.array([32.0], np.float32),
                     np.zeros(1, np.float32), np.array([[0, 0, 8, 8]], np.float32))[0]
    # 32 px for 8 scan pixels: each 4 x 4 block's centre pixels average to the scan pixel, within bilinear blur.
    blocks = drawn.reshape(8, 4, 8, 4)[:, 1:3, :, 1:3].mean(axis=(1, 3))
    assert np.abs(blocks - one[0]).max() < 0.2
    turned = cd._draw(one, np.array([[16.0, 16.0]], np.float32), np.array([32.0], np.float32),
                      np.full(1, 90.0, np.float32), np.array([[0, 0, 8, 8]], np.float32))[0]
    assert not np.allclose(turned, drawn, atol=0.1) and turned.sum() == pytest.approx(drawn.sum(), rel=0.1)
    window = cd._draw(one, np.array([[16.0, 16.0]], np.float32), np.array([32.0], np.float32),
                      np.zeros(1, np.float32), np.array([[0, 0, 4, 4]], np.float32))[0]
    assert window[:6].sum() == 0 and window[-6:].sum() == 0  # the 4 x 4 window only: 16 px, centred


@pytest.mark.slow
def test_registered_as_a_dataset():
    info = data.dataset_info("cluttered_digits")
    assert (info.num_classes, info.image_shape) == (10, (32, 32, 3))
    assert info.splits == {"train": 2874, "test": 720} == cd.split_sizes()
    assert info.mean == sources.CLUTTERED_MEAN
    images, labels = next(iter(data.labelled_dataset("cluttered_digits", split="test", batch_size=720,
                                                      image_size=32)))
    canvases = cd.generate("test")
    np.testing.assert_array_equal(labels.numpy(), canvases.labels)
    np.testing.assert_allclose(images.numpy() * np.array(info.std) + np.array(info.mean),
                               canvases.images / 255.0, atol=1e-5)
    (v1, v2), = data.pretrain_dataset("cluttered_digits", global_batch_size=16, seed=0).take(1)
    assert v1.shape == (16, 32, 32, 3) and not np.allclose(v1, v2)
    with pytest.raises(ValueError, match="cluttered_digits has splits 'train' and 'test'"):
        cd.generate("validation")
