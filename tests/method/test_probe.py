"""The online linear probe: it learns labels from the encoder's features, never changes the encoder, is exact under
replicas, is saved with the model, and the labelled pre-training stream gives the very views of the unlabelled one."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from bt_keras import data
from bt_keras.method.model import BarlowTwins
from bt_keras.method.optim import LARS
from bt_keras.method.probe import OnlineProbe
from bt_keras.nets import backbones, heads
from bt_keras.views import ViewConfig
from tests.helpers import cpu_strategy, numpy_topk_accuracy, tiny_config

CLASSES = 4


def labelled_views(n=128, size=8, classes=CLASSES, seed=0):
    """Two noisy views of images drawn from a few class prototypes, and the class labels."""
    rng = np.random.default_rng(seed)
    prototypes = rng.normal(size=(classes, size, size, 3))
    labels = rng.integers(classes, size=n).astype("int32")
    base = prototypes[labels]
    views = [(base + 0.5 * rng.normal(size=base.shape)).astype("float32") for _ in range(2)]
    return views[0], views[1], labels


def make_model(probe: bool, seed=0, probe_optimizer=None):
    """A tiny BarlowTwins; with `probe`, an OnlineProbe made after the encoder and projector (same initial weights)."""
    keras.utils.set_random_seed(seed)
    encoder = backbones.resnet18(input_shape=(8, 8, 3), stem="cifar", width_multiplier=1 / 16, blocks=(1, 1))
    projector = heads.projector("32-32")
    online = OnlineProbe(CLASSES, probe_optimizer or keras.optimizers.SGD(0.1, momentum=0.9)) if probe else None
    return BarlowTwins(encoder, projector, online_probe=online)


@pytest.mark.slow
def test_the_probe_learns_labels_well_above_chance():
    model = make_model(probe=True, probe_optimizer=keras.optimizers.SGD(0.5, momentum=0.9))
    model.compile(optimizer=LARS(0.2, eta=0.02, weight_decay=1e-4))
    train = tf.data.Dataset.from_tensor_slices(labelled_views()).shuffle(128, seed=0).batch(32, drop_remainder=True)
    history = model.fit(train, epochs=20, verbose=0).history
    # New noisy views of the same prototypes (seed 0), other examples (n differs): the probe generalises.
    rng_views = labelled_views(n=192, seed=0)
    held_out = tf.data.Dataset.from_tensor_slices(tuple(x[128:] for x in rng_views)).batch(32)
    test = model.evaluate(held_out, verbose=0, return_dict=True)
    print({k: v[-1] for k, v in history.items()}, test)
    assert history["online_top1"][-1] > 0.8  # chance: 0.25
    assert history["online_loss"][-1] < 0.5 * history["online_loss"][0]
    assert test["online_top1"] > 0.8
    assert set(history) >= {"loss", "on_diagonal", "off_diagonal", "embedding_std", "online_loss", "online_top1"}


@pytest.mark.slow
def test_the_probe_never_changes_the_encoder_updates():
    """Three LARS steps with and without the probe: encoder, projector and their optimizer state bit-identical."""
    with_probe, without = make_model(probe=True), make_model(probe=False)
    assert all(np.array_equal(a, b) for a, b in zip(with_probe.encoder.get_weights(), without.encoder.get_weights()))
    v1, v2, labels = labelled_views(n=32)
    for model in (with_probe, without):
        model.compile(optimizer=LARS(0.5, momentum=0.9, eta=0.02, weight_decay=1e-3))
        step = tf.function(model.train_step)
        for _ in range(3):
            logs = step((v1, v2, labels) if model is with_probe else (v1, v2))
        assert ("online_top1" in logs) == (model is with_probe)
    pretrain = [v.numpy() for v in with_probe.pretrain_variables] + [m.numpy() for m in with_probe.optimizer.variables]
    plain = [v.numpy() for v in without.trainable_variables] + [m.numpy() for m in without.optimizer.variables]
    assert len(pretrain) == len(plain)
    for a, b in zip(pretrain, plain):
        np.testing.assert_array_equal(a, b)
    moving = [v.numpy() for v in with_probe.non_trainable_variables], [v.numpy() for v in without.non_trainable_variables]
    for a, b in zip(*moving):  # BN moving statistics too
        np.testing.assert_array_equal(a, b)
    initial = make_model(probe=False).encoder.get_weights()
    assert max(np.abs(a - b).max() for a, b in zip(initial, without.encoder.get_weights())) > 1e-4  # it trained
    probe_kernel = with_probe.online_probe.classifier.kernel.numpy()
    assert not np.array_equal(probe_kernel, make_model(probe=True).online_probe.classifier.kernel.numpy())


def test_without_labels_the_probe_is_skipped_and_fit_still_takes_pairs():
    model = make_model(probe=True)
    model.compile(optimizer=LARS(0.2))
    v1, v2, _ = labelled_views(n=32)
    logs = model.fit(tf.data.Dataset.from_tensors((v1, v2)), epochs=1, verbose=0).history
    assert "loss" in logs and "online_top1" not in logs


def test_negative_labels_are_left_out():
    probe = OnlineProbe(CLASSES)
    features = np.random.default_rng(0).normal(size=(6, 5)).astype("float32")
    probe.build(features.shape)
    labels = np.array([0, 1, 2, -1, -1, 3], np.int32)
    loss, top1 = probe.loss_and_accuracy([features], labels)
    keep = labels >= 0
    logits = probe(features[keep]).numpy().astype(np.float64)
    log_softmax = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) \
        - logits.max(1, keepdims=True)
    want_loss = -np.mean(log_softmax[np.arange(keep.sum()), labels[keep]])
    want_top1 = np.mean(np.argmax(logits, 1) == labels[keep])
    assert float(loss) == pytest.approx(want_loss, rel=1e-5)
    assert float(top1) == pytest.approx(want_top1)


@pytest.mark.slow
def test_the_probe_is_exact_under_replicas():
    """Its update with 2 replicas equals one device's on the same global batch (float64: maths, not round-off). The
    unlabelled examples fall unevenly on the replicas (5 and 8 labelled of 8), so the labelled count must be summed
    across them; 4 replicas run the same code (the whole step at 4 replicas: tests/train/test_step.py)."""
    replicas = 2
    v1, v2, labels = labelled_views(n=16)
    labels[:3] = -1  # some unlabelled examples, not evenly spread over the replicas
    results = []
    for r in (1, replicas):
        strategy = cpu_strategy(r)
        keras.config.set_dtype_policy("float64")
        try:
            with strategy.scope():
                model = make_model(probe=True, probe_optimizer=keras.optimizers.SGD(0.5, momentum=0.9))
                model.compile(optimizer=LARS(0.5, momentum=0.9, eta=0.02, weight_decay=1e-3))
        finally:
            keras.config.set_dtype_policy("float32")
        dataset = tf.data.Dataset.from_tensors((v1.astype("float64"), v2.astype("float64"), labels))
        history = model.fit(dataset.repeat(2), epochs=1, verbose=0).history
        results.append(([v.numpy() for v in model.online_probe.weights], history["online_top1"][-1],
                         history["online_loss"][-1]))
    (w1, top1_1, loss_1), (wr, top1_r, loss_r) = results
    for a, b in zip(w1, wr):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-10)
    assert top1_r == pytest.approx(top1_1, abs=1e-12) and loss_r == pytest.approx(loss_1, rel=1e-10)
    initial = make_model(probe=True).online_probe.classifier.kernel.numpy()
    assert np.abs(w1[0] - initial).max() > 1e-3  # it moved


@pytest.mark.slow
def test_the_probe_and_its_optimizer_are_saved_with_the_model(tmp_path):
    model = make_model(probe=True)
    model.compile(optimizer=LARS(0.2))
    v1, v2, labels = labelled_views(n=32)
    model.fit(tf.data.Dataset.from_tensors((v1, v2, labels)), epochs=2, verbose=0)
    model.save(tmp_path / "bt.keras")
    clone = keras.models.load_model(tmp_path / "bt.keras")
    assert isinstance(clone.online_probe, OnlineProbe) and isinstance(clone.online_probe.optimizer, keras.optimizers.SGD)
    for a, b in zip(model.online_probe.weights + model.online_probe.optimizer.variables + model.optimizer.variables,
                    clone.online_probe.weights + clone.online_probe.optimizer.variables + clone.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    # The trainer's checkpoints (tf.train.Checkpoint of the model) hold them too, momentum included.
    path = tf.train.Checkpoint(model=model, optimizer=model.optimizer).save(str(tmp_path / "ckpt"))
    fresh = make_model(probe=True, seed=1)
    fresh.compile(optimizer=LARS(0.2))
    fresh.optimizer.build(fresh.pretrain_variables)
    tf.train.Checkpoint(model=fresh, optimizer=fresh.optimizer).restore(path).assert_existing_objects_matched()
    for a, b in zip(model.online_probe.weights + model.online_probe.optimizer.variables,
                    fresh.online_probe.weights + fresh.online_probe.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert int(fresh.online_probe.optimizer.iterations.numpy()) == 2


def test_labelled_stream_has_the_same_views_and_the_right_labels():
    """Images whose value encodes their label, views without any augmentation: each view must decode to its label
    after shuffling, and the views with labels are those without."""
    labels = np.arange(40, dtype=np.int32) % 10
    images = np.broadcast_to((labels * 20)[:, None, None, None], (40, 8, 8, 3)).astype(np.uint8).copy()
    plain = ViewConfig(8, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_prob=0.0, jitter_prob=0.0,
                       grayscale_prob=0.0, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    kwargs = dict(batch_size=8, views=(plain, plain), seed=3, shuffle_buffer=40, repeat=False)
    with_labels = list(data.pair_batches(tf.data.Dataset.from_tensor_slices((images, labels)), labels=True, **kwargs))
    without = list(data.pair_batches(tf.data.Dataset.from_tensor_slices(images), **kwargs))
    assert len(with_labels) == len(without) == 5
    seen = []
    for (a1, a2, y), (b1, b2) in zip(with_labels, without):
        np.testing.assert_array_equal(a1.numpy(), b1.numpy())
        np.testing.assert_array_equal(a2.numpy(), b2.numpy())
        decoded = np.round(a1.numpy().mean(axis=(1, 2, 3)) * 255 / 20).astype(int)
        np.testing.assert_array_equal(decoded, y.numpy())
        seen += list(y.numpy())
    assert sorted(seen) == sorted(labels) and seen != list(labels)  # all of them, shuffled


def test_pretrain_dataset_with_labels_yields_labels_of_the_dataset():
    ds = data.pretrain_dataset("digits", global_batch_size=16, seed=0, labels=True, repeat=False)
    v1, v2, y = next(iter(ds))
    assert v1.shape == v2.shape == (16, 32, 32, 3) and y.dtype == tf.int32 and set(y.numpy()) <= set(range(10))
    v1_plain, _ = next(iter(data.pretrain_dataset("digits", global_batch_size=16, seed=0, repeat=False)))
    np.testing.assert_array_equal(v1.numpy(), v1_plain.numpy())


@pytest.mark.slow
def test_trainer_logs_the_probe_and_resumes_it(tmp_path):
    """The pre-training loop with the probe on (solo-learn's form): online_top1 every logged step, online_val_top1
    on the test split, and a resumed run restores the probe's weights and optimizer."""
    import json

    from bt_keras.train import callbacks
    from bt_keras.train.trainer import Trainer

    def config(epochs):
        c = tiny_config(epochs=epochs, log_every_steps=1)
        c.optimizer.trust_ratio, c.optimizer.clip_lr, c.optimizer.lr_biases = "solo_learn", True, 0.3
        c.online_probe.enabled, c.online_probe.optimizer, c.online_probe.eval_every_epochs = True, "lars", 1
        return c

    first = Trainer(config(2), tmp_path, tf.distribute.get_strategy())
    assert first.model.online_probe is not None
    # Step 1's online_top1, recounted in NumPy before the run: the probe's initial weights on the encoder's training-
    # mode features of the first batch (a second iterator of the same seeded pipeline), both views. The encoder's
    # BatchNorm statistics that this call moves are put back, so the run itself is untouched.
    model = first.model
    view1, view2, labels = next(iter(first.dataset))
    moving = [v.numpy() for v in model.encoder.non_trainable_variables]
    features = [model.encoder(view, training=True).numpy() for view in (view1, view2)]
    for variable, value in zip(model.encoder.non_trainable_variables, moving):
        variable.assign(value)
    kernel, bias = (v.numpy().astype(np.float64) for v in (model.online_probe.classifier.kernel,
                                                             model.online_probe.classifier.bias))
    step_1 = [numpy_topk_accuracy(f.astype(np.float64) @ kernel + bias, labels.numpy(), ks=(1,)) for f in features]
    assert min(margin for _, margin in step_1) > 1e-4  # no near-tie: float32 round-off cannot flip a prediction
    step_1_top1 = sum(top1 for (top1,), _ in step_1) / 2
    first.run()
    probe_state = [v.numpy() for v in first.model.online_probe.weights + first.model.online_probe.optimizer.variables]
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [line for line in lines if line["kind"] == "train"]
    assert len(train) == 6 and all(0.0 <= line["online_top1"] <= 1.0 and "online_loss" in line for line in train)
    # (hits of view 1 + hits of view 2) / (2 x 32): exact in float32 and in metrics.jsonl's 6 decimals.
    assert train[0]["step"] == 1 and train[0]["online_top1"] == pytest.approx(step_1_top1, abs=1e-7), \
        (train[0]["online_top1"], step_1_top1)
    epochs = [line for line in lines if line["kind"] == "epoch"]
    assert len(epochs) == 2 and all(0.0 <= line["online_val_top1"] <= 1.0 for line in epochs)
    # The last epoch's online_val_top1, recounted in NumPy: the final probe on the frozen encoder's features of the
    # monitor's split (the library's stream; the count is what is checked). No near-tie, so the same count; the log
    # keeps 6 decimals, so to 5e-7 (one example of the split is ~3e-3).
    monitor = callbacks.online_probe_monitor_from_config(first.config, first.run_data)
    features, labels = (np.concatenate(parts) for parts in zip(*[(model.encoder(x, training=False).numpy(),
                                                                    y.numpy()) for x, y in monitor.test_data]))
    kernel, bias = (v.numpy().astype(np.float64) for v in (model.online_probe.classifier.kernel,
                                                             model.online_probe.classifier.bias))
    ((val_top1,), margin) = numpy_topk_accuracy(features.astype(np.float64) @ kernel + bias, labels, ks=(1,))
    assert margin > 1e-4 and epochs[-1]["online_val_top1"] == pytest.approx(val_top1, abs=5e-7), \
        (epochs[-1]["online_val_top1"], val_top1)

    resumed = Trainer(config(3), tmp_path, tf.distribute.get_strategy())
    assert resumed.start_step == 6
    for a, b in zip(probe_state, resumed.model.online_probe.weights + resumed.model.online_probe.optimizer.variables):
        np.testing.assert_array_equal(a, b.numpy())
    resumed.run()
    assert int(resumed.model.online_probe.optimizer.iterations.numpy()) == 9
