"""Features of a frozen encoder over a labelled dataset, and top-k accuracy of class scores."""

from __future__ import annotations

import weakref
from typing import Callable

import keras
import numpy as np
import tensorflow as tf

from bt_keras.assembly.artifacts import Encoder


def _num_batches(dataset) -> int | None:
    try:
        n = int(dataset.cardinality())
    except (AttributeError, TypeError):
        return None
    return n if n >= 0 else None


def as_callable(encoder) -> Callable:
    """The `model(images, training=False)` of an Encoder, a Keras model or any such callable."""
    return encoder.model if isinstance(encoder, Encoder) else encoder


_INFERENCE_FUNCTIONS = weakref.WeakKeyDictionary()


def inference_function(model) -> Callable:
    """`tf.function(images -> model(images, training=False))`, made once per model (tracing a ResNet takes seconds;
    the trainer's kNN monitor extracts features every few epochs). Holds the model weakly."""
    try:
        return _INFERENCE_FUNCTIONS[model]
    except (KeyError, TypeError):
        pass
    ref = weakref.ref(model)
    function = tf.function(lambda images: ref()(images, training=False), reduce_retracing=True, autograph=False)
    _INFERENCE_FUNCTIONS[model] = function
    return function


def extract_features(encoder, dataset, *, verbose: int = 0, description: str = "features",
                     steps: int | None = None):
    """Runs the encoder in inference mode over `dataset` of (images, labels) batches.

    Returns `(features float32 [N, D], labels int64 [N])` as NumPy arrays, in the dataset's order. `encoder` is an
    `Encoder`, a Keras model, or any callable `f(images, training=False)` (e.g. encoder + classifier head).
    `steps`: the number of batches, if known, for the progress bar (shown when `verbose`).
    """
    forward = inference_function(as_callable(encoder))
    progbar = None
    if verbose:
        print(f"Extracting {description}")
        progbar = keras.utils.Progbar(steps or _num_batches(dataset), unit_name="batch", verbose=verbose)
    features, labels, step = [], [], 0
    for step, (images, batch_labels) in enumerate(dataset, start=1):
        features.append(tf.cast(forward(images), tf.float32).numpy())
        labels.append(np.asarray(batch_labels, np.int64).reshape(-1))
        if progbar:
            progbar.update(step)
    if progbar and progbar.target is None:  # a known target finalises itself
        progbar.update(step, finalize=True)
    if not features:
        raise ValueError(f"No examples to extract {description} from: the dataset is empty.")
    return np.concatenate(features), np.concatenate(labels)


def check_labels(labels: np.ndarray, num_classes: int, what: str) -> None:
    """Refuses unlabelled examples (TFDS marks them -1, e.g. STL-10's `unlabelled` split) and unknown classes."""
    if labels.size and labels.min() < 0:
        raise ValueError(f"{what} holds unlabelled examples (label {labels.min()}): evaluate on a labelled split, "
                         "e.g. --train_split=train.")
    if labels.size and labels.max() >= num_classes:
        raise ValueError(f"{what} has label {labels.max()} but the dataset has {num_classes} classes.")


def topk_accuracy(scores, labels, ks=(1, 5)) -> tuple[float, ...]:
    """Fraction of rows whose label is among the k highest scores, for each k (capped at the number of classes).

    Ties are broken towards the lower class index (tf.math.top_k's order), so a tie never counts twice.
    """
    scores = tf.convert_to_tensor(scores)
    labels = tf.reshape(tf.cast(tf.convert_to_tensor(labels), tf.int64), [-1, 1])
    if int(tf.shape(labels)[0]) == 0:
        raise ValueError("topk_accuracy: no examples.")
    k_max = min(max(ks), int(scores.shape[-1]))
    top = tf.cast(tf.math.top_k(scores, k=k_max).indices, tf.int64)
    hits = tf.equal(top, labels).numpy()
    return tuple(int(hits[:, :min(k, k_max)].sum()) / len(hits) for k in ks)  # exact counts / N
