"""`BarlowTwins`: a `keras.Model` whose `train_step` minimises the redundancy-reduction loss.

The story of one step (paper, Algorithm 1):

  1. the data gives two augmented views of the same images, `(view1, view2)`;
  2. the encoder (a ResNet) and the projector (an MLP) map each view to an embedding, `z1` and `z2`, each view in its
     own forward pass, so BatchNorm statistics are per view as in the official code;
  3. `barlow_twins_loss` normalises each embedding along the GLOBAL batch and pushes their cross-correlation matrix
     towards the identity;
  4. the optimizer (LARS in the paper's recipe) applies the true gradient of that global loss.

Exactness under `tf.distribute`. Each replica computes the same global loss L, thanks to differentiable
all-reduces of the statistics and of C (or, when the global batch is below D, of the gathered embeddings' Gram
sums: `bt_keras.loss_forms`). Differentiating L on one replica gives R times that replica's share of the
gradient (the backward pass of an all-reduce sums the R identical upstream gradients), and Keras optimizers SUM the
replicas' gradients. So each replica differentiates L / R, and the summed gradient is exactly dL/dtheta: N replicas
with global batch B take the same step as one device with the same B examples (tests/test_distributed.py). The
official PyTorch code instead all-reduces C without a gradient and lets DDP average, which gives 1/world_size of
the true gradient; with LARS that changes the effective weight decay and the biases' learning rate.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from bt_keras import heads, losses
from bt_keras.distribute import check_global_batch


def _views(data):
    """Accepts `(view1, view2)`, `[view1, view2]`, `{"view1": ..., "view2": ...}` or `((view1, view2),)`."""
    if isinstance(data, dict):
        if set(data) != {"view1", "view2"}:
            raise ValueError(f"BarlowTwins: a dict batch needs exactly the keys 'view1' and 'view2', got {sorted(data)}.")
        return data["view1"], data["view2"]
    if isinstance(data, (tuple, list)):
        if len(data) == 1:
            return _views(data[0])
        if len(data) == 2 and not isinstance(data[0], (tuple, list, dict)):
            return data[0], data[1]
    raise ValueError(
        "BarlowTwins: each batch must be a pair of augmented views (view1, view2) of the same images, "
        f"got {type(data).__name__}. Build one with bt_keras.data.pretrain_dataset or bt_keras.augment.TwoViews."
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
        `bt_keras.backbones.resnet50()`); this is what you keep after pre-training.
      projector: any Keras model mapping features to the embedding whose cross-correlation is optimised (e.g.
        `bt_keras.heads.projector("8192-8192-8192")`).
      lambd: weight of the off-diagonal (redundancy-reduction) term, 0.0051 in the official code.

    Data: `fit` takes batches of view pairs `(view1, view2)`, float images normalised per channel.
    Metrics: `loss`, `on_diagonal` (sum_i (1 - C_ii)^2), `off_diagonal` (sum_{i!=j} C_ij^2, unweighted) and
    `embedding_std` (collapse signal: ~1/sqrt(features) when healthy, 0 when collapsed), all over the global batch.
    `model(images)` returns the encoder's features.

    Example:
      >>> model = BarlowTwins(backbones.resnet18(input_shape=(32, 32, 3), stem="cifar"), heads.projector("2048-2048-2048"))
      >>> model.compile(optimizer=optim.LARS(0.3, eta=0.02, weight_decay=1e-4))
      >>> model.fit(data.pretrain_dataset("tfds:cifar10", global_batch_size=256, views=augment.cifar_views()), ...)
    """

    def __init__(self, encoder: keras.Model, projector: keras.Model, lambd: float = losses.DEFAULT_LAMBDA, **kwargs):
        super().__init__(**kwargs)
        if lambd < 0:
            raise ValueError(f"BarlowTwins: lambd must be >= 0, got {lambd}.")
        self.encoder = encoder
        self.projector = projector
        self.lambd = float(lambd)
        self._trackers = {
            name: keras.metrics.Mean(name=name) for name in ("loss", "on_diagonal", "off_diagonal", "embedding_std")
        }
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
        self.built = True

    def compute_loss_terms(self, view1, view2, training: bool = True) -> dict:
        """Loss terms (see `losses.barlow_twins_loss`) plus `embedding_std`, over the global batch."""
        _check_views(view1, view2)
        features1 = self.encoder(view1, training=training)
        features2 = self.encoder(view2, training=training)
        # Same maths as projector(features1), projector(features2); each Dense layer reads its kernel once.
        z1, z2 = heads.project_views(self.projector, features1, features2, training=training)
        terms = losses.barlow_twins_loss(z1, z2, self.lambd)
        terms["embedding_std"] = tf.stop_gradient(losses.embedding_std(features1))
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
        return tape.gradient(objective, self.trainable_variables), terms

    # augment_on="accelerator" (bt_keras.device_augment): a DeviceAugment that turns the pipeline's uint8 crops + seeds
    # into the two views on the device; None (default) or an already augmented batch: nothing to do.
    device_augment = None

    def train_step(self, data):
        if self.device_augment is not None:
            data = self.device_augment(data)
        view1, view2 = _views(data)
        gradients, terms = self.compute_gradients(view1, view2)
        self.optimizer.apply_gradients(zip(gradients, self.trainable_variables))
        return self._update_metrics(terms)

    def test_step(self, data):
        if self.device_augment is not None:
            data = self.device_augment(data)
        view1, view2 = _views(data)
        return self._update_metrics(self.compute_loss_terms(view1, view2, training=False))

    def _update_metrics(self, terms):
        for name, tracker in self._trackers.items():
            tracker.update_state(terms[name])
        return {name: tracker.result() for name, tracker in self._trackers.items()}

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
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        for key in ("encoder", "projector"):
            config[key] = keras.saving.deserialize_keras_object(config[key], custom_objects=custom_objects)
        return cls(**config)
