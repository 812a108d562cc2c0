"""`BarlowTwins`: a `keras.Model` whose `train_step` minimises the redundancy-reduction loss.

The story of one step (paper, Algorithm 1):

  1. the data gives two augmented views of the same images, `(view1, view2)`;
  2. the encoder (a ResNet) and the projector (an MLP) map each view to an embedding, `z1` and `z2`, each view in its
     own forward pass, so BatchNorm statistics are per view as in the official code;
  3. `barlow_twins_loss` normalises each embedding along the GLOBAL batch and pushes their cross-correlation matrix
     towards the identity;
  4. the optimizer (LARS in the paper's recipe) applies the true gradient of that global loss;
  5. optionally, an online linear probe (`bt_keras.method.probe.OnlineProbe`) learns the labels from the encoder's
     features with the gradient stopped, with its own optimizer (batches `(view1, view2, labels)`); it never changes the
     encoder.

Exactness under `tf.distribute`. Each replica computes the same global loss L, thanks to differentiable
all-reduces of the statistics and of C (or, when the global batch is below D, of the gathered embeddings' Gram
sums: `bt_keras.method.loss_forms`). Differentiating L on one replica gives R times that replica's share of the
gradient (the backward pass of an all-reduce sums the R identical upstream gradients), and Keras optimizers SUM the
replicas' gradients. So each replica differentiates L / R, and the summed gradient is exactly dL/dtheta: N replicas
with global batch B take the same step as one device with the same B examples (tests/method/test_distributed.py). The
official PyTorch code instead all-reduces C without a gradient and lets DDP average, which gives 1/world_size of
the true gradient; with LARS that changes the effective weight decay and the biases' learning rate.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from bt_keras.augment.device import DeviceAugment
from bt_keras.distribute import check_global_batch
from bt_keras.method import losses, precision
from bt_keras.method.probe import OnlineProbe
from bt_keras.nets import heads


def _views(data):
    """Accepts `(view1, view2)`, `[view1, view2]`, `{"view1": ..., "view2": ...}` or `((view1, view2),)`."""
    view1, view2, _ = _batch(data)
    return view1, view2


def _batch(data):
    """(view1, view2, labels or None): `_views`' forms, plus `(view1, view2, labels)` and a dict with "labels"."""
    if isinstance(data, dict):
        if set(data) not in ({"view1", "view2"}, {"view1", "view2", "labels"}):
            raise ValueError(f"BarlowTwins: a dict batch needs exactly the keys 'view1' and 'view2' (and optionally "
                             f"'labels'), got {sorted(data)}.")
        return data["view1"], data["view2"], data.get("labels")
    if isinstance(data, (tuple, list)):
        if len(data) == 1:
            return _batch(data[0])
        if len(data) in (2, 3) and not isinstance(data[0], (tuple, list, dict)):
            return data[0], data[1], (data[2] if len(data) == 3 else None)
    raise ValueError(
        "BarlowTwins: each batch must be a pair of augmented views (view1, view2) of the same images, "
        f"got {type(data).__name__}. Build one with bt_keras.data.pretrain_dataset (or two "
        "bt_keras.augment.augment_batch calls)."
    )


def _check_views(view1, view2):
    for name, view in (("view1", view1), ("view2", view2)):
        if not view.dtype.is_floating:
            raise ValueError(
                f"BarlowTwins: {name} has dtype {view.dtype.name}; the encoder expects float images normalised with "
                "the dataset's mean/std (bt_keras.augment does this). Convert uint8 images before training."
            )
    if not view1.shape.is_compatible_with(view2.shape):
        raise ValueError(f"BarlowTwins: the two views differ in shape, {view1.shape} vs {view2.shape}.")


def _static_batch_size(x, batch_size):
    """The global batch size `fit` will use, when it can be known before training starts (else None)."""
    if isinstance(x, tf.data.Dataset):
        first = tf.nest.flatten(x.element_spec)[0]
        return first.shape[0] if first.shape.rank else None
    return batch_size


@keras.saving.register_keras_serializable(package="bt_keras")
class BarlowTwins(keras.Model):
    """Barlow Twins self-supervised pre-training of `encoder`, with `projector` on top.

    Args:
      encoder: any Keras model mapping images to a `[batch, features]` representation (e.g.
        `bt_keras.nets.backbones.resnet50()`); this is what you keep after pre-training.
      projector: any Keras model mapping features to the embedding whose cross-correlation is optimised (e.g.
        `bt_keras.nets.heads.projector("8192-8192-8192")`).
      lambd: weight of the off-diagonal (redundancy-reduction) term, 0.0051 in the official code.
      scale_loss: the loss optimised is `scale_loss * (on_diagonal + lambd * off_diagonal)`; 1 officially, 0.1 in
        solo-learn's CIFAR recipe (solo/losses/barlow.py, `scale_loss` in scripts/pretrain/cifar/barlow.yaml).
      online_probe: an optional `bt_keras.method.probe.OnlineProbe`, trained on the encoder's stop-gradient features
        when the batches carry labels.
      device_augment: a `bt_keras.augment.device.DeviceAugment` when the pipeline yields uint8 crops and per-image
        draws (`augment_on="accelerator"`): `train_step` makes the two views on the device. Saved in the config.

    Data: `fit` takes batches of view pairs `(view1, view2)`, float images normalised per channel, or
    `(view1, view2, labels)` for the online probe (labels < 0: unlabelled).
    Metrics: `loss` (scaled by `scale_loss`), `on_diagonal` (sum_i (1 - C_ii)^2), `off_diagonal` (sum_{i!=j} C_ij^2,
    unweighted) and `embedding_std` (collapse signal: ~1/sqrt(features) when healthy, 0 when collapsed), all over the
    global batch; with a probe and labels, `online_loss` and `online_top1` as well.
    `model(images)` returns the encoder's features.

    The steps run without AutoGraph, under `fit` (Keras 3 calls `train_step` unconverted) and under the trainer
    (its step is traced with `autograph=False`): branch on tensors with `keras.ops.cond` / `tf.cond`, as Keras 3 code
    written for every backend does anyway, not with a Python `if` in an overridden hook such as `compute_loss_terms`.

    Example:
      >>> model = BarlowTwins(backbones.resnet18(input_shape=(32, 32, 3), stem="cifar"), heads.projector("2048-2048-2048"))
      >>> model.compile(optimizer=optim.LARS(0.3, eta=0.02, weight_decay=1e-4))
      >>> model.fit(data.pretrain_dataset("tfds:cifar10", global_batch_size=256, views=augment.cifar_views()), ...)
    """

    def __init__(self, encoder: keras.Model, projector: keras.Model, lambd: float = losses.DEFAULT_LAMBDA,
                 scale_loss: float = 1.0, online_probe: OnlineProbe | None = None,
                 device_augment: DeviceAugment | None = None, **kwargs):
        super().__init__(**kwargs)
        if lambd < 0:
            raise ValueError(f"BarlowTwins: lambd must be >= 0, got {lambd}.")
        if not scale_loss > 0:
            raise ValueError(f"BarlowTwins: scale_loss must be > 0, got {scale_loss}.")
        if online_probe is not None and not isinstance(online_probe, OnlineProbe):
            raise ValueError(f"BarlowTwins: online_probe must be a bt_keras.method.probe.OnlineProbe, got "
                             f"{type(online_probe).__name__}.")
        self.encoder = encoder
        self.projector = projector
        self.lambd = float(lambd)
        self.scale_loss = float(scale_loss)
        self.online_probe = online_probe
        if device_augment is not None and not isinstance(device_augment, DeviceAugment):
            raise ValueError(f"BarlowTwins: device_augment must be a bt_keras.augment.device.DeviceAugment, got "
                             f"{type(device_augment).__name__}.")
        self.device_augment = device_augment
        names = ("loss", "on_diagonal", "off_diagonal", "embedding_std")
        names += ("online_loss", "online_top1") if online_probe is not None else ()
        self._trackers = {name: keras.metrics.Mean(name=name) for name in names}
        if getattr(encoder, "inputs", None):  # a functional encoder knows its input: build now, so saving is complete.
            self.build(encoder.inputs[0].shape)

    @property
    def metrics(self):
        return list(self._trackers.values())

    def call(self, images, training=False):
        """The encoder's representation of `images` (what downstream tasks use)."""
        return self.encoder(images, training=training)

    def build(self, input_shape):
        features = self.encoder.compute_output_shape(input_shape)
        if not self.projector.built:
            self.projector.build(features)
        if self.online_probe is not None and not self.online_probe.built:
            self.online_probe.build(features)
        self.built = True

    def compile(self, optimizer="rmsprop", **kwargs):
        """`keras.Model.compile`; under a mixed_float16 policy the optimizer is wrapped in bt_keras's
        `precision.LossScaleOptimizer` (instead of Keras's), whose skipped steps still count and whose overflow
        check is the same on every replica."""
        optimizer = keras.optimizers.get(optimizer)
        if optimizer is not None and self.dtype_policy.name == "mixed_float16" and kwargs.get("auto_scale_loss", True):
            optimizer = precision.wrap_optimizer(optimizer, "mixed_float16")
        super().compile(optimizer=optimizer, **kwargs)

    def compile_from_config(self, config):
        """As Keras's (compile a loaded model), with the optimizer built on `pretrain_variables`, the variables it
        was trained on (the online probe has its own optimizer), so that its saved state loads."""
        self.compile(**keras.saving.deserialize_keras_object(config))
        if getattr(self, "optimizer", None) is not None and self.built:
            self.optimizer.build(self.pretrain_variables)

    @property
    def pretrain_variables(self) -> list:
        """The variables the Barlow Twins loss trains: `trainable_variables` without the online probe's (same order)."""
        if self.online_probe is None:
            return self.trainable_variables
        probe = {id(v) for v in self.online_probe.trainable_variables}
        return [v for v in self.trainable_variables if id(v) not in probe]

    def compute_loss_terms(self, view1, view2, training: bool = True) -> dict:
        """Loss terms (see `losses.barlow_twins_loss`; `loss` times `scale_loss`) plus `embedding_std`, over the
        global batch, and `features`: the encoder's features of the two views (for the online probe)."""
        _check_views(view1, view2)
        features1 = self.encoder(view1, training=training)
        features2 = self.encoder(view2, training=training)
        # Same maths as projector(features1), projector(features2); each Dense layer reads its kernel once.
        z1, z2 = heads.project_views(self.projector, features1, features2, training=training)
        terms = losses.barlow_twins_loss(z1, z2, self.lambd)
        if self.scale_loss != 1.0:
            terms["loss"] = terms["loss"] * self.scale_loss
        terms["embedding_std"] = tf.stop_gradient(losses.embedding_std(features1))
        terms["features"] = (features1, features2)
        return terms

    def compute_gradients(self, view1, view2):
        """This replica's share of the true gradient of the global loss; summed over replicas it is exact.

        Returns (gradients, terms); the gradients are scaled for mixed precision when the optimizer is a
        `LossScaleOptimizer` (its `apply_gradients` unscales them).
        """
        replicas = tf.distribute.get_replica_context().num_replicas_in_sync
        with tf.GradientTape() as tape:
            terms = self.compute_loss_terms(view1, view2, training=True)
            objective = terms["loss"] / replicas  # Keras sums the replicas' gradients: see the module docstring.
            if self.optimizer is not None:
                objective = self.optimizer.scale_loss(objective)
        return tape.gradient(objective, self.pretrain_variables), terms

    def train_step(self, data):
        return self.train_step_on_views(self.augment_on_device(data))

    def augment_on_device(self, data):
        """The batch with `device_augment` applied (augment_on="accelerator"), else the batch itself."""
        return data if self.device_augment is None else self.device_augment(data)

    def train_step_on_views(self, data):
        """`train_step` of a batch of views already augmented: what `--xla` compiles (bt_keras.train.step)."""
        view1, view2, labels = _batch(data)
        gradients, terms = self.compute_gradients(view1, view2)
        self.optimizer.apply_gradients(zip(gradients, self.pretrain_variables))
        if self.online_probe is not None and labels is not None:  # from the features before this update
            terms.update(self.online_probe.train_step(terms["features"], labels))
        return self._update_metrics(terms)

    def test_step(self, data):
        if self.device_augment is not None:
            data = self.device_augment(data)
        view1, view2, labels = _batch(data)
        terms = self.compute_loss_terms(view1, view2, training=False)
        if self.online_probe is not None and labels is not None:
            terms.update(self.online_probe.test_terms(terms["features"], labels))
        return self._update_metrics(terms)

    def _update_metrics(self, terms):
        """Updates the trackers of the terms present (the probe's only with labels) and returns their results.

        Every update waits for every value. A `Mean` of a scalar adds 1 to its count, an op that reads no data: in a
        traced step the executor may run it before the batch arrives, and when there is no batch (the call of
        `fit`/`evaluate` that finds a dataset of unknown length exhausted ends in OutOfRangeError) the count has
        grown by a step that never happened, on some replicas and not others, at random; `fit`'s epoch result
        (total / count summed over replicas) then reads 1/2 or 2/3 of the loss, with correct weights.
        """
        trackers = {name: tracker for name, tracker in self._trackers.items() if name in terms}
        with tf.control_dependencies([terms[name] for name in trackers]):  # no-op when eager
            for name, tracker in trackers.items():
                tracker.update_state(terms[name])
        return {name: tracker.result() for name, tracker in trackers.items()}

    def fit(self, x=None, y=None, batch_size=None, **kwargs):
        """`keras.Model.fit`, after checking that the global batch splits evenly over the strategy's replicas."""
        global_batch = _static_batch_size(x, batch_size)
        if global_batch is not None:
            check_global_batch(global_batch, self.distribute_strategy.num_replicas_in_sync)
        kwargs.setdefault("shuffle", not isinstance(x, tf.data.Dataset))  # a Dataset shuffles itself
        return super().fit(x, y, batch_size=batch_size, **kwargs)

    def get_config(self):
        return {
            **super().get_config(),
            "encoder": keras.saving.serialize_keras_object(self.encoder),
            "projector": keras.saving.serialize_keras_object(self.projector),
            "lambd": self.lambd,
            "scale_loss": self.scale_loss,
            "online_probe": (keras.saving.serialize_keras_object(self.online_probe)
                             if self.online_probe is not None else None),
            "device_augment": self.device_augment.get_config() if self.device_augment is not None else None,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        for key in ("encoder", "projector", "online_probe"):
            if config.get(key) is not None:
                config[key] = keras.saving.deserialize_keras_object(config[key], custom_objects=custom_objects)
        if config.get("device_augment") is not None:
            config["device_augment"] = DeviceAugment.from_config(config["device_augment"])
        return cls(**config)
