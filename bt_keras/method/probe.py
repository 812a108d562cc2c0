"""The online linear probe: a linear classifier trained beside pre-training, on the encoder's features with the
gradient stopped, so it reports how linearly separable the representation is at every step and never changes it.

As solo-learn (`solo/methods/base.py`: `self.classifier(feats.detach())`, cross-entropy ignoring label -1, averaged
over the two views, its own parameter group: lr `classifier_lr`, weight decay 0) and lightly's online classifier.
solo-learn's published CIFAR-10 number (92.1%) is this classifier's accuracy on the test split.

`BarlowTwins(..., online_probe=OnlineProbe(num_classes, optimizer))` trains it in the same `train_step` when the
batches carry labels, `(view1, view2, labels)`, and logs `online_loss` and `online_top1` (top-1 on the training
batch's augmented views). The probe has its own optimizer, built with it and saved with the model (in `.keras` files
and in the trainer's checkpoints, as an attribute of the model).

Exact under `tf.distribute`: each replica's cross-entropy is SUMMED over its examples and divided by the number of
labelled examples in the GLOBAL batch; Keras optimizers sum the replicas' gradients, so the update is that of the
mean over the global batch, as on one device. Examples with a negative label (e.g. STL-10's unlabelled split) are
left out of the loss and the accuracy.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from bt_keras.distribute import global_sum


@keras.saving.register_keras_serializable(package="bt_keras")
class OnlineProbe(keras.layers.Layer):
    """A linear classifier on stop-gradient features, with its own optimizer.

    Args:
      num_classes: classes of the labels (>= 2).
      optimizer: the probe's optimizer (default: SGD, lr 0.1, momentum 0.9, no weight decay). It updates only the
        probe's variables; give it its own instance (not the encoder's optimizer).
      name, **kwargs: as `keras.layers.Layer`.

    Example:
      >>> probe = OnlineProbe(10, keras.optimizers.SGD(0.1, momentum=0.9))
      >>> model = BarlowTwins(encoder, projector, online_probe=probe)   # batches (view1, view2, labels)
    """

    def __init__(self, num_classes: int, optimizer: keras.optimizers.Optimizer | None = None,
                 name: str = "online_probe", **kwargs):
        super().__init__(name=name, **kwargs)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"OnlineProbe: num_classes must be an int >= 2, got {num_classes!r}.")
        if optimizer is not None and not isinstance(optimizer, keras.optimizers.Optimizer):
            raise ValueError(f"OnlineProbe: optimizer must be a keras.optimizers.Optimizer, got {type(optimizer)}.")
        self.num_classes = num_classes
        # In the variables' dtype (float32 under mixed precision too): a linear layer is cheap, and its gradients
        # then need no loss scaling.
        self.classifier = keras.layers.Dense(num_classes, dtype=keras.config.dtype_policy().variable_dtype,
                                             name="classifier")
        self.optimizer = optimizer if optimizer is not None else keras.optimizers.SGD(0.1, momentum=0.9)

    def build(self, input_shape):
        if not self.classifier.built:
            self.classifier.build(input_shape)
        self.optimizer.build(self.classifier.trainable_variables)
        self.built = True

    def call(self, features):
        """Logits of `features` (in the variables' dtype), without gradient to them."""
        return self.classifier(tf.stop_gradient(tf.cast(features, self.classifier.compute_dtype)))

    def loss_and_accuracy(self, features_per_view, labels) -> tuple[tf.Tensor, tf.Tensor]:
        """(cross-entropy, top-1) averaged over the views and the global batch's labelled examples.

        The loss is this replica's sum divided by the global count (see the module docstring), so the replicas'
        gradients sum to the global mean's; the accuracy is the global one on every replica.
        """
        dtype = self.classifier.compute_dtype
        labels = tf.cast(tf.reshape(labels, [-1]), tf.int32)
        labelled = labels >= 0
        mask = tf.cast(labelled, dtype)
        count = tf.maximum(global_sum(tf.reduce_sum(mask)), tf.ones([], dtype))
        safe_labels = tf.where(labelled, labels, tf.zeros_like(labels))
        loss, top1 = 0.0, 0.0
        for features in features_per_view:
            logits = self(features)
            cross_entropy = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=safe_labels, logits=logits)
            loss += tf.reduce_sum(cross_entropy * mask) / count
            correct = tf.cast(tf.equal(tf.argmax(logits, axis=-1, output_type=tf.int32), labels), dtype)
            top1 += global_sum(tf.reduce_sum(correct * mask)) / count
        views = float(len(features_per_view))
        return loss / views, tf.stop_gradient(top1) / views

    def test_terms(self, features_per_view, labels) -> dict:
        """`online_loss` and `online_top1` over the global batch, without an update (for `BarlowTwins.test_step`)."""
        loss, top1 = self.loss_and_accuracy(features_per_view, labels)
        return {"online_loss": global_sum(loss), "online_top1": top1}

    def train_step(self, features_per_view, labels) -> dict:
        """One update of the probe from the encoder's features of each view; returns `online_loss`, `online_top1`.

        `online_loss` is this replica's share (summed over replicas it is the global loss); `online_top1` is global.
        """
        with tf.GradientTape() as tape:
            loss, top1 = self.loss_and_accuracy(features_per_view, labels)
        variables = self.classifier.trainable_variables
        self.optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return {"online_loss": global_sum(tf.stop_gradient(loss)), "online_top1": top1}

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes,
                "optimizer": keras.optimizers.serialize(self.optimizer)}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["optimizer"] = keras.optimizers.deserialize(config["optimizer"])
        return cls(**config)
