"""Evaluation transforms (bt_keras.augment.eval_transforms): the identity plus normalisation at the native size, resize
and centre crop against TensorFlow's resize, and the training-style evaluation crop; `random_resized_crop` of one
image."""

import numpy as np
import tensorflow as tf

from bt_keras import augment


def test_eval_transform_identity_for_native_size():
    image = np.random.default_rng(2).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    out = augment.eval_transform(image, 32, augment.CIFAR10_MEAN, augment.CIFAR10_STD).numpy()
    expected = (image / 255.0 - np.array(augment.CIFAR10_MEAN)) / np.array(augment.CIFAR10_STD)
    np.testing.assert_allclose(out, expected, atol=1e-5)
    np.testing.assert_allclose(augment.normalize(image, augment.CIFAR10_MEAN, augment.CIFAR10_STD), expected, atol=1e-5)
    np.testing.assert_allclose(augment.normalize(image / np.float32(255), augment.CIFAR10_MEAN, augment.CIFAR10_STD),
                               expected, atol=1e-5)


def test_eval_transform_resize_and_center_crop():
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, size=(256, 256, 3), dtype=np.uint8)  # 224 / 0.875 = 256: crop only
    out = augment.eval_transform(image, 224, augment.IMAGENET_MEAN, augment.IMAGENET_STD).numpy()
    expected = augment.normalize(image[16:240, 16:240], augment.IMAGENET_MEAN, augment.IMAGENET_STD)
    np.testing.assert_allclose(out, expected, atol=1e-4)
    wide = rng.integers(0, 256, size=(50, 80, 3), dtype=np.uint8)  # shorter side -> round(32 / 0.875) = 37
    fn = tf.function(lambda im: augment.eval_transform(im, 32, (0.5,) * 3, (0.25,) * 3),
                     input_signature=[tf.TensorSpec([None, None, 3], tf.uint8)])
    resized = tf.image.resize(wide, [37, 59], method="bilinear", antialias=True).numpy()
    np.testing.assert_allclose(fn(wide).numpy(), (resized[2:34, 14:46] / 255 - 0.5) / 0.25, atol=1e-4)


def test_train_eval_transform_and_single_image_crop():
    image = np.random.default_rng(4).integers(0, 256, size=(60, 90, 3), dtype=np.uint8)
    seed = tf.constant([1, 2])
    out = augment.train_eval_transform(image, 24, augment.IMAGENET_MEAN, augment.IMAGENET_STD, seed)
    assert out.shape == (24, 24, 3) and out.dtype == tf.float32
    np.testing.assert_array_equal(out, augment.train_eval_transform(image, 24, augment.IMAGENET_MEAN,
                                                                    augment.IMAGENET_STD, seed))
    crop = augment.random_resized_crop(image, 20, (1.0, 1.0), (1.5, 1.5), seed)  # the whole 60 x 90 image
    assert crop.dtype == tf.uint8 and crop.shape == (20, 20, 3)
    expected = tf.image.resize(image, [20, 20], method="bicubic", antialias=True).numpy()
    assert np.abs(crop.numpy() - np.clip(np.round(expected), 0, 255)).max() <= 1
