"""BarlowTwins as users meet it: fit learns, saving round-trips, bad input is refused clearly."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from bt_keras import BarlowTwins
from bt_keras.method.optim import LARS
from bt_keras.nets import backbones, heads
from tests.helpers import tiny_model, view_pair


def structured_views(n=256, size=8, classes=8, seed=0):
    """Two noisy views of images drawn from a few prototypes: there is structure to find, and noise to ignore."""
    rng = np.random.default_rng(seed)
    prototypes = rng.normal(size=(classes, size, size, 3))
    base = prototypes[rng.integers(classes, size=n)]
    views = [base + 0.5 * rng.normal(size=base.shape) for _ in range(2)]
    return tuple(v.astype("float32") for v in views)


@pytest.mark.slow
def test_fit_lowers_loss_and_moves_away_from_collapse():
    model = tiny_model(projector="64-64")
    model.compile(optimizer=keras.optimizers.Adam(3e-3))
    dataset = tf.data.Dataset.from_tensor_slices(structured_views()).shuffle(256, seed=0).batch(64, drop_remainder=True)
    before = model.evaluate(dataset, verbose=0, return_dict=True)
    model.fit(dataset, epochs=15, verbose=0)
    after = model.evaluate(dataset, verbose=0, return_dict=True)
    print(f"before {before}\nafter {after}")
    assert after["loss"] < 0.5 * before["loss"]
    assert after["embedding_std"] > 1.5 * before["embedding_std"]


def test_call_returns_encoder_features():
    model = tiny_model()
    x = view_pair(4)[0]
    np.testing.assert_array_equal(model(x).numpy(), model.encoder(x).numpy())


def test_keras_save_and_reload_gives_identical_outputs(tmp_path):
    model = tiny_model()
    model.compile(optimizer=LARS(0.2, eta=0.02))
    model.fit(tf.data.Dataset.from_tensors(view_pair(8)), epochs=2, verbose=0)
    path = tmp_path / "bt.keras"
    model.save(path)
    clone = keras.models.load_model(path)
    x = view_pair(5, seed=1)[0]
    np.testing.assert_array_equal(model(x).numpy(), clone(x).numpy())
    np.testing.assert_array_equal(model.projector(model(x)).numpy(), clone.projector(clone(x)).numpy())
    assert clone.lambd == model.lambd and isinstance(clone.optimizer, LARS)
    for a, b in zip(model.optimizer.variables, clone.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def _trainable(model) -> int:
    """Trainable parameters, what torch's `sum(p.numel() for p in model.parameters())` counts (no BN buffers)."""
    return sum(int(np.prod(v.shape)) for v in model.trainable_variables)


def test_paper_backbones_have_the_published_shapes():
    r50 = backbones.resnet50(input_shape=(64, 64, 3))
    assert r50.output_shape == (None, 2048)
    assert _trainable(r50) == 23_508_032  # torchvision resnet50 without fc (a dropped BatchNorm would show)
    r18 = backbones.resnet18(input_shape=(32, 32, 3), stem="cifar")
    assert r18.output_shape == (None, 512)
    assert _trainable(r18) == 11_168_832  # torchvision resnet18 without fc, with the 3x3 stem
    # zero_init_residual: every residual branch's last BN starts with gamma = 0.
    last_bns = [l for l in r18.layers if l.name.endswith("_bn2") and "down" not in l.name]
    assert last_bns and all(np.all(l.gamma.numpy() == 0) for l in last_bns)
    assert all(l.synchronized for l in r18.layers if isinstance(l, keras.layers.BatchNormalization))


def test_projector_spec():
    head = heads.projector("16-8-4")
    out = head(tf.zeros([3, 5]))
    assert out.shape == (3, 4)
    dense = [l for l in head.layers if isinstance(l, keras.layers.Dense)]
    assert [d.units for d in dense] == [16, 8, 4] and not any(d.use_bias for d in dense)
    with pytest.raises(ValueError, match="Projector spec"):
        heads.projector("8192-x")


@pytest.mark.parametrize(
    "batch, message",
    [
        ((np.zeros([4, 8, 8, 3], np.uint8), np.zeros([4, 8, 8, 3], np.uint8)), "dtype uint8"),
        ((np.zeros([1, 8, 8, 3], np.float32), np.zeros([1, 8, 8, 3], np.float32)), "at least 2"),
        ((np.zeros([4, 8, 8, 3], np.float32),), "pair of augmented views"),
    ],
)
def test_bad_batches_raise_clear_errors(batch, message):
    model = tiny_model()
    model.compile(optimizer=LARS(0.1))
    with pytest.raises(ValueError, match=message):
        model.train_step(tuple(tf.constant(b) for b in batch))


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="lambd"):
        BarlowTwins(keras.Sequential([keras.layers.Dense(2)]), heads.projector("4"), lambd=-1.0)
    with pytest.raises(ValueError, match="Unknown backbone"):
        backbones.get_backbone("vit")


def test_backbone_initialisation_is_seeded_and_per_layer():
    def build():
        keras.utils.set_random_seed(3)
        return backbones.resnet18(input_shape=(8, 8, 3), stem="cifar", width_multiplier=1 / 16, blocks=(2,))

    first, second = build(), build()
    for a, b in zip(first.get_weights(), second.get_weights()):
        np.testing.assert_array_equal(a, b)
    # Same-shaped kernels must not share their initial values.
    kernels = [l.kernel.numpy() for l in first.layers if isinstance(l, keras.layers.Conv2D) and l.kernel.shape == (3, 3, 4, 4)]
    assert len(kernels) >= 3 and not np.array_equal(kernels[0], kernels[1])
