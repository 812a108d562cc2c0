"""augment_on = "host" | "accelerator": the same views either way, and the host's cheaper JPEG crop decodes.

The reference for "same views" is the host mode itself (whose per-step statistics tests/augment/test_ops.py checks), and
the reference for the crop decode is the plain path: full `decode_image` then `augment.random_resized_crop`.
"""

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

from bt_keras import augment, config as config_lib, data
from bt_keras.assembly import builders
from bt_keras.augment import device as device_augment, host_crop
from tests.helpers import tiny_model


def _smooth_images(count, sides=(90, 140), seed=0):
    """Photo-like images (coarse colour fields + texture) of random sizes, as uint8."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        h, w = rng.integers(sides[0], sides[1] + 1, size=2)
        coarse = rng.uniform(0, 255, size=(1, 6, 8, 3)).astype(np.float32)
        image = tf.image.resize(coarse, [h, w], method="bicubic")[0].numpy() + rng.normal(0, 6, size=(h, w, 3))
        images.append(np.clip(np.round(image), 0, 255).astype(np.uint8))
    return images


def _jpegs(count, **kwargs):
    return [tf.io.encode_jpeg(image, quality=90).numpy() for image in _smooth_images(count, **kwargs)]


@tf.function
def _on_device(augmenter, batch):  # in a graph, as in train_step
    return augmenter(batch)


def _both_modes(images, views, encoded, batches=2, **kwargs):
    host = data.pair_batches(images, batch_size=4, views=views, encoded=encoded, seed=3, **kwargs)
    accel = data.pair_batches(images, batch_size=4, views=views, encoded=encoded, seed=3, augment_on="accelerator",
                              **kwargs)
    augmenter = device_augment.DeviceAugment(*views)
    pairs = []
    for host_views, host_batch in zip(host.take(batches), accel.take(batches)):
        assert set(host_batch) == device_augment.HOST_KEYS
        assert host_batch["view1"].dtype == tf.uint8 and host_batch["view2"].dtype == tf.uint8  # no float on the host
        pairs.append((host_views, _on_device(augmenter, host_batch)))
    return pairs


@pytest.mark.slow
@pytest.mark.parametrize("case", ["equal-size uint8", "jpeg"])
def test_host_and_accelerator_modes_give_identical_views(case):
    if case == "jpeg":
        images, views, encoded = tf.data.Dataset.from_tensor_slices(_jpegs(8)), augment.imagenet_views(48), True
    else:
        rng = np.random.default_rng(1)
        images = tf.data.Dataset.from_tensor_slices(rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8))
        views, encoded = augment.cifar_views(16), False
    pairs = _both_modes(images, views, encoded)
    for (h1, h2), (a1, a2) in pairs:
        np.testing.assert_allclose(a1.numpy(), h1.numpy(), rtol=0, atol=1e-5)
        np.testing.assert_allclose(a2.numpy(), h2.numpy(), rtol=0, atol=1e-5)
    assert not np.allclose(pairs[0][0][0].numpy(), pairs[1][0][0].numpy())  # batches differ: the test can fail
    assert not np.allclose(pairs[0][0][0].numpy(), pairs[0][0][1].numpy())  # and so do the two views


@pytest.mark.slow
@pytest.mark.parametrize("encoded", [False, True])
def test_rotated_views_with_labels_are_identical_in_both_modes(encoded):
    """The rotation (issue 16's digits recipe) is part of the host's uint8 stage in both modes, and the online
    probe's labels (issue 13) travel with accelerator-mode batches."""
    rng = np.random.default_rng(4)
    pixels = rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    items = [tf.io.encode_png(p).numpy() for p in pixels] if encoded else pixels
    images = tf.data.Dataset.from_tensor_slices((items, np.arange(8, dtype=np.int32)))
    views = tuple(dataclasses.replace(v, rotation_prob=0.5, flip_prob=0.0) for v in augment.cifar_views(16))
    kwargs = dict(batch_size=4, views=views, encoded=encoded, seed=3, labels=True)
    host = list(data.pair_batches(images, **kwargs).take(2))
    accel = list(data.pair_batches(images, augment_on="accelerator", **kwargs).take(2))
    augmenter = device_augment.DeviceAugment(*views)
    for (h1, h2, h_labels), batch in zip(host, accel):
        assert set(batch) == device_augment.HOST_KEYS | {"labels"}
        a1, a2, a_labels = _on_device(augmenter, batch)
        np.testing.assert_allclose(a1.numpy(), h1.numpy(), rtol=0, atol=1e-5)
        np.testing.assert_allclose(a2.numpy(), h2.numpy(), rtol=0, atol=1e-5)
        np.testing.assert_array_equal(a_labels.numpy(), h_labels.numpy())
    unrotated = tuple(dataclasses.replace(v, rotation_prob=0.0) for v in views)
    plain = [v for v, _, _ in data.pair_batches(images, **{**kwargs, "views": unrotated}).take(2)]
    changed = [not np.allclose(p.numpy()[i], h[0].numpy()[i]) for p, h in zip(plain, host) for i in range(4)]
    assert 0 < sum(changed) < len(changed), changed  # some images rotated, some not (p=0.5): the test can fail


def test_stages_compose_to_augment_batch():
    """Host mode = photometric(geometric(x)); that differs from the one-call augment_batch only by rounding the crop
    to uint8 (at most half a grey level before normalisation), and photometric equals augment_batch without crop
    (to float rounding: for uint8 input the conversion to [0, 1] is fused into the XLA colour step)."""
    rng = np.random.default_rng(2)
    images = tf.constant(rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8))
    view = augment.cifar_views(16)[1]
    seed = tf.constant([5, 9], tf.int64)
    crops = augment.geometric_batch(images, view, seed)
    assert crops.dtype == tf.uint8 and crops.shape == (6, 16, 16, 3)
    np.testing.assert_allclose(augment.photometric_batch(crops, view, seed).numpy(),  # uint8 -> float fused by XLA
                               augment.augment_batch(crops, view, seed, geometric=False).numpy(), rtol=0, atol=1e-5)
    unrounded = augment.augment_batch(images, view, seed).numpy()
    staged = augment.photometric_batch(crops, view, seed).numpy()
    bound = 0.5 / 255 / min(view.std) * (1 + view.contrast + view.brightness) ** 2 + 1e-5  # jitter can amplify it
    assert np.abs(staged - unrounded).max() <= bound
    with pytest.raises(ValueError, match="uint8"):
        augment.geometric_batch(tf.cast(images, tf.float32), view, seed)


def test_decode_to_window_equals_full_decode_and_png_path():
    view = augment.imagenet_views(32)[0]
    images = _smooth_images(4)
    for k, image in enumerate(images):
        for encoded in (tf.io.encode_jpeg(image, quality=90), tf.io.encode_png(image)):
            for s in range(4):
                seed = tf.constant([k, s], tf.int64)
                fast = host_crop.decode_random_resized_crop(encoded, view, seed)
                plain = augment.random_resized_crop(tf.io.decode_image(encoded, channels=3), 32, view.crop_scale,
                                                    view.crop_ratio, seed, view.flip_prob)
                assert fast.dtype == tf.uint8
                np.testing.assert_array_equal(fast.numpy(), plain.numpy())
            seeds = [tf.constant([k, 10 + s], tf.int64) for s in range(2)]
            views = augment.imagenet_views(32)
            pair = host_crop.decode_random_resized_crop_pair(encoded, views, seeds)
            for crop, v, seed in zip(pair, views, seeds):
                plain = augment.random_resized_crop(tf.io.decode_image(encoded, channels=3), 32, v.crop_scale,
                                                    v.crop_ratio, seed, v.flip_prob)
                np.testing.assert_array_equal(crop.numpy(), plain.numpy())
    gray = tf.io.encode_jpeg(images[0][..., :1])  # one-channel JPEG: decoded to 3 channels
    assert host_crop.decode_random_resized_crop(gray, view, tf.constant([0, 0], tf.int64)).shape == (32, 32, 3)


def test_dct_scaling_changes_pixels_only_slightly():
    """Large crops of 300-400 px images to 32 px decode at 1/2-1/8 scale: close to, but not, the default's pixels."""
    view = dataclasses.replace(augment.imagenet_views(32)[0], crop_scale=(0.5, 1.0))
    diffs = []
    for k, jpeg in enumerate(_jpegs(4, sides=(300, 400))):
        seed = tf.constant([k, 1], tf.int64)
        exact = host_crop.decode_random_resized_crop(jpeg, view, seed).numpy().astype(float)
        scaled = host_crop.decode_random_resized_crop(jpeg, view, seed, dct_scaling=True).numpy().astype(float)
        diffs.append(np.abs(exact - scaled).mean())
    assert 0.0 < np.mean(diffs) < 6.0, diffs  # grey levels (of 255)


@pytest.mark.slow
def test_model_gets_the_same_loss_from_either_mode_and_fits():
    views = augment.cifar_views(8)
    rng = np.random.default_rng(4)
    images = tf.data.Dataset.from_tensor_slices(rng.integers(0, 256, (16, 8, 8, 3), dtype=np.uint8))
    host = data.pair_batches(images, batch_size=8, views=views, seed=1)
    accel = data.pair_batches(images, batch_size=8, views=views, seed=1, augment_on="accelerator")
    model = tiny_model(image_size=8)
    model.compile(optimizer="sgd")
    host_loss = model.test_step(next(iter(host)))["loss"].numpy()
    model.device_augment = device_augment.DeviceAugment(*views)
    accel_loss = model.test_step(next(iter(accel)))["loss"].numpy()
    np.testing.assert_allclose(accel_loss, host_loss, rtol=1e-5)
    history = model.fit(accel.take(2), epochs=1, verbose=0)  # train_step in a tf.function, batch size read from view1
    assert np.isfinite(history.history["loss"][-1])


def test_config_mode_is_checked_and_wired():
    config = config_lib.base_config()
    views = augment.cifar_views(8)
    assert builders.build_device_augment(config, views) is None  # default: host
    config.augment_on = "accelerator"
    assert isinstance(builders.build_device_augment(config, views), device_augment.DeviceAugment)
    config.augment_on = "gpu"
    with pytest.raises(ValueError, match="augment_on must be one of"):
        builders.build_device_augment(config, views)
    with pytest.raises(ValueError, match="augment_on must be one of"):
        data.pair_batches(tf.data.Dataset.from_tensor_slices(np.zeros((4, 8, 8, 3), np.uint8)), batch_size=2,
                          views=views, augment_on="tpu")


@pytest.mark.slow
def test_accelerator_mode_under_two_replicas():
    """The per-replica batches of a MirroredStrategy are dicts of uint8 crops + per-image draws, augmented in
    train_step on each replica: on the same batch, from the same weights, the global loss and the weights after one
    SGD step equal host mode's (float round-off: the views agree to 1e-5; measured |dloss| and |dweight| 0). (That
    `Trainer` wires config.augment_on through to the pipeline and the model, and trains with it, is
    tests/train/test_accelerator_path.py's test_xla_with_the_augmentation_on_the_device, which runs such a trainer.)

    The loss is computed here on the replicas (training=False: no BatchNorm update), not read from `fit`'s history
    (which tests/method/test_distributed.py judges: it once counted the failed end-of-data call of a dataset of
    unknown length, logging 1/2 or 2/3 of the loss)."""
    views = augment.cifar_views(8)
    images = tf.data.Dataset.from_tensor_slices(np.random.default_rng(5).integers(0, 256, (32, 8, 8, 3), np.uint8))
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    results = {}
    for mode in ("host", "accelerator"):
        with strategy.scope():
            model = tiny_model(image_size=8)  # seeded: the same initial weights in both modes
            model.compile(optimizer=keras.optimizers.SGD(0.05))
        if mode == "accelerator":
            model.device_augment = device_augment.DeviceAugment(*views)
        batches = data.pair_batches(images, batch_size=8, views=views, seed=1, augment_on=mode).take(1)

        def global_loss(batch):
            return model.compute_loss_terms(*model.augment_on_device(batch)[:2], training=False)["loss"]

        per_replica = tf.function(lambda b: strategy.run(global_loss, args=(b,)))(
            next(iter(strategy.experimental_distribute_dataset(batches))))
        losses = [float(x) for x in strategy.experimental_local_results(per_replica)]
        assert len(losses) == 2 and losses[0] == losses[1]  # the global loss, on each replica
        model.fit(batches, epochs=1, verbose=0)  # accelerator: the batch size is read from view1
        results[mode] = losses[0], model.get_weights()
    (host_loss, host_weights), (accel_loss, accel_weights) = results["host"], results["accelerator"]
    print(f"|dloss| {abs(accel_loss - host_loss):.1e}, |dweight| "
          f"{max(np.abs(a - b).max() for a, b in zip(accel_weights, host_weights)):.1e}")
    assert np.isfinite(host_loss)
    np.testing.assert_allclose(accel_loss, host_loss, rtol=1e-6, atol=0)
    for a, b in zip(accel_weights, host_weights):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    initial = tiny_model(image_size=8).get_weights()
    assert max(np.abs(a - b).max() for a, b in zip(initial, host_weights)) > 1e-2  # the step moved the weights
